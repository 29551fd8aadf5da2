#!/usr/bin/env bash
# Training throughput of every trainer on the same input: images/s (source images per second, from each script's own
# log.jsonl, mean over the epochs after the first) and, on a GPU, the peak memory, with and without bf16 autocast.
#   bash scripts/benchmark.sh [OUT]   environment: SIZE (32 on CPU, 224 on GPU), BATCH (64 / 256), IMAGES per class
#   (32 / 128), EPOCHS (2 / 3), WORKERS (0 / 12), SCRIPTS (all trainers; compress_defense and badencoder need moco)
# The data are poison.py's demo images at SIZE px; ResNet-18 for the ResNet methods, ViT-B/16 (MAE) at 224 px and
# the quickstart's 4-block ViT with 4 px patches at small sizes. Results: OUT/benchmark.md.
set -euo pipefail
OUT=${1:-runs/benchmark}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$GPU" = 1 ]; then SIZE=${SIZE:-224}; BATCH=${BATCH:-256}; IMAGES=${IMAGES:-128}; WORKERS=${WORKERS:-12}; AMPS="--amp --no-amp"
else SIZE=${SIZE:-32}; BATCH=${BATCH:-64}; IMAGES=${IMAGES:-32}; WORKERS=0; AMPS="--no-amp"; fi
EPOCHS=${EPOCHS:-$(( GPU ? 3 : 2 ))}
SCRIPTS=${SCRIPTS:-"moco byol msf jigsaw rotnet mae compress_defense badencoder"}
[ -f "$OUT/data/poison.json" ] || $PY poison.py --out "$OUT/data" --demo-classes 8 --demo-train-per-class "$IMAGES" \
  --demo-val-per-class 2 --demo-size $(( SIZE * 8 / 7 )) --val-crop "$SIZE"
L="$OUT/data/train_clean.txt"
COMMON="--train-list $L --image-size $SIZE --batch-size $BATCH --epochs $EPOCHS --workers $WORKERS --save-every 1000"
if [ "$SIZE" -ge 128 ]; then MAE="--patch-size 16"  # ViT-B/16 and the default decoder
else MAE="--patch-size 4 --width 128 --depth 4 --heads 4 --decoder-width 64 --decoder-depth 2 --decoder-heads 4"; fi  # the demo preset
N=$(( 8 * IMAGES ))
declare -A FLAGS=(
  [moco]="--queue-size $(( BATCH * (N / BATCH) ))" [byol]="--warmup-iters 1 --drop" [msf]="--bank-size $(( BATCH * (N / BATCH) ))"
  [jigsaw]="" [rotnet]="" [mae]="$MAE --warmup-epochs 1"
  [compress_defense]="--teacher $OUT/moco_--no-amp/checkpoint.pt --epochs $EPOCHS"
  [badencoder]="--encoder $OUT/moco_--no-amp/checkpoint.pt --reference-list $OUT/ref.txt --trigger white"
)
head -n 1 "$L" | sed "s|^|$(cd "$OUT/data" && pwd)/|" > "$OUT/ref.txt"
echo "| script | amp | input | batch | images/s | peak GPU MiB |" > "$OUT/benchmark.md"
echo "|---|---|---|---|---|---|" >> "$OUT/benchmark.md"
for S in $SCRIPTS; do
  for AMP in $AMPS; do
    D="$OUT/${S}_$AMP"
    [ -f "$D/log.jsonl" ] || $PY $S.py $COMMON ${FLAGS[$S]} $AMP --out "$D" > "$D.log" 2>&1 || { echo "$S $AMP failed, see $D.log"; continue; }
    $PY - "$D/log.jsonl" "$S" "$AMP" "$SIZE" "$BATCH" >> "$OUT/benchmark.md" <<'PYEOF'
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1])]
records = [r for r in records if "images_per_s" in r][1:] or records  # the first epoch includes start-up
ips = statistics.mean(r["images_per_s"] for r in records)
mem = max((r.get("peak_gpu_mib") or 0) for r in records)
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} px | {sys.argv[5]} | {ips:.0f} | {mem:.0f} |" if mem else
      f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} px | {sys.argv[5]} | {ips:.0f} | - |")
PYEOF
  done
done
cat "$OUT/benchmark.md"
