#!/usr/bin/env bash
# Reproduces the results tables from scratch and writes them into docs/results.md and README.md (the generated blocks
# between BEGIN/END markers, scripts/tables.py readme), with the paper's protocol:
# RUNS=N runs, run r with its own target class, HTBA trigger (--trigger-seed 10 + r) and poison seed r, on the same data
# (scripts/runs.py); every cell is mean ± std over the runs.
#   1. Saha et al.'s main table: per method one clean model (ROOT/main/<method>/clean) and per run a poisoned one
#      (ROOT/main/<method>/run<r>/poisoned), both probed against run r's target (scripts/quickstart.sh with RUNS);
#   2. the CompReSS defense: each run's backdoored model distilled on 5%, 10% and 25% clean data (the paper's is
#      MoCo v2's; the demo uses BYOL's, the one that carries a backdoor at demo scale: DEFENSE_TEACHER=<method>);
#   3. BadEncoder: the clean MoCo v2 encoder of table 1 backdoored by fine-tuning, per run with its target and trigger.
#   bash scripts/reproduce.sh [ROOT]                         demo scale: one run in a new ROOT (about 75 min on 2 CPU
#                                                            cores), every run ROOT holds in an existing one
#   RUNS=5 METHODS="moco byol" bash scripts/reproduce.sh     5 runs of two methods (finished runs are skipped: RUNS can
#                                                            grow later, and other methods be added by another call)
#   FIRST=8 RUNS=8 bash scripts/reproduce.sh ROOT            the test runs 8-15 (runs 0-7: dev runs, scripts/runs.py)
#   PRESET=paper DATA_ROOT=/data/imagenet CLASSES=imagenet100_classes.txt RUNS=10 bash scripts/reproduce.sh runs/paper
# Layout: ROOT/data/clean (the lists every run shares), ROOT/data/run<r> (poison.py of run r), ROOT/main/<method>/...,
# ROOT/defense/run<r>/{teacher,student_<p>pct}, ROOT/badencoder/run<r>/{clean,backdoored}, ROOT/patchsearch/run<r>/<method>
# (4. PatchSearch on each run's backdoored MoCo v2 and BYOL models: PATCHSEARCH_METHODS; the DEFENSE_TEACHER's method
# pre-trained again on the filtered list in ROOT/patchsearch/run<r>/<method>/retrained: PATCHSEARCH_RETRAIN).
# 5. Other triggers on table 1's runs: TRIGGERS="blend ctrl htba:7" [TRIGGER_METHODS=byol], in ROOT/triggers/<trigger>
#    (FAMILY:SIZE: that family at SIZE px, in ROOT/triggers/FAMILY_SIZEpx; the demo's HTBA patch is 8 px).
# CLASSES: a list of class folder names (wnids); the paper's 100 classes are imagenet100_classes.txt of the reference
# repository UMBCvision/SSL-Backdoor.
# Environment: PRESET (demo|paper), FIRST (the first run, default 0), RUNS (default: as many as ROOT/data/run<r>
# holds from FIRST on, at least 1, so a rerun never shrinks a table), TARGETS ("<one target per run>", default a
# seeded draw per run), DATA_SEED (0), METHODS ("moco byol msf jigsaw rotnet mae"), DATA_ROOT, CLASSES,
# DEFENSE_TEACHER (byol for the demo, moco for the paper), PYTHON, LAUNCH (e.g. "torchrun --nproc_per_node 8" for the
# trainers). Finished steps are skipped, so an interrupted run continues where it stopped.
set -euo pipefail
ROOT=${1:-runs/reproduce_${PRESET:-demo}}
export PRESET=${PRESET:-demo}
[ -z "${SEEDS:-}" ] || { echo "reproduce.sh: SEEDS is replaced by RUNS=N (run r: its own target, trigger and seed r)" >&2; exit 2; }
METHODS=${METHODS:-moco byol msf jigsaw rotnet mae}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
FIRST=${FIRST:-0}
[[ "$FIRST" =~ ^[0-9]{1,9}$ ]] || { echo "reproduce.sh: FIRST='$FIRST' is not a whole number >= 0" >&2; exit 2; }
if [ -z "${RUNS:-}" ]; then  # continue with the runs that exist: run r's data is ROOT/data/run<r>
  RUNS=$(( FIRST + 1 ))
  for D in "$ROOT"/data/run*; do
    R=${D##*/run}
    if [[ $R =~ ^[0-9]+$ ]] && [ -d "$D" ] && (( R + 1 > RUNS )); then RUNS=$((R + 1)); fi
  done
  RUNS=$(( RUNS - FIRST ))
  echo "reproduce.sh: RUNS=$RUNS (the runs in $ROOT/data from run $FIRST)"
fi
export FIRST RUNS

if [ "$PRESET" = demo ]; then
  DEFENSE_TEACHER=${DEFENSE_TEACHER:-byol}
  DEFENSE_FLAGS="--batch-size 32 --epochs 60 --milestones 41 55 --alpha 0.99 --workers 0"
  BADENCODER_FLAGS="--image-size 32 --batch-size 32 --lr 0.01 --epochs 4 --workers 0"
  PROBE_LIST=train_labeled_10pct.txt
  PROBE_FLAGS="--workers 0"
  DEFENSE_PROTOCOL=demo  # the protocol of the demo's main table
  PATCHSEARCH_FLAGS="--clusters 16 --classifier-iters 50 --ensemble 1 --workers 0"  # about 30 s (docs/methods.md, "patchsearch.py")
else
  DEFENSE_TEACHER=${DEFENSE_TEACHER:-moco}
  DEFENSE_FLAGS=""
  BADENCODER_FLAGS=""
  PROBE_LIST=train_labeled_1pct.txt
  PROBE_FLAGS=""
  DEFENSE_PROTOCOL=moco  # CompReSS's eval_linear.py, with its augmentation (docs/methods.md, "linear_probe.py")
  PATCHSEARCH_FLAGS=""  # the paper's defaults
fi
probe() {  # probe CHECKPOINT OUT DATA [extra flags]
  [ -f "$2/metrics.json" ] || $PY linear_probe.py --encoder "$1" --train-list "$3/$PROBE_LIST" --val-list "$3/val_clean.txt" \
    --val-patched-list "$3/val_patched.txt" $PROBE_FLAGS "${@:4}" --out "$2"
}

# 1. main table: the data folders are shared by every method (and by the defense and BadEncoder)
for METHOD in $METHODS; do
  DATA_DIR="$ROOT/data" bash scripts/quickstart.sh "$METHOD" "$ROOT/main/$METHOD"
done

for ((r = FIRST; r < FIRST + RUNS; r++)); do
  DATA="$ROOT/data/run$r"
  [ -f "$DATA/poison.json" ] || continue
  DATA="$(cd "$DATA" && pwd)"
  TEACHER="$ROOT/main/$DEFENSE_TEACHER/run$r/poisoned"
  if [ -f "$TEACHER/done" ]; then
    # 2. defense: the teacher is run r's backdoored model of table 1; the students distill it on clean labeled subsets
    mkdir -p "$ROOT/defense/run$r"
    [ -e "$ROOT/defense/run$r/teacher" ] || ln -s "$(cd "$TEACHER" && pwd)" "$ROOT/defense/run$r/teacher"
    for P in 25 10 5; do
      S="$ROOT/defense/run$r/student_${P}pct"
      [ -f "$S/done" ] || { ${LAUNCH:-$PY} compress_defense.py --teacher "$TEACHER/checkpoint.pt" \
        --train-list "$DATA/train_labeled_${P}pct.txt" --out "$S" --seed "$r" $DEFENSE_FLAGS && touch "$S/done"; }
      probe "$S/checkpoint.pt" "$S/probe" "$DATA" --protocol $DEFENSE_PROTOCOL --seed "$r"
    done
  fi
  if [ -f "$ROOT/main/moco/clean/done" ]; then
    # 3. BadEncoder on the clean MoCo v2 encoder of table 1, probed with BadEncoder's MLP classifier; the trigger and
    # its placement are the ones of run r's patched val images, and the reference image is the first target image.
    B="$ROOT/badencoder/run$r"
    mkdir -p "$B/clean"
    for F in checkpoint.pt log.jsonl; do [ -e "$B/clean/$F" ] || ln -s "$(cd "$ROOT/main/moco/clean" && pwd)/$F" "$B/clean/$F"; done
    TARGET_INDEX=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['target']['index'])" "$DATA/poison.json")
    awk -v t="$TARGET_INDEX" -v d="$DATA" '$NF == t { if (substr($0, 1, 1) != "/") $0 = d "/" $0; print; exit }' \
      "$DATA/train_clean.txt" > "$B/reference.txt"
    [ -f "$B/backdoored/done" ] || { ${LAUNCH:-$PY} badencoder.py --encoder "$B/clean/checkpoint.pt" --shadow-list "$DATA/train_clean.txt" \
      --reference-list "$B/reference.txt" --trigger "$DATA/trigger.png" --trigger-location random --out "$B/backdoored" \
      --seed "$r" $BADENCODER_FLAGS && touch "$B/backdoored/done"; }
    for KIND in clean backdoored; do probe "$B/$KIND/checkpoint.pt" "$B/$KIND/probe" "$DATA" --protocol badencoder --seed "$r"; done
  fi
  for M in ${PATCHSEARCH_METHODS:-moco byol}; do
    # 4. PatchSearch on run r's backdoored model, with no clean data: summary.json holds the flagged set's poison
    # recall and precision (from poison.json); train_filtered.txt is the list to pre-train on again.
    [ -f "$ROOT/main/$M/run$r/poisoned/done" ] || continue
    P="$ROOT/patchsearch/run$r/$M"
    [ -f "$P/summary.json" ] || $PY patchsearch.py --encoder "$ROOT/main/$M/run$r/poisoned/checkpoint.pt" \
      --train-list "$DATA/train_poisoned.txt" --out "$P" --seed "$r" $PATCHSEARCH_FLAGS
    # Then the defended model: the same method pre-trained again on the filtered list (seed r, the preset's flags), probed
    # against run r (PATCHSEARCH_RETRAIN: the methods to re-train, default the defense teacher, for CompReSS beside it).
    if [[ " ${PATCHSEARCH_RETRAIN-$DEFENSE_TEACHER} " == *" $M "* ]]; then
      PRETRAIN_LIST="$P/train_filtered.txt" PROBE_DATA="$DATA" SEED="$r" bash scripts/quickstart.sh "$M" "$P/retrained"
    fi
  done
