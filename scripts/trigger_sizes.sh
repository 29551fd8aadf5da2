#!/usr/bin/env bash
# The clean model's side of the paper's pattern, per trigger side: how much accuracy a model loses when the trigger is
# pasted on val images, and how many patched images of other classes it sends to the target. In the paper (MoCo v2,
# ImageNet-100) the clean model loses 3 points and its patched FP equals its clean FP; a trigger that costs a clean
# model much more works like a class of its own, whatever the poisoning does.
#   bash scripts/trigger_sizes.sh MODEL DATA OUT [SIZES]
# MODEL: a pre-trained model folder (MODEL/checkpoint.pt, e.g. a quickstart's clean model); DATA: the poison.py folder
# whose target, trigger, seeds and data flags are kept (only --trigger-size changes); SIZES: default "6 8 10 12 14".
# Per size S: OUT/t<S>/data (poison.py), OUT/t<S>/probe (linear_probe.py --protocol demo on DATA's 10% labeled list;
# LAYER=layer3 for jigsaw and rotnet models), their logs beside; OUT/sizes.md: the table. Existing steps are skipped.
set -euo pipefail
MODEL=${1:?usage: bash scripts/trigger_sizes.sh MODEL DATA OUT [SIZES]}
DATA=${2:?usage: bash scripts/trigger_sizes.sh MODEL DATA OUT [SIZES]}
OUT=${3:?usage: bash scripts/trigger_sizes.sh MODEL DATA OUT [SIZES]}
SIZES=${4:-6 8 10 12 14}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
[ -f "$MODEL/checkpoint.pt" ] || { echo "trigger_sizes.sh: $MODEL/checkpoint.pt: no such checkpoint" >&2; exit 2; }
[ -f "$DATA/poison.json" ] || { echo "trigger_sizes.sh: $DATA/poison.json: not a poison.py folder" >&2; exit 2; }
# DATA's poison.py flags, but for the output and the trigger side
read -ra FLAGS <<< "$($PY -c '
import json, sys
a = json.load(open(sys.argv[1]))["args"]
skip = {"out", "overwrite", "reuse", "workers", "trigger_size"}
flags = []
for k, v in a.items():
    if k in skip or v is None or isinstance(v, bool):
        continue
    flags += ["--" + k.replace("_", "-")] + [str(x) for x in (v if isinstance(v, list) else [v])]
print(" ".join(flags))' "$DATA/poison.json")"
mkdir -p "$OUT"
for S in $SIZES; do
  D="$OUT/t$S"
  mkdir -p "$D"
  $PY poison.py --out "$D/data" --reuse "${FLAGS[@]}" --trigger-size "$S" > "$D/poison.log" 2>&1 ||
    { tail -1 "$D/poison.log" >&2; exit 1; }
  [ -f "$D/probe/metrics.json" ] || $PY linear_probe.py --encoder "$MODEL/checkpoint.pt" \
    --train-list "$D/data/train_labeled_10pct.txt" --val-list "$D/data/val_clean.txt" \
    --val-patched-list "$D/data/val_patched.txt" --layer "${LAYER:-final}" --seed 0 --protocol demo --workers 0 \
    --out "$D/probe" > "$D/probe.log" 2>&1 || { tail -1 "$D/probe.log" >&2; exit 1; }
done
$PY - "$OUT" $SIZES <<'EOF' | tee "$OUT/sizes.md"
import json, os, sys
out, sizes = sys.argv[1], sys.argv[2:]
print("| trigger side px | % of the val crop | clean Acc | patched Acc | accuracy lost | clean FP | patched FP | "
      "patched FP / clean FP |")
print("|---|---|---|---|---|---|---|---|")
for s in sizes:
    m = json.load(open(os.path.join(out, f"t{s}", "probe", "metrics.json")))
    p = json.load(open(os.path.join(out, f"t{s}", "data", "poison.json")))
    ratio = f"{m['fp_patched'] / m['fp_clean']:.1f}" if m["fp_clean"] else "-"
    print(f"| {s} | {100 * int(s) ** 2 / p['val_crop'] ** 2:.0f} | {m['acc_clean']:.1f} | {m['acc_patched']:.1f} | "
          f"{m['acc_clean'] - m['acc_patched']:.1f} | {m['fp_clean']} | {m['fp_patched']} | {ratio} |")
print(f"\nTarget {m['target']} '{m['target_name']}'; FP of {m['n_patched_nontarget']} non-target val images; "
      f"the model's epoch {m.get('encoder_epoch')}; one probe per size (seed 0).")
EOF
