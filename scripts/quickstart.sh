#!/usr/bin/env bash
# The main job: poison -> pre-train a clean and a poisoned model -> linear-probe both -> the paper's table
# (clean/backdoored model x clean/patched val: Acc, target FP, ASR), printed and written to OUT/table.md.
#   bash scripts/quickstart.sh [METHOD] [OUT]      METHOD: byol (default), moco, msf, jigsaw, rotnet, mae
# Environment:
#   PRESET=demo (default)  built-in demo data, or DATA_ROOT=<folder> [CLASSES=<list>] (your own small data set in the
#                          ImageNet layout, 32 px crops), small budgets for a 2-core CPU (see docs/methods.md); one
#                          linear-probe protocol for every method (linear_probe.py --protocol demo), so the rows compare
#   PRESET=paper           DATA_ROOT=<ImageNet folder> [CLASSES=<wnid list>]: the paper's recipes (every script's defaults)
#                          and each method's own reference probe (--protocol METHOD; MSF: moco)
#   SEED=0  TARGET=<class name or index> (one run: default run SEED's target on the demo's 8 classes, else 0)  PYTHON=python3
#   LAUNCH="torchrun --nproc_per_node 8" runs the pre-training on 8 GPUs (default: $PYTHON, one process)
#   EXTRA="<more pre-training flags>"  POISON_EXTRA="<more poison.py flags>" (later flags override the preset's)
#   RUNS=N [FIRST=F]  the paper's protocol (scripts/runs.py) for runs F..F+N-1 (F default 0; runs 0-7 are dev runs, for
#           choosing settings; 8-15 test runs, for reporting: FIRST=8 RUNS=8): one clean model OUT/clean, trained on
#           OUT/data/clean (the data of every run: poison.py --data-seed DATA_SEED, default 0); then for each run r the
#           data OUT/data/run<r> (target: the i-th word of TARGETS="<names or indices>" for the i-th run, or a seeded
#           draw from r, --trigger-seed 10+r, --seed r), the backdoored model OUT/run<r>/poisoned (seed r), both models
#           probed in OUT/run<r>/{clean,poisoned}/probe at probe seed r (OUT/run<r>/clean links the clean model) and
#           again at each of PROBE_SEEDS="0 1 2 3 4" in OUT/run<r>/probe_seeds/{clean,poisoned}/s<k> (the verdict's
#           seeds: scripts/tables.py), OUT/run<r>/feature_space.png; OUT/table.md: scripts/tables.py runs OUT.
#           DATA_DIR=<folder> (instead of OUT/data) shares the data between methods.
#           OUT/run<r>/control/probe: the control of run r, another run's backdoored model of r's block (runs.py control:
#           run r-1, the block's first run the block's second), poisoned for another target with another trigger,
#           probed on run r's lists; made once that model is trained.
#   JOBS=N  trains N models at once, each with (CPU cores)/N threads unless OMP_NUM_THREADS says otherwise (one GPU has
#           room for several demo models). Default: 1 with RUNS; for one run 2 on a CPU (the clean and the backdoored
#           model, a thread each on 2 cores: 1.2x one model's time, not 2x), 1 on a GPU. Each trainer folder's `done`
#           file records how many models were trained at once (jobs=<n>), for the tables' time column.
#   PRETRAIN_LIST=<list> PROBE_DATA="<poison.py folder> ..."  one model OUT (seed SEED) with the preset's flags on that
#           list (e.g. patchsearch.py's train_filtered.txt), probed against each folder's lists and target: OUT/probe for
#           one folder, OUT/probe_<folder name> for several. No poisoning, no table.
# Steps whose outputs exist are skipped, so an interrupted run continues (and RUNS can be raised later); delete OUT to
# start again. A data folder that exists is kept only if made with the same poison.py flags (poison.py --reuse).
set -euo pipefail
METHOD=${1:-byol}
OUT=${2:-runs/quickstart_$METHOD}
PRESET=${PRESET:-demo}
SEED=${SEED:-0}
PY=${PYTHON:-python3}
case "$METHOD" in moco|byol|msf|jigsaw|rotnet|mae) ;;
  *) echo "quickstart.sh: unknown method '$METHOD' (moco, byol, msf, jigsaw, rotnet, mae)" >&2; exit 2 ;; esac
