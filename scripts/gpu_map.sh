#!/usr/bin/env bash
# One GPU call: the demo regime map (scripts/settings/gpu_map.txt), its summary and the runs' small files into OUT.
#   bash scripts/gpu_map.sh OUT [LIMIT seconds, default 480]
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_map.sh OUT [LIMIT]}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 LIMIT=${2:-480}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)"
TARGETS="crosses stripes_diagonal" bash scripts/sweep.sh scripts/settings/gpu_map.txt runs/gpu_map > /dev/null
cp runs/gpu_map/summary.md "$OUT/"
tar czf "$OUT/gpu_map.tar.gz" --exclude='*.pt' --exclude='demo_data' --exclude='train_poisoned' --exclude='val_patched' runs/gpu_map
tail -n 3 runs/gpu_map/knobs/*.log | cut -c1-300
