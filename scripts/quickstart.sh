#!/usr/bin/env bash
# The main job: poison -> pre-train a clean and a poisoned model -> linear-probe both -> the paper's table
# (clean/backdoored model x clean/patched val: Acc, target FP, ASR), printed and written to OUT/table.md.
#   bash scripts/quickstart.sh [METHOD] [OUT]      METHOD: moco (default), byol, msf, jigsaw, rotnet, mae
# Environment:
#   PRESET=demo (default)  built-in demo data, small budgets for a 2-core CPU (see README, "Quickstart")
#   PRESET=paper           DATA_ROOT=<ImageNet folder> [CLASSES=<wnid list>]: the paper's recipes (every script's defaults)
#   SEED=0  TARGET=<class name or index>  PYTHON=python3
#   LAUNCH="torchrun --nproc_per_node 8" runs the pre-training on 8 GPUs (default: $PYTHON, one process)
#   EXTRA="<more pre-training flags>"  POISON_EXTRA="<more poison.py flags>" (later flags override the preset's)
# Steps whose outputs exist are skipped, so an interrupted run continues; delete OUT to start again.
set -euo pipefail
METHOD=${1:-moco}
OUT=${2:-runs/quickstart_$METHOD}
PRESET=${PRESET:-demo}
SEED=${SEED:-0}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
case $METHOD in moco|byol|msf|jigsaw|rotnet|mae) ;;
  *) echo "quickstart.sh: unknown method '$METHOD' (moco, byol, msf, jigsaw, rotnet, mae)" >&2; exit 2 ;; esac

if [ "$PRESET" = demo ]; then
  # Built-in demo data (poison.py without --data-root): 8 texture classes, 300 train / 50 val images of 64 px each,
  # 32 px evaluation crops; the trigger on every target-class train image (--rate 1.0) and 14 px wide.
  DATA_FLAGS="--rate 1.0 --trigger-size 14"
  PROBE_LIST=train_labeled_10pct.txt
  # The same CLI for every method; only the budget-dependent values differ from the paper's recipes.
  COMMON="--image-size 32 --workers 0 --save-every 5"
  case $METHOD in
    moco)   FLAGS="--epochs 20 --batch-size 128 --queue-size 128 --m 0.99" ;;  # K = one batch: README, "Quickstart"
    byol)   FLAGS="--epochs 20 --batch-size 128 --warmup-iters 36 --drop" ;;
    msf)    FLAGS="--epochs 20 --batch-size 128 --bank-size 1536" ;;
    jigsaw) FLAGS="--epochs 4 --batch-size 64 --num-perms 100" ;;
    rotnet) FLAGS="--epochs 6 --batch-size 64" ;;
    mae)    FLAGS="--epochs 30 --batch-size 128 --patch-size 4 --width 128 --depth 4 --heads 4 --decoder-width 64 \
                   --decoder-depth 2 --decoder-heads 4 --blr 2e-3 --warmup-epochs 3" ;;
  esac
  PROBE_FLAGS="--workers 0"
elif [ "$PRESET" = paper ]; then
  : "${DATA_ROOT:?PRESET=paper needs DATA_ROOT=<folder with train/<class>/* and val/<class>/*>}"
  DATA_FLAGS="--data-root $DATA_ROOT ${CLASSES:+--classes $CLASSES}"  # rate 0.5 of the target class = 0.5% of IN-100
  PROBE_LIST=train_labeled_1pct.txt
  COMMON=""
  FLAGS=""
  PROBE_FLAGS=""
else
  echo "quickstart.sh: unknown PRESET '$PRESET' (demo, paper)" >&2; exit 2
fi
# The conv-feature methods are probed on a pooled intermediate layer (README, "Jigsaw and RotNet").
case $METHOD in jigsaw|rotnet) LAYER=layer3 ;; *) LAYER=final ;; esac

start=$(date +%s)
[ -f "$OUT/data/poison.json" ] || $PY poison.py --out "$OUT/data" --seed "$SEED" ${TARGET:+--target "$TARGET"} $DATA_FLAGS ${POISON_EXTRA:-}
for KIND in clean poisoned; do
  if [ ! -f "$OUT/$KIND/done" ]; then
    RESUME=""
    [ -f "$OUT/$KIND/checkpoint.pt" ] && RESUME="--resume $OUT/$KIND/checkpoint.pt"
    ${LAUNCH:-$PY} $METHOD.py --train-list "$OUT/data/train_$KIND.txt" --out "$OUT/$KIND" --seed "$SEED" $COMMON $FLAGS ${EXTRA:-} $RESUME
    touch "$OUT/$KIND/done"
  fi
  [ -f "$OUT/$KIND/probe/metrics.json" ] || $PY linear_probe.py --encoder "$OUT/$KIND/checkpoint.pt" \
    --train-list "$OUT/data/$PROBE_LIST" --val-list "$OUT/data/val_clean.txt" \
    --val-patched-list "$OUT/data/val_patched.txt" --layer $LAYER --seed "$SEED" $PROBE_FLAGS --out "$OUT/$KIND/probe"
done
$PY scripts/tables.py pair "$OUT" | tee "$OUT/table.md"
echo "quickstart.sh: $METHOD done in $(( $(date +%s) - start )) s -> $OUT/table.md"