integer() {  # integer NAME MIN: $NAME, if set, is a whole number >= MIN; else one line and exit 2, before any work
  local v=${!1:-}
  [ -z "$v" ] || { [[ "$v" =~ ^[0-9]{1,9}$ ]] && (( 10#$v >= $2 )); } && return
  echo "quickstart.sh: $1='$v' is not a whole number >= $2" >&2; exit 2
}
integer RUNS 1; integer FIRST 0; integer JOBS 1; integer SEED 0
for PROBE_SEED in ${PROBE_SEEDS-0 1 2 3 4}; do integer PROBE_SEED 0; done
if [ -n "${DATA_ROOT:-}" ] && [ ! -d "$DATA_ROOT" ]; then
  echo "quickstart.sh: DATA_ROOT '$DATA_ROOT' is not a folder" >&2; exit 2
fi
cd "$(dirname "$0")/.."

if [ "$PRESET" = demo ]; then
  # Built-in demo data (poison.py without --data-root): 8 texture classes, 300 train / 50 val images of 32 px each, the
  # size of the crops; the trigger on every target-class train image (--rate 1.0) and 8 px wide: 6% of a val crop (the
  # paper's 5%), 25-56% of a training view's side (docs/methods.md, "Demo data"). With DATA_ROOT: that folder instead,
  # with the same budgets (poison.py warns when the trigger is tiny against its train images).
  DATA_FLAGS=(--rate 1.0 --trigger-size 8)
  if [ -n "${DATA_ROOT:-}" ]; then
    DATA_FLAGS+=(--data-root "$DATA_ROOT" --val-crop 32)
    TARGET=${TARGET:-0}  # as the built-in demo: class 0 unless TARGET names one
  else
    DATA_FLAGS=(--demo-size 32 "${DATA_FLAGS[@]}")
  fi
  PROBE_LIST=train_labeled_10pct.txt
  # The same CLI for every method; only the budget-dependent values differ from the paper's recipes.
  COMMON="--image-size 32 --workers 0 --save-every 5"
  case $METHOD in
    moco)   FLAGS="--epochs 20 --batch-size 128 --queue-size 128 --m 0.99" ;;  # K = one batch: docs/methods.md, "Demo data"
    byol)   FLAGS="--epochs 60 --batch-size 128 --warmup-iters 36 --drop" ;;  # docs/results.md, "Main table"
    # MSF at k = 3 with byol's optimizer, schedule, views and loss: docs/methods.md, "msf.py"
    msf)    FLAGS="--epochs 60 --batch-size 128 --bank-size 1536 --topk 3 --symmetric --augmentation byol/byol \
                   --optimizer adam --lr 2e-3 --weight-decay 1e-6 --schedule constant --warmup-iters 36 --m-schedule cosine \
                   --bn-batch 128" ;;
    jigsaw) FLAGS="--epochs 4 --batch-size 64 --num-perms 100" ;;
    rotnet) FLAGS="--epochs 6 --batch-size 64" ;;
    mae)    FLAGS="--epochs 30 --batch-size 128 --patch-size 4 --width 128 --depth 4 --heads 4 --decoder-width 64 \
                   --decoder-depth 2 --decoder-heads 4 --blr 2e-3 --warmup-epochs 3" ;;
  esac
  PROBE_FLAGS="--protocol demo --workers 0"  # cached center-crop features, the moco recipe, for every method
elif [ "$PRESET" = paper ]; then
  : "${DATA_ROOT:?PRESET=paper needs DATA_ROOT=<folder with train/<class>/* and val/<class>/*>}"
  DATA_FLAGS=(--data-root "$DATA_ROOT")  # rate 0.5 of the target class = 0.5% of IN-100
  PROBE_LIST=train_labeled_1pct.txt
  COMMON=""
  FLAGS=""
  PROBE_FLAGS="--protocol ${METHOD/msf/moco}"  # the reference's own evaluation (docs/methods.md); MSF: CompReSS's
else
  echo "quickstart.sh: unknown PRESET '$PRESET' (demo, paper)" >&2; exit 2
fi
[ -z "${CLASSES:-}" ] || DATA_FLAGS+=(--classes "$CLASSES")
# The conv-feature methods are probed on a pooled intermediate layer (docs/methods.md, "jigsaw.py and rotnet.py").
case $METHOD in jigsaw|rotnet) LAYER=layer3 ;; *) LAYER=final ;; esac

