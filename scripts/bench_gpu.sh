#!/usr/bin/env bash
# The data path at ImageNet scale on one GPU, in about two minutes: moco.py and byol.py at 224 px, batch 256, on 300-500
# px JPEGs (tests/make_jpegs.py; 6,000 made, 5,400 in the list: 21 steps per epoch), every CPU core a loader worker.
# Per method: the whole run's images/s (last epoch of 3), the model step alone (scripts/step_bench.py: a real batch
# replayed, no colour ops, bf16), their ratio, and the peak GPU memory; written to OUT/summary.json and OUT/summary.md.
#   bash scripts/bench_gpu.sh OUT    environment: PYTHON=python3 N=6000 EPOCHS=3 WORKERS=$(nproc) SIZE=224 BATCH=256
# (a CPU smoke test of the script itself: N=300 SIZE=32 BATCH=64 EPOCHS=2 bash scripts/bench_gpu.sh /tmp/b)
set -euo pipefail
OUT=${1:?usage: bash scripts/bench_gpu.sh OUT}
PY=${PYTHON:-python3}
N=${N:-6000}
EPOCHS=${EPOCHS:-3}
WORKERS=${WORKERS:-$(nproc)}
SIZE=${SIZE:-224}
BATCH=${BATCH:-256}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if [ ! -f "$OUT/jpegs/train.txt" ]; then  # in parallel: one part per core, each with its own seed
  $PY - "$OUT/jpegs" "$N" "$WORKERS" <<'PY'
import multiprocessing as mp, os, sys
sys.path.insert(0, "tests")
from make_jpegs import make_jpegs
root, n, parts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with mp.Pool(parts) as pool:
    pool.starmap(make_jpegs, [(f"{root}/part{k}", n // parts, 10, k) for k in range(parts)])
paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".JPEG") and "/train/" in d + "/")
with open(f"{root}/train.txt", "w") as f:
    f.writelines(f"{os.path.relpath(p, root)} 0\n" for p in paths)
print(f"bench_gpu.sh: {len(paths)} train JPEGs in {root}")
PY
fi
LIST="$OUT/jpegs/train.txt"
COMMON="--train-list $LIST --image-size $SIZE --batch-size $BATCH --workers $WORKERS --epochs $EPOCHS --save-every 1000 --amp"
for M in moco byol; do
  FLAGS=""
  [ "$M" = moco ] && FLAGS="--queue-size $(( 65536 / BATCH * BATCH ))"
  rm -rf "$OUT/$M" "$OUT/${M}_step"
  $PY $M.py $COMMON $FLAGS --out "$OUT/$M" > "$OUT/$M.out" 2> "$OUT/$M.err" || echo "bench_gpu.sh: $M.py failed"
  $PY scripts/step_bench.py $M $COMMON $FLAGS --out "$OUT/${M}_step" > "$OUT/${M}_step.out" 2> "$OUT/${M}_step.err" \
    || echo "bench_gpu.sh: step_bench.py $M failed"
  tail -n 2 "$OUT/$M.out" "$OUT/${M}_step.out"
done
$PY - "$OUT" "$SIZE" "$BATCH" <<'PY'
import json, os, sys
out, rows = sys.argv[1], []
last = lambda d: [json.loads(l) for l in open(os.path.join(out, d, "log.jsonl")) if '"images_per_s"' in l][-1]
start = lambda d: json.loads(open(os.path.join(out, d, "log.jsonl")).readline())
for m in ("moco", "byol"):
    try:
        whole, step = last(m), json.load(open(os.path.join(out, f"{m}_step", "step_bench.json")))
    except (OSError, IndexError, ValueError) as e:
        rows.append({"method": m, "error": str(e)})
        continue
    rows.append({"method": m, "whole_run_images_per_s": whole["images_per_s"], "peak_gpu_mib": whole["peak_gpu_mib"],
                 "model_step_images_per_s": step["model_step_images_per_s"],
                 "ratio": whole["images_per_s"] / step["model_step_images_per_s"], "cache": start(m).get("cache"),
                 "workers": start(m)["args"]["workers"], "images": start(m)["images"]})
import torch
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
json.dump({"device": device, "cpu_cores": os.cpu_count(), "rows": rows}, open(os.path.join(out, "summary.json"), "w"), indent=1)
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(f"{device}, {os.cpu_count()} CPU cores; {sys.argv[2]} px, batch {sys.argv[3]}, bf16, last epoch\n\n"
            "| method | model step images/s | whole run images/s | ratio | peak GPU MiB | workers |\n|---|---|---|---|---|---|\n")
    for r in rows:
        if "error" in r:
            f.write(f"| {r['method']} | error: {r['error']} | | | | |\n")
        else:
            f.write(f"| {r['method']} | {r['model_step_images_per_s']:.0f} | {r['whole_run_images_per_s']:.0f} | "
                    f"{r['ratio']:.2f} | {r['peak_gpu_mib'] or 0:.0f} | {r['workers']} |\n")
print(open(os.path.join(out, "summary.md")).read())
PY
