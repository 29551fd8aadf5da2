#!/usr/bin/env bash
# Whole run against model step, per trainer, at the quickstart's demo settings on this machine's CPU:
#   bash scripts/bench_step_ratio.sh LIST OUT [METHOD ...]     (default: msf jigsaw rotnet mae)
# badencoder and compress_defense need ENCODER=<checkpoint.pt> (e.g. a quickstart's clean/checkpoint.pt); badencoder
# takes the list's first image as its reference and poison.py's HTBA trigger TRIGGER=<trigger.png>.
# For each METHOD: scripts/step_bench.py (the model step alone) and the trainer itself, one after the other, with the
# quickstart's flags and --epochs 3; images/s is the mean of epochs 2-3 of each log.jsonl. Writes OUT/ratios.md.
set -euo pipefail
LIST=${1:?usage: bash scripts/bench_step_ratio.sh LIST OUT [METHOD ...]}
OUT=${2:?usage: bash scripts/bench_step_ratio.sh LIST OUT [METHOD ...]}
shift 2
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
COMMON="--workers 0 --save-every 100 --epochs 3"
head -n 1 "$LIST" > "$OUT.reference.txt"
flags() {
  case $1 in
    badencoder) echo "--image-size 32 --batch-size 32 --lr 0.01 --encoder $ENCODER --reference-list $OUT.reference.txt \
                      --trigger $TRIGGER --trigger-location random" ;;
    compress_defense) echo "--batch-size 32 --milestones 2 --alpha 0.99 --teacher $ENCODER" ;;
    moco)   echo "--image-size 32 --batch-size 128 --queue-size 128 --m 0.99" ;;
    byol)   echo "--image-size 32 --batch-size 128 --warmup-iters 36 --drop" ;;
    msf)    echo "--image-size 32 --batch-size 128 --bank-size 384" ;;
    jigsaw) echo "--image-size 32 --batch-size 64 --num-perms 100" ;;
    rotnet) echo "--image-size 32 --batch-size 64" ;;
    mae)    echo "--image-size 32 --batch-size 128 --patch-size 4 --width 128 --depth 4 --heads 4 --decoder-width 64 --decoder-depth 2 \
                  --decoder-heads 4 --blr 2e-3 --warmup-epochs 1" ;;
  esac
}
rate() { python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if 'images_per_s' in l]; print(round(sum(x['images_per_s'] for x in r[1:]) / len(r[1:])))" "$1/log.jsonl"; }
echo "| trainer | model step images/s | whole run images/s | whole run / model step |" > "$OUT/ratios.md"
echo "|---|---|---|---|" >> "$OUT/ratios.md"
for M in "${@:-msf jigsaw rotnet mae}"; do
  for M1 in $M; do
    rm -rf "$OUT/$M1-step" "$OUT/$M1-run"
    python3 scripts/step_bench.py "$M1" --train-list "$LIST" --out "$OUT/$M1-step" $COMMON $(flags "$M1") > /dev/null 2>&1
    python3 "$M1.py" --train-list "$LIST" --out "$OUT/$M1-run" $COMMON $(flags "$M1") > /dev/null 2>&1
    s=$(rate "$OUT/$M1-step"); w=$(rate "$OUT/$M1-run")
    echo "| $M1 | $s | $w | $(python3 -c "print(f'{$w / $s:.2f}')") |" | tee -a "$OUT/ratios.md"
  done
done
echo "$(lscpu | grep 'Model name' | sed 's/  */ /g'), $(nproc) cores" >> "$OUT/ratios.md"