# COMMON, FLAGS, PROBE_FLAGS, EXTRA, POISON_EXTRA and LAUNCH are lists of words: split on purpose.
poison() {  # poison OUT [flags]: poison.py's output folder (the preset's flags and POISON_EXTRA come last and win);
  # an existing one is kept if made with the same flags, and refused otherwise (a shared DATA_DIR, another POISON_EXTRA)
  "$PY" poison.py --out "$1" --reuse "${@:2}" "${DATA_FLAGS[@]}" ${POISON_EXTRA:-}
}
pretrain() {  # pretrain TRAIN_LIST OUT SEED: SSL pre-training, resumed if interrupted, skipped when done; OUT/done
  # records how many models were trained at once (AT_ONCE)
  if [ ! -f "$2/done" ]; then
    local resume=()
    [ -f "$2/checkpoint.pt" ] && resume=(--resume "$2/checkpoint.pt")
    # a run that finished before its done marker was written: its checkpoint is at its own last epoch
    if [ -f "$2/checkpoint.pt" ] && "$PY" -c 'import sys, torch; c = torch.load(sys.argv[1], weights_only=True)
sys.exit(c["epoch"] < c["args"]["epochs"])' "$2/checkpoint.pt"; then
      echo "jobs=$AT_ONCE" > "$2/done"
      return
    fi
    ${LAUNCH:-"$PY"} "$METHOD.py" --train-list "$1" --out "$2" --seed "$3" $COMMON $FLAGS ${EXTRA:-} "${resume[@]}"
    echo "jobs=$AT_ONCE" > "$2/done"
  fi
}
probe() {  # probe MODEL DATA SEED [DIR [no]]: MODEL/checkpoint.pt on DATA's lists (target from DATA/poison.json) -> DIR
  # (default MODEL/probe), with features.pt (for feature_space.py) unless the fifth word is "no"
  local dir=${4:-$1/probe} features=(--save-features)
  [ "${5:-}" != no ] || features=()
  [ -f "$dir/metrics.json" ] || "$PY" linear_probe.py --encoder "$1/checkpoint.pt" --train-list "$2/$PROBE_LIST" \
    --val-list "$2/val_clean.txt" --val-patched-list "$2/val_patched.txt" --layer "$LAYER" --seed "$3" $PROBE_FLAGS \
    "${features[@]}" --out "$dir"
}
at_once() {  # at_once MODEL_FOLDER...: AT_ONCE = how many of them JOBS trains at once (those not done, at most JOBS)
  local todo=0 m
  for m in "$@"; do [ -f "$m/done" ] || todo=$(( todo + 1 )); done
  AT_ONCE=$(( todo < ${JOBS:-1} ? todo : ${JOBS:-1} ))
  AT_ONCE=$(( AT_ONCE > 1 ? AT_ONCE : 1 ))
}
AT_ONCE=1

background() {  # background CMD...: with JOBS=N > 1, CMD runs in the background, at most N at a time; else at once.
  # Each job gets its share of the cores: N jobs of torch's default (all cores each) run 3-4x slower on a 2-core CPU.
  if [ "${JOBS:-1}" -le 1 ]; then "$@"; return; fi
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  local threads=$(( $(nproc) / JOBS ))
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 1 ? threads : 1 ))} "$@" &
  PIDS+=($!)
}
wait_background() {  # every background job, failing if one failed
  for P in "${PIDS[@]}"; do wait "$P"; done
  PIDS=()
}
PIDS=()

start=$(date +%s)
if [ -n "${PRETRAIN_LIST:-}" ]; then  # one model on a given list, probed against existing data folders
  read -ra PROBE_DIRS <<< "${PROBE_DATA:?PRETRAIN_LIST needs PROBE_DATA=<poison.py folder> (the lists to probe on)}"
  pretrain "$PRETRAIN_LIST" "$OUT" "$SEED"  # one model: AT_ONCE=1
  for D in "${PROBE_DIRS[@]}"; do
    if [ "${#PROBE_DIRS[@]}" = 1 ]; then probe "$OUT" "$D" "$SEED"; else probe "$OUT" "$D" "$SEED" "$OUT/probe_$(basename "$D")"; fi
  done
