#!/usr/bin/env bash
# poison.py throughput with 1 and 2 worker processes: on the demo data, and on a folder of JPEGs of 300-500 px
# (ImageNet-like sizes) written by tests/make_jpegs.py.   bash scripts/bench_poison.sh [OUT] (N=2000 JPEGs)
set -euo pipefail
OUT=${1:-runs/bench_poison}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
[ -d "$OUT/jpegs" ] || $PY tests/make_jpegs.py "$OUT/jpegs" --n "${N:-2000}"
for W in 1 2; do
  for MODE in "demo" "jpeg targeted" "jpeg untargeted"; do
    set -- $MODE
    FLAGS="--workers $W"  # the demo data is generated, then poisoned; the JPEG runs only poison
    [ "$1" = jpeg ] && FLAGS="$FLAGS --data-root $OUT/jpegs --target 0 --mode ${2} --rate $([ "$2" = targeted ] && echo 0.5 || echo 0.1)"
    start=$(date +%s.%N)
    $PY poison.py --out "$OUT/out" --overwrite $FLAGS 2>&1 | tail -n 1
    echo "  -> wall time $(echo "$(date +%s.%N) - $start" | bc) s (workers $W, $MODE, incl. interpreter start)"
  done
done
