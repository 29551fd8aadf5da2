#!/usr/bin/env bash
# moco.py at the quickstart's settings (32 px, batch 128, K 128, --workers 0), 3 epochs on 768 demo images: this
# moco.py against another (default: commit d14acef's, before augmentation on the device), alternating ROUNDS times.
#   bash scripts/bench_moco_cpu.sh [OUT]   environment: OLD=<moco.py to compare> ROUNDS=2 VARIANTS="old new"
set -euo pipefail
OUT=${1:-runs/bench_moco_cpu}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
[ -n "${OLD:-}" ] || { OLD="$OUT/moco_old.py"; git show d14acef:moco.py > "$OLD"; }
[ -f "$OUT/data/poison.json" ] || $PY poison.py --out "$OUT/data" --demo-train-per-class 96 --demo-val-per-class 2 >/dev/null
for ROUND in $(seq 1 "${ROUNDS:-2}"); do
  for V in ${VARIANTS:-old new}; do
    case $V in old) S=$OLD ;; new) S=moco.py ;; *) S=$V ;; esac
    D="$OUT/r${ROUND}_$(basename "$V" .py)"; rm -rf "$D"
    t0=$(date +%s.%N)
    $PY "$S" --train-list "$OUT/data/train_clean.txt" --out "$D" --image-size 32 --workers 0 --batch-size 128 \
      --queue-size 128 --m 0.99 --epochs 3 --save-every 100 >/dev/null
    $PY - "$D" "$V" "$t0" <<'PY'
import json, sys, time
recs = [json.loads(l) for l in open(sys.argv[1] + "/log.jsonl") if '"epoch"' in l]
print(f"{sys.argv[2]:>6}: {sum(r['images_per_s'] for r in recs[1:]) / (len(recs) - 1):6.1f} img/s (epochs 2-3), "
      f"{time.time() - float(sys.argv[3]):5.1f} s wall")
PY
  done
done
