#!/usr/bin/env bash
# Reproduces the three tables of the README from scratch and writes them into README.md:
#   1. Saha et al.'s main table: each method pre-trained on clean and on poisoned data, both linear-probed;
#   2. the CompReSS defense: a backdoored model of table 1 distilled on 5%, 10% and 25% clean data (the paper's is
#      MoCo v2's; the demo uses BYOL's, the one that carries a backdoor at demo scale: DEFENSE_TEACHER=<method>);
#   3. BadEncoder: the clean MoCo v2 encoder of table 1 backdoored by fine-tuning (CA, BA, ASR).
#   bash scripts/reproduce.sh [ROOT]                         demo scale on the built-in data (about 1.5 h on 2 CPU cores)
#   PRESET=paper DATA_ROOT=/data/imagenet CLASSES=in100.txt SEEDS="0 1 2" bash scripts/reproduce.sh runs/paper
# Environment: PRESET (demo|paper), SEEDS ("0"), METHODS ("moco byol msf jigsaw rotnet mae"), DATA_ROOT, CLASSES,
# DEFENSE_TEACHER (byol for the demo, moco for the paper), TARGET, PYTHON, LAUNCH (e.g. "torchrun --nproc_per_node 8" for the trainers). Finished steps are skipped, so an interrupted run continues where it stopped.
set -euo pipefail
ROOT=${1:-runs/reproduce_${PRESET:-demo}}
export PRESET=${PRESET:-demo}
SEEDS=${SEEDS:-0}
METHODS=${METHODS:-moco byol msf jigsaw rotnet mae}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if [ "$PRESET" = demo ]; then
  DEFENSE_TEACHER=${DEFENSE_TEACHER:-byol}
  DEFENSE_FLAGS="--batch-size 32 --epochs 60 --milestones 41 55 --alpha 0.99 --workers 0"
  BADENCODER_FLAGS="--image-size 32 --batch-size 32 --lr 0.01 --epochs 4 --workers 0"
  PROBE_LIST=train_labeled_10pct.txt
  PROBE_FLAGS="--workers 0"
else
  DEFENSE_TEACHER=${DEFENSE_TEACHER:-moco}
  DEFENSE_FLAGS=""
  BADENCODER_FLAGS=""
  PROBE_LIST=train_labeled_1pct.txt
  PROBE_FLAGS=""
fi
probe() {  # probe CHECKPOINT OUT DATA [extra flags]
  [ -f "$2/metrics.json" ] || $PY linear_probe.py --encoder "$1" --train-list "$3/$PROBE_LIST" --val-list "$3/val_clean.txt" \
    --val-patched-list "$3/val_patched.txt" $PROBE_FLAGS "${@:4}" --out "$2"
}

# 1. main table
for SEED in $SEEDS; do
  for METHOD in $METHODS; do
    SEED=$SEED bash scripts/quickstart.sh "$METHOD" "$ROOT/main/${METHOD}_seed$SEED"
  done
done

SEED=${SEEDS%% *}
MOCO="$ROOT/main/moco_seed$SEED"
DATA="$(cd "$MOCO/data" && pwd)"
TEACHER="$ROOT/main/${DEFENSE_TEACHER}_seed$SEED/poisoned"
if [ -f "$TEACHER/checkpoint.pt" ]; then
  # 2. defense: the teacher is a backdoored model of table 1 (the same data: every method's run poisons with one seed)
  mkdir -p "$ROOT/defense"
  [ -e "$ROOT/defense/teacher" ] || ln -s "$(cd "$TEACHER" && pwd)" "$ROOT/defense/teacher"
  for P in 25 10 5; do
    S="$ROOT/defense/student_${P}pct"
    [ -f "$S/done" ] || { ${LAUNCH:-$PY} compress_defense.py --teacher "$TEACHER/checkpoint.pt" \
      --train-list "$DATA/train_labeled_${P}pct.txt" --out "$S" --seed "$SEED" $DEFENSE_FLAGS && touch "$S/done"; }
    probe "$S/checkpoint.pt" "$S/probe" "$DATA" --seed "$SEED"
  done
fi
if [ -f "$MOCO/clean/checkpoint.pt" ]; then
  # 3. BadEncoder on the clean MoCo v2 encoder of table 1, probed with BadEncoder's MLP classifier; the trigger and
  # its placement are the ones of poison.py's patched val images, and the reference image is the first target image.
  B="$ROOT/badencoder"
  mkdir -p "$B/clean"
  for F in checkpoint.pt log.jsonl; do [ -e "$B/clean/$F" ] || ln -s "$(cd "$MOCO/clean" && pwd)/$F" "$B/clean/$F"; done
  TARGET_INDEX=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['target']['index'])" "$DATA/poison.json")
  awk -v t="$TARGET_INDEX" -v d="$DATA" '$NF == t { if (substr($0, 1, 1) != "/") $0 = d "/" $0; print; exit }' \
    "$DATA/train_clean.txt" > "$B/reference.txt"
  [ -f "$B/backdoored/done" ] || { ${LAUNCH:-$PY} badencoder.py --encoder "$B/clean/checkpoint.pt" --shadow-list "$DATA/train_clean.txt" \
    --reference-list "$B/reference.txt" --trigger "$DATA/trigger.png" --trigger-location random --out "$B/backdoored" \
    --seed "$SEED" $BADENCODER_FLAGS && touch "$B/backdoored/done"; }
  for KIND in clean backdoored; do probe "$B/$KIND/checkpoint.pt" "$B/$KIND/probe" "$DATA" --classifier mlp --seed "$SEED"; done
fi

$PY scripts/tables.py main "$ROOT/main"
$PY scripts/tables.py defense "$ROOT/defense" 2>/dev/null || true
$PY scripts/tables.py badencoder "$ROOT/badencoder" 2>/dev/null || true
[ "$PRESET" = demo ] && $PY scripts/tables.py readme README.md "$ROOT" && echo "reproduce.sh: README.md tables updated from $ROOT"
