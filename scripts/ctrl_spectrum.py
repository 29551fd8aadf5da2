"""What RandomResizedCrop does to CTRL's frequency trigger: the trigger as the trainer sees it, in the DCT domain.

CTRL adds its magnitude at the DCT coefficients (15,15) and (31,31) of U and V in every 32x32 window of the image
(poison.py --trigger ctrl). Train images are poisoned at native resolution and then randomly cropped and resized by the
trainer, which rescales the trigger's frequencies; the patched val crops get it at exactly those positions. For each
poisoned train image and its clean original, the same random resized crops (torchvision's RandomResizedCrop(size,
scale), bicubic, as byol.py and moco.py on the host) are taken; the 2-D DCT of the crops' U and V, poisoned minus
clean, is the trigger the model sees. Printed for the train crops and for the patched val crops:
  - at CTRL's positions: the mean difference (the magnitude where the trigger arrives intact) and the share of the
    difference's energy there;
  - the coefficient with the largest mean |difference| (where the trigger went instead).
  python scripts/ctrl_spectrum.py DATA [--size 32] [--crops 8] [--images 64] [--seed 0] [--out spectrum.json]
"""
import argparse
import importlib.util
import json
import os

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

spec = importlib.util.spec_from_file_location("poison", os.path.join(os.path.dirname(__file__), "..", "poison.py"))
poison = importlib.util.module_from_spec(spec)
spec.loader.exec_module(poison)


def uv_dct(img):
    """The 2-D DCT of a size x size uint8 RGB crop's U and V (poison.py's YUV and DCT), shape (n, n, 2)."""
    a = np.asarray(img.convert("RGB"), np.float64)
    return poison.window_dct(a @ poison.RGB2YUV.T)[..., list(poison.CTRL_CHANNELS)]


def summary(diffs, magnitude):
    """diffs: (N, n, n, 2) DCT differences, poisoned minus clean."""
    at = [diffs[:, i, j, :] for i, j in poison.CTRL_POSITIONS]
    energy = (diffs ** 2).sum(axis=(1, 2, 3))
    share = sum((d ** 2).sum(axis=1) for d in at) / np.maximum(energy, 1e-12)
    mean_abs = np.abs(diffs).mean(axis=(0, 3))
    peak = np.unravel_index(mean_abs.argmax(), mean_abs.shape)
    return {"n": len(diffs), "magnitude": magnitude,
            "mean_at_positions": {f"{i},{j}": float(d.mean()) for (i, j), d in zip(poison.CTRL_POSITIONS, at)},
            "energy_share_at_positions_pct": float(100 * share.mean()),
            "peak": [int(peak[0]), int(peak[1])], "peak_mean_abs": float(mean_abs[peak])}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="a poison.py --trigger ctrl output folder")
    p.add_argument("--size", type=int, default=32, help="the trainer's --image-size (one 32 px window at the demo)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.2, 1.0), help="RandomResizedCrop's scale (byol.py, moco.py)")
    p.add_argument("--crops", type=int, default=8, help="random crops per poisoned train image")
    p.add_argument("--images", type=int, default=64, help="poisoned train images (and patched val images) to use")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the summary as JSON")
    args = p.parse_args()
    meta = json.load(open(os.path.join(args.data, "poison.json")))
    if meta["trigger"]["family"] != "ctrl":
        raise SystemExit(f"ctrl_spectrum.py: error: {args.data}/poison.json: trigger '{meta['trigger']['kind']}' is not ctrl")
    if args.size != poison.CTRL_WINDOW:
        raise SystemExit(f"ctrl_spectrum.py: error: --size {args.size}: only one {poison.CTRL_WINDOW} px window is analysed")
    magnitude = meta["trigger"]["magnitude"]

    def lines(name):
        return [os.path.join(args.data, ln.split()[0]) if not ln.startswith("/") else ln.split()[0]
                for ln in open(os.path.join(args.data, name)) if ln.strip()]

    torch.manual_seed(args.seed)
    crop = T.RandomResizedCrop(args.size, scale=tuple(args.scale), interpolation=T.InterpolationMode.BICUBIC)
    pairs = [(q, c) for q, c in zip(lines("train_poisoned.txt"), lines("train_clean.txt")) if q != c][: args.images]
    train = []
    for q, c in pairs:
        q, c = Image.open(q).convert("RGB"), Image.open(c).convert("RGB")
        for _ in range(args.crops):
            i, j, h, w = crop.get_params(q, crop.scale, crop.ratio)
            train.append(uv_dct(T.functional.resized_crop(q, i, j, h, w, [args.size] * 2, crop.interpolation)) -
                         uv_dct(T.functional.resized_crop(c, i, j, h, w, [args.size] * 2, crop.interpolation)))
    val = []
    for q, c in list(zip(lines("val_patched.txt"), lines("val_clean.txt")))[: args.images]:
        c = Image.open(c).convert("RGB")
        if meta["val_geometry"] != "native":
            c = poison.center_crop(c, meta["val_resize"], meta["val_crop"])
        val.append(uv_dct(Image.open(q)) - uv_dct(c))
    out = {"train_crops": summary(np.stack(train), magnitude), "val_patched": summary(np.stack(val), magnitude),
           "args": vars(args)}
    for name, s in (("train crops", out["train_crops"]), ("patched val", out["val_patched"])):
        at = ", ".join(f"({k}) {v:+.1f}" for k, v in s["mean_at_positions"].items())
        print(f"{name:12s}: {s['n']} crops; mean DCT difference at {at} (magnitude {s['magnitude']:g}); "
              f"{s['energy_share_at_positions_pct']:.1f}% of its energy there; largest mean |difference| "
              f"{s['peak_mean_abs']:.1f} at ({s['peak'][0]},{s['peak'][1]})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