done

# 5. other triggers (TRIGGERS="blend ctrl htba:7": poison.py --trigger FAMILY [--trigger-size SIZE]) on the same runs, for
# TRIGGER_METHODS (byol): per trigger its own data ROOT/triggers/T/data and runs ROOT/triggers/T/<method>/run<r> (run r:
# the same target and trigger seed as table 1's run r). The clean lists are the same images (DATA_SEED), so table 1's
# clean model is linked in (and probed against each trigger's patched val images).
for ENTRY in ${TRIGGERS:-}; do
  FAMILY=${ENTRY%%:*}; SIZE=${ENTRY#"$FAMILY"}; SIZE=${SIZE#:}
  T=$FAMILY${SIZE:+_${SIZE}px}
  for M in ${TRIGGER_METHODS:-byol}; do
    O="$ROOT/triggers/$T/$M"
    [ -f "$ROOT/main/$M/clean/done" ] || { echo "reproduce.sh: TRIGGERS $ENTRY ($O) needs $ROOT/main/$M/clean (METHODS=$M)" >&2; exit 2; }
    mkdir -p "$O/clean"
    for F in checkpoint.pt log.jsonl done; do [ -e "$O/clean/$F" ] || ln -s "$(cd "$ROOT/main/$M/clean" && pwd)/$F" "$O/clean/$F"; done
    DATA_DIR="$ROOT/triggers/$T/data" POISON_EXTRA="--trigger $FAMILY ${SIZE:+--trigger-size $SIZE} ${POISON_EXTRA:-}" bash scripts/quickstart.sh "$M" "$O"
  done
done

$PY scripts/tables.py main "$ROOT/main"
$PY scripts/tables.py defense "$ROOT/defense" 2>/dev/null || true
$PY scripts/tables.py badencoder "$ROOT/badencoder" 2>/dev/null || true
$PY scripts/tables.py details "$ROOT/main"
$PY scripts/tables.py patchsearch "$ROOT/patchsearch" 2>/dev/null || true
[ -z "${TRIGGERS:-}" ] || $PY scripts/tables.py triggers "$ROOT"
if [ "$PRESET" = demo ]; then
  for F in README.md docs/results.md; do
    $PY scripts/tables.py readme "$F" "$ROOT" && echo "reproduce.sh: $F tables updated from $ROOT"
  done
  for M in moco byol; do  # the feature-space pictures of docs/results.md: run 0 of each
    [ -f "$ROOT/main/$M/run0/feature_space.png" ] && mkdir -p docs && cp "$ROOT/main/$M/run0/feature_space.png" "docs/feature-space-$M.png"
  done
fi