elif [ -z "${RUNS:-}" ]; then  # one run: OUT/data, OUT/clean, OUT/poisoned; run SEED of RUNS's protocol (scripts/runs.py:
  # its trigger seed 10 + SEED and, on the built-in demo's default classes without TARGET, its target), so it is a row
  # of the main table
  if [ "$PRESET" = demo ] && [ -z "${DATA_ROOT:-}" ] && [ -z "${TARGET:-}" ] && [[ " ${POISON_EXTRA:-} " != *" --demo-classes "* ]]; then
    TARGET=$("$PY" scripts/runs.py target "$SEED" "$("$PY" -c 'import poison; print(len(poison.DEMO_DEFAULT))')")
  fi
  if [ -z "${JOBS:-}" ]; then  # the two models at once on a CPU (a thread each on 2 cores), one after the other on a GPU
    JOBS=2
    [ -z "${LAUNCH:-}" ] && [ "$("$PY" -c 'import torch; print(torch.cuda.is_available())')" = False ] || JOBS=1
  fi
  poison "$OUT/data" --seed "$SEED" ${TARGET:+--target "$TARGET"} --trigger-seed "$("$PY" scripts/runs.py trigger-seed "$SEED")"
  at_once "$OUT/clean" "$OUT/poisoned"
  for KIND in clean poisoned; do background pretrain "$OUT/data/train_$KIND.txt" "$OUT/$KIND" "$SEED"; done
  wait_background
  for KIND in clean poisoned; do probe "$OUT/$KIND" "$OUT/data" "$SEED"; done
  [ -f "$OUT/feature_space.json" ] || "$PY" scripts/feature_space.py "$OUT"
  "$PY" scripts/tables.py pair "$OUT" | tee "$OUT/table.md"
else
  DATA_DIR=${DATA_DIR:-$OUT/data}
  FIRST=${FIRST:-0}
  LAST=$(( FIRST + RUNS - 1 ))
  read -ra TARGET_LIST <<< "${TARGETS:-}"
  if [ -n "${TARGETS:-}" ] && [ "${#TARGET_LIST[@]}" -lt "$RUNS" ]; then
    echo "quickstart.sh: TARGETS names ${#TARGET_LIST[@]} targets for RUNS=$RUNS" >&2; exit 2
  fi
  # The clean model does not depend on the target or the trigger: one per method, on the lists every run shares.
  # The models first (JOBS at a time), then the probes.
  poison "$DATA_DIR/clean" --seed 0 --target 0 --data-seed "${DATA_SEED:-0}"
  MODELS=("$OUT/clean")
  for ((r = FIRST; r <= LAST; r++)); do MODELS+=("$OUT/run$r/poisoned"); done
  at_once "${MODELS[@]}"
  background pretrain "$DATA_DIR/clean/train_clean.txt" "$OUT/clean" "$SEED"
  for ((r = FIRST; r <= LAST; r++)); do
    D="$DATA_DIR/run$r" R="$OUT/run$r"
    T=${TARGET_LIST[$(( r - FIRST ))]:-$("$PY" scripts/runs.py target "$r" "$DATA_DIR/clean/poison.json")}
    poison "$D" --seed "$r" --target "$T" --trigger-seed "$("$PY" scripts/runs.py trigger-seed "$r")" --data-seed "${DATA_SEED:-0}"
    mkdir -p "$R/clean"
    [ -e "$R/data" ] || ln -s "$(cd "$D" && pwd)" "$R/data"
    background pretrain "$D/train_poisoned.txt" "$R/poisoned" "$r"
  done
  wait_background
  for ((r = FIRST; r <= LAST; r++)); do
    D="$DATA_DIR/run$r" R="$OUT/run$r"
    for F in checkpoint.pt log.jsonl; do [ -e "$R/clean/$F" ] || ln -s "$(cd "$OUT/clean" && pwd)/$F" "$R/clean/$F"; done
    probe "$R/clean" "$D" "$r"
    probe "$R/poisoned" "$D" "$r"
    [ -f "$R/feature_space.json" ] || "$PY" scripts/feature_space.py "$R"
    "$PY" scripts/tables.py pair "$R" > "$R/table.md"
    # The verdict's probe seeds: both models probed again at each (scripts/tables.py: shown at 4 or more of 5)
    for S in ${PROBE_SEEDS-0 1 2 3 4}; do
      for KIND in clean poisoned; do probe "$R/$KIND" "$D" "$S" "$R/probe_seeds/$KIND/s$S" no; done
    done
  done
  # The control of run r: a backdoored model without a backdoor for run r's target and trigger (runs.py control: another
  # run of r's block) on run r's patched images. Where it sends as many to the target, run r's effect is no backdoor.
  for ((r = FIRST; r <= LAST; r++)); do
    C=$("$PY" scripts/runs.py control "$r")
    [ ! -f "$OUT/run$C/poisoned/done" ] || probe "$OUT/run$C/poisoned" "$DATA_DIR/run$r" "$r" "$OUT/run$r/control/probe"
  done
  "$PY" scripts/tables.py runs "$OUT" | tee "$OUT/table.md"
fi
echo "quickstart.sh: $METHOD done in $(( $(date +%s) - start )) s -> $OUT/table.md"
