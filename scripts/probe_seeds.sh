#!/usr/bin/env bash
# Does a run's verdict hang on the linear probe's seed? Each run's clean and backdoored model probed again at several
# seeds with its own probe's settings (lists, protocol, layer: run<r>/poisoned/probe/metrics.json), then the table.
#   bash scripts/probe_seeds.sh OUT [SEEDS]     OUT: a RUNS=N folder of scripts/quickstart.sh; SEEDS default "0 1 2 3 4"
# Writes OUT/run<r>/probe_seeds/{clean,poisoned}/s<k>/ (linear_probe.py's outputs) and prints
# `python scripts/tables.py probes OUT`. Probes that exist are skipped. RUNS=N bash scripts/quickstart.sh makes seeds
# 0-4 itself (the runs table's verdict needs all five); this script adds them to a folder made without, or other seeds.
set -euo pipefail
OUT=${1:?usage: bash scripts/probe_seeds.sh OUT [SEEDS]}
SEEDS=${2:-0 1 2 3 4}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
if ! compgen -G "$OUT/run*/poisoned/probe/metrics.json" > /dev/null; then
  echo "probe_seeds.sh: $OUT: no run<r>/poisoned/probe/metrics.json (the output of RUNS=N bash scripts/quickstart.sh)" >&2
  exit 2
fi
for R in "$OUT"/run*; do
  [ -f "$R/poisoned/probe/metrics.json" ] || continue  # a run without its own probe is not done
  read -r LIST VAL PATCHED PROTOCOL LAYER < <("$PY" -c 'import json, sys; a = json.load(open(sys.argv[1]))["args"]
print(*(a[k] for k in ("train_list", "val_list", "val_patched_list", "protocol", "layer")))' "$R/poisoned/probe/metrics.json")
  for KIND in clean poisoned; do
    for S in $SEEDS; do
      D="$R/probe_seeds/$KIND/s$S"
      [ -f "$D/metrics.json" ] || "$PY" linear_probe.py --encoder "$R/$KIND/checkpoint.pt" --train-list "$LIST" \
        --val-list "$VAL" --val-patched-list "$PATCHED" --layer "$LAYER" --seed "$S" \
        --protocol "$PROTOCOL" --workers 0 --out "$D" > /dev/null
    done
  done
done
"$PY" scripts/tables.py probes "$OUT"
