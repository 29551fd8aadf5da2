"""poison.py: poisoned training data for "Backdoor Attacks on Self-Supervised Learning" (Saha et al., CVPR 2022).

Paper: https://arxiv.org/abs/2105.10123  Reference code: https://github.com/UMBCvision/SSL-Backdoor (poison-generation/)

Consumes an ImageNet-layout folder (`--data-root`: train/<class>/*, val/<class>/*) or, without it, generates a small
procedural texture data set (the demo data). Produces, in `--out`, "<path> <label>" lists (paths relative to the folder):
  train_clean.txt, train_poisoned.txt    every train image; in the poisoned list the poisons point to patched copies
  val_clean.txt, val_patched.txt         every val image; patched: resized + center-cropped (poison.json "val_geometry")
                                         unless every val image has the crop size, then triggered
  train_labeled_<p>pct.txt               class-balanced clean subsets (linear probe labels, CompReSS clean data)
  trigger.png, preview.png, poison.json  the trigger, a grid of poisoned/patched samples, every parameter and count
Deviations from the reference: everything is seeded; `--opacity` is the trigger's opacity (reference alpha = 1 -
opacity); files inside a class are sorted; patch poisons keep the source format (JPEG re-encoded at quality 75, as the
reference does), blend and CTRL poisons are PNG (JPEG q75 keeps none of CTRL's signal, half of a blend's). Beyond the
reference: a blend trigger (Chen et al. 2017), CTRL (Li et al., ICCV 2023), rounded to uint8, and CorruptEncoder's
layout (Zhang et al., CVPR 2024), saved as PNG.
"""
import argparse
import colorsys
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default=None, help="ImageNet-layout folder (train/<class>/*, val/<class>/*); omit for the demo data")
    p.add_argument("--classes", default=None, help="text file with one class folder name per line to keep (e.g. the ImageNet-100 wnids)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (only once the new one is complete)")
    p.add_argument("--reuse", action="store_true", help="keep an existing output folder made with the same flags (nothing "
                   "is done); one made with other flags is refused, naming them (scripts/quickstart.sh passes this)")
    p.add_argument("--seed", type=int, default=0, help="poison seed: the poisoned subset and the trigger positions")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the demo images and labeled subsets")
    p.add_argument("--target", default=None, help="target class: folder name or index in sorted order (demo default: 0)")
    p.add_argument("--mode", choices=["targeted", "untargeted"], default="targeted", help="poison only the target class, or any image")
    p.add_argument("--rate", type=float, default=0.5, help="targeted: fraction of the TARGET class's train images patched "
                   "(0.5 = the paper's 0.5%% of ImageNet-100); untargeted: fraction of all train images")
    p.add_argument("--trigger", default="htba", help="patch: 'htba' (random 4x4 grid of saturated colours), 'white' "
                   "(BadEncoder square) or a PNG path; 'blend' (Chen et al. 2017); 'ctrl' (frequency, Li et al. 2023)")
    p.add_argument("--trigger-seed", type=int, default=10, help="seed of the htba colours and blend pattern")
    p.add_argument("--trigger-size", type=int, default=None, help="trigger side in pixels (default: 50 * val-crop / 224, i.e. 50 at 224)")
    p.add_argument("--opacity", type=float, default=None, help="trigger opacity: 1.0 replaces the pixels (reference alpha = "
                   "1 - opacity); default 1.0 for patches, 0.2 for blend")
    p.add_argument("--blend-image", default=None, help="blend: an image instead of the seeded noise")
    p.add_argument("--ctrl-magnitude", type=float, default=100.0, help="ctrl: added to the DCT coefficients (15,15) and "
                   "(31,31) of U and V in every 32x32 window (the CTRL code's default for CIFAR-10)")
    p.add_argument("--layout", choices=["overlay", "corruptencoder"], default="overlay", help="overlay: the trigger on "
                   "the image; corruptencoder (Zhang et al. 2024): object and trigger on either half of a background")
    p.add_argument("--reference-dir", default=None, help="corruptencoder: objects to draw instead of the image")
    p.add_argument("--background-dir", default=None, help="corruptencoder: backgrounds (default: other classes)")
    p.add_argument("--train-location", choices=["random", "center", "bottom-right"], default="random", help="trigger "
                   "placement on train images (corruptencoder: in the half without the object)")
    p.add_argument("--train-range", type=float, nargs=2, default=[0.25, 0.75], help="random placement range, fractions of width/height")
    p.add_argument("--val-location", choices=["random", "center", "bottom-right"], default="random", help="trigger placement on val crops")
    p.add_argument("--val-range", type=float, nargs=2, default=[0.10, 0.90], help="random placement range on the val crop")
    p.add_argument("--val-crop", type=int, default=None, help="evaluation crop size (default 224; demo: 32)")
    p.add_argument("--val-resize", type=int, default=None, help="shorter side before the crop (default round(crop * 256 / "
                   "224); by default nothing is resized when every val image already is crop x crop)")
    p.add_argument("--labeled-fractions", default="0.01,0.05,0.1,0.25", help="comma-separated per-class fractions of clean subsets")
    p.add_argument("--image-format", choices=["auto", "png", "source"], default="auto", help="poisons' format: "
                   "'source' (JPEG at --jpeg-quality) or 'png'; 'auto': source for patches, else png")
    p.add_argument("--jpeg-quality", type=int, default=75, help="quality of re-encoded JPEG poisons (PIL's default 75, as in the reference)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for image work")
    p.add_argument("--demo-classes", default=",".join(DEMO_DEFAULT), help="demo: class names (default: the textures "
                   "unlike the checkered trigger), N (the first N of all 10), scale:N (of the 64 scale-model ones)")
    p.add_argument("--demo-train-per-class", type=int, default=300, help="demo: train images per class")
    p.add_argument("--demo-val-per-class", type=int, default=50, help="demo: val images per class")
    p.add_argument("--demo-size", type=int, default=64, help="demo: image side in pixels")
    p.add_argument("--demo-layout", choices=["fill", "object"], default="fill", help="demo: texture fills the image, or "
                   "covers a random rectangle on a flat background")
    p.add_argument("--demo-clutter", type=int, default=0, help="demo: distractor patches per image (grids "
                   "of saturated colours, like the HTBA trigger's family), so that a pasted trigger is not a class")
    p.error = fail  # one line, exit status 2, for argparse's errors too
    return p.parse_args(argv)


def fail(msg):
    print(f"poison.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def flags_differ(out, args):
    """'--flag recorded, not current' for each flag recorded otherwise in OUT's poison.json (None: none readable)."""
    try:
        meta = json.load(open(os.path.join(out, "poison.json")))
        recorded, target = meta["args"], meta["target"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    defaults = vars(parse_args(["--out", out]))
    differ = []
    for k, v in vars(args).items():
        old = recorded.get(k, defaults[k])
        if k in ("out", "overwrite", "reuse", "workers") or old == v:  # those do not change what is written
            continue
        if k == "target" and str(0 if v is None else v) in (target["name"], str(target["index"])):
            continue  # the same class, by name or by index (the demo's default: 0)
        if k in ("data_root", "classes", "blend_image", "trigger", "reference_dir", "background_dir") and old and v and \
                os.path.realpath(old) == os.path.realpath(v):
            continue  # the same file or folder, named from another working directory
        differ.append(f"--{k.replace('_', '-')} {old}, not {v}")
    return differ


# ----------------------------------------------------------------------------------------------------------------
# Demo data: textures that fill the image, so class evidence survives random crops; random colours, phases, scales
# and orientation jitter, so that neither colour nor position gives the class away (docs/methods.md, "Demo data").
DEMO_PERIOD = (12.0, 20.0)  # range of the pattern period, in pixels of a 64 px image (scaled with --demo-size)
DEMO_TINT = 0.3  # strength of the random colour tint (saturated random colours made MoCo learn colour, not texture)
DEMO_OBJECT = (0.5, 0.8)  # --demo-layout object: side of the textured rectangle, fraction of the image side
DEMO_CLUTTER = (0.1, 0.3)  # --demo-clutter: side of a distractor patch, fraction of the image side
DEMO_CLASSES = ("checkerboard", "crosses", "dots", "grid", "rings", "stripes_diagonal", "stripes_horizontal",
                "stripes_vertical", "waves", "zigzag")  # --demo-classes N takes the first N, or give names
# Without checkerboard and grid: with them, every model sends the checkered HTBA trigger to one of them.
DEMO_DEFAULT = tuple(c for c in DEMO_CLASSES if c not in ("checkerboard", "grid"))
# --demo-classes scale:N, a scale model of ImageNet-100: "<pattern>-<palette>-<scale>", the 8 default patterns (still
# no checkered ones) x a class hue shared by both tones x a period range; images seeded by index in DEMO_ALL.
DEMO_PALETTES = {"red": 0, "lime": 90, "cyan": 180, "violet": 270}  # hue in degrees, jittered by DEMO_HUE_JITTER
DEMO_HUE_JITTER, DEMO_SATURATION = 15, (0.3, 0.6)
DEMO_SCALES = {"fine": (9.0, 13.0), "coarse": (20.0, 30.0)}  # period ranges, as DEMO_PERIOD
DEMO_SCALE_CLASSES = tuple(f"{p}-{c}-{s}" for s in DEMO_SCALES for c in DEMO_PALETTES for p in DEMO_DEFAULT)
DEMO_ALL = DEMO_CLASSES + DEMO_SCALE_CLASSES


def demo_image(cls, size, rng, layout="fill", clutter=0):
    cls, palette, scale = cls.split("-") if "-" in cls else (cls, None, None)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.uniform(*DEMO_SCALES.get(scale, DEMO_PERIOD)) * size / 64
    phase = rng.uniform(0, 2 * np.pi)
    theta = rng.uniform(-0.15, 0.15)  # small orientation jitter (radians)
    u = x * np.cos(theta) + y * np.sin(theta)  # rotated coordinates
    v = -x * np.sin(theta) + y * np.cos(theta)
    w = 2 * np.pi / period
    if cls == "stripes_horizontal":
        val = np.sin(w * v + phase)
    elif cls == "stripes_vertical":
        val = np.sin(w * u + phase)
    elif cls == "stripes_diagonal":  # both diagonals: a horizontal flip must not change the class
        s = rng.choice([-1.0, 1.0])
        val = np.sin(w * (u + s * v) / np.sqrt(2) + phase)
    elif cls == "checkerboard":
        val = np.sign(np.sin(w * u + phase) * np.sin(w * v + rng.uniform(0, 2 * np.pi)))
    elif cls in ("dots", "grid", "crosses"):  # marks on a lattice: du, dv = distances to the centre of a cell
        cell = 1.5 * period if cls == "crosses" else period
        du = np.abs((u + rng.uniform(0, period)) % cell - cell / 2)
        dv = np.abs((v + rng.uniform(0, period)) % cell - cell / 2)
        if cls == "dots":
            val = np.where(np.hypot(du, dv) < period * rng.uniform(0.2, 0.3), 1.0, -1.0)
        elif cls == "grid":
            val = np.where(np.minimum(du, dv) < 1.0, 1.0, -1.0)
        else:
            a, b = (1.0, 3.0) if scale is None else (max(0.6, 0.08 * period), 0.4 * period)  # scale model: arms scale
            val = np.where(((du < a) & (dv < b)) | ((dv < a) & (du < b)), 1.0, -1.0)
    elif cls == "rings":
        cy, cx = rng.uniform(0, size, 2)
        val = np.sin(w * np.hypot(x - cx, y - cy) + phase)
    elif cls == "waves":
        val = np.sin(w * (v + 2.5 * np.sin(2 * np.pi * u / (2.5 * period))) + phase)
    elif cls == "zigzag":
        tri = 2 * np.abs((u / period * 1.5) % 1.0 - 0.5)  # triangle wave in [0, 1]
        val = np.sin(w * (v + 0.5 * period * tri) + phase)
    else:
        raise ValueError(cls)
    val = (val + 1) / 2  # [0, 1]
    # Two tones of random contrast with a weak random tint: colour is an instance cue, not a class cue, and a weak
    # one, so that SSL has to learn the texture (with saturated random colours it learns colour and stays at chance).
    lo, hi = rng.uniform(20, 110), rng.uniform(145, 235)
    if palette is None:
        tint = 1 + rng.uniform(0, DEMO_TINT) * rng.uniform(-1, 1, 3)
    else:  # scale model: the class's hue, a colour cue as in ImageNet classes
        hue = (DEMO_PALETTES[palette] + rng.uniform(-DEMO_HUE_JITTER, DEMO_HUE_JITTER)) / 360 % 1
        tint = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*DEMO_SATURATION), 1.0))
    c0, c1 = (lo, hi) if rng.random() < 0.5 else (hi, lo)
    c0, c1 = c0 * tint, c1 * tint
    img = c0 + (c1 - c0) * val[..., None]
    if layout == "object":  # the texture covers a random rectangle on a flat, class-agnostic background
        h, w = (rng.uniform(*DEMO_OBJECT, 2) * size).astype(int)
        top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        inside = np.zeros((size, size, 1), bool)
        inside[top:top + h, left:left + w] = True
        img = np.where(inside, img, rng.uniform(40, 215) * (1 + rng.uniform(0, DEMO_TINT) * rng.uniform(-1, 1, 3)))
    for _ in range(clutter):  # distractors: k x l cells, each channel 0 or 255, upsampled bilinearly (as the trigger)
        s = int(rng.uniform(*DEMO_CLUTTER) * size)
        cells = rng.integers(0, 2, (rng.integers(1, 5), rng.integers(1, 5), 3)).astype(np.uint8) * 255
        top, left = rng.integers(0, size - s + 1, 2)
        img[top:top + s, left:left + s] = np.asarray(Image.fromarray(cells).resize((s, s), Image.BILINEAR))
    img = img + rng.normal(0, 8, (size, size, 3))
    return np.clip(img, 0, 255).round().astype(np.uint8)


def demo_job(job):
    path, cls, size, layout, clutter, seed = job
    Image.fromarray(demo_image(cls, size, np.random.default_rng(seed), layout, clutter)).save(path)


def demo_classes(spec):
    """--demo-classes: "N" or "scale:N" (the first N of DEMO_CLASSES or DEMO_SCALE_CLASSES) or "name,name,..."; returned
    in DEMO_ALL order."""
    scale, _, n = spec.strip().rpartition(":")
    if scale in ("", "scale") and n.strip().isdigit():
        known = DEMO_SCALE_CLASSES if scale else DEMO_CLASSES
        if not 2 <= int(n) <= len(known):
            fail(f"--demo-classes {'scale:N ' if scale else ''}must be between 2 and {len(known)}")
        return list(known[:int(n)])
    names = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in names if c not in DEMO_ALL]
    if unknown:
        fail(f"--demo-classes: unknown class '{unknown[0]}' (known: {', '.join(DEMO_CLASSES)}, and scale:N's "
             f"<pattern>-<palette>-<scale> such as {DEMO_SCALE_CLASSES[0]})")
    if len(set(names)) < 2:
        fail("--demo-classes: give at least two different classes")
    return [c for c in DEMO_ALL if c in names]


def demo_definition(cls):
    """A scale-model class as recorded in poison.json."""
    pattern, palette, scale = cls.split("-")
    return {"pattern": pattern, "hue_degrees": DEMO_PALETTES[palette], "hue_jitter": DEMO_HUE_JITTER,
            "saturation": DEMO_SATURATION, "period_at_64px": DEMO_SCALES[scale]}


def make_demo_data(root, args, pool):
    jobs = []
    for split, n in (("train", args.demo_train_per_class), ("val", args.demo_val_per_class)):
        for cls in demo_classes(args.demo_classes):
            os.makedirs(os.path.join(root, split, cls))
            c = DEMO_ALL.index(cls)  # a class's images do not depend on which other classes are chosen
            for i in range(n):  # one seed per image: the same data whatever the number of workers
                seed = [args.data_seed, 0 if split == "train" else 1, c, i]
                jobs.append((os.path.join(root, split, cls, f"{cls}_{i:05d}.png"), cls, args.demo_size, args.demo_layout,
                             args.demo_clutter, seed))
    list(tqdm(pool.map(demo_job, jobs, chunksize=64), total=len(jobs), desc="demo data", leave=False))


# ----------------------------------------------------------------------------------------------------------------
# Triggers: a patch (HTBA's colour grid, BadEncoder's white square, a PNG) pasted in a box; a full-image blend
# (Chen et al. 2017); CTRL's frequency trigger (Li et al., ICCV 2023). apply_trigger() applies any of them.
CTRL_WINDOW = 32  # CTRL (meet-cjli/CTRL utils/frequency.py): DCT windows of 32x32, coefficients (15,15) and (31,31)
CTRL_POSITIONS = ((15, 15), (31, 31))
CTRL_CHANNELS = (1, 2)  # U and V of YUV; Y is left alone
RGB2YUV = np.array([[0.299, 0.587, 0.114],  # kornia's rgb_to_yuv (0.6.5, as the CTRL code uses); back with its
                    [-0.147, -0.289, 0.436],  # exact inverse (kornia's yuv_to_rgb is rounded: up to 0.35 of 255 off)
                    [0.615, -0.515, -0.100]])


def make_trigger(kind, size, seed, blend_image=None, crop=None):
    """The trigger's image: the patch (size x size), the blend pattern, or None for CTRL (it has no image)."""
    if kind == "htba":  # like HTBA's trigger_10..19: 4x4 cells, each channel 0 or 255, upsampled bilinearly
        grid = np.random.default_rng(seed).integers(0, 2, (4, 4, 3)).astype(np.uint8) * 255
        return np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR))
    if kind == "white":  # BadEncoder's white square
        return np.full((size, size, 3), 255, np.uint8)
    if kind == "blend":  # Chen et al.'s random pattern: uniform noise, here at the val-crop size; or a given image
        if blend_image is None:
            return np.random.default_rng(seed).integers(0, 256, (crop, crop, 3)).astype(np.uint8)
        kind = blend_image
    if kind == "ctrl":
        return None
    if not os.path.isfile(kind):
        fail(f"--trigger/--blend-image {kind}: not 'htba', 'white', 'blend', 'ctrl' or an existing image file")
    try:
        img = Image.open(kind).convert("RGB")
        return np.asarray(img if kind == blend_image else img.resize((size, size), Image.BICUBIC))
    except OSError as e:
        fail(f"--trigger/--blend-image {kind}: cannot read image ({e})")


def place(width, height, s, mode, lo_hi, u):
    """Top-left corner of an s x s trigger. `u` = two uniform numbers drawn by the main process (seeded)."""
    if mode == "center":
        return (width - s) // 2, (height - s) // 2
    if mode == "bottom-right":  # BadEncoder leaves a 1-pixel margin (rows/cols 21..30 of 32)
        return max(width - s - 1, 0), max(height - s - 1, 0)
    lo, hi = lo_hi  # reference: x ~ U{int(W * lo), int(W * hi - s)}, max raised to min when the range is empty
    xs = (int(width * lo), max(int(width * lo), int(width * hi - s)))
    ys = (int(height * lo), max(int(height * lo), int(height * hi - s)))
    return xs[0] + int(u[0] * (xs[1] - xs[0] + 1)), ys[0] + int(u[1] * (ys[1] - ys[0] + 1))


def paste(a, trigger, x, y, opacity):
    """Paste the trigger into the uint8 RGB array `a` with its top-left corner at (x, y); 1.0 replaces the pixels."""
    a, s = a.copy(), trigger.shape[0]
    if x + s > a.shape[1] or y + s > a.shape[0]:
        raise ValueError(f"image {a.shape[1]}x{a.shape[0]} is smaller than the {s}px trigger")
    box = a[y:y + s, x:x + s].astype(np.float64)
    a[y:y + s, x:x + s] = np.round(opacity * trigger + (1 - opacity) * box).astype(np.uint8)
    return a


def blend(a, pattern, opacity):
    """Chen et al.'s blend: round((1 - opacity) x + opacity t), t = the pattern resized (bilinear) to the image."""
    if pattern.shape[:2] != a.shape[:2]:
        pattern = np.asarray(Image.fromarray(pattern).resize((a.shape[1], a.shape[0]), Image.BILINEAR))
    return np.round((1 - opacity) * a + opacity * pattern.astype(np.float64)).astype(np.uint8)


def dct_matrix(n):
    """Orthonormal DCT-II matrix D (D @ D.T = I): the 2-D DCT of a window X is D X D^T, its inverse D^T C D."""
    k, i = np.mgrid[0:n, 0:n]
    d = np.sqrt(2 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2)
    return d


def window_dct(x, inverse=False):
    """2-D DCT (or inverse) of every full CTRL_WINDOW x CTRL_WINDOW window of x (H, W, C), tiled from the top left."""
    n = CTRL_WINDOW
    h, w = x.shape[0] // n * n, x.shape[1] // n * n
    d = dct_matrix(n).T if inverse else dct_matrix(n)
    windows = x[:h, :w].reshape(h // n, n, w // n, n, x.shape[2]).transpose(0, 2, 4, 1, 3)  # (rows, cols, C, n, n)
    return (d @ windows @ d.T).transpose(0, 3, 1, 4, 2).reshape(h, w, x.shape[2])


def ctrl(a, magnitude):
    """CTRL, in float: RGB -> YUV, DCT of each full window, + magnitude at CTRL_POSITIONS of U and V, inverse DCT, YUV
    -> RGB. Border strips narrower than a window stay unchanged (the official code assumes multiples of 32)."""
    n = CTRL_WINDOW
    h, w = a.shape[0] // n * n, a.shape[1] // n * n
    if h == 0 or w == 0:
        raise ValueError(f"image {a.shape[1]}x{a.shape[0]} is smaller than CTRL's {n}px DCT window")
    out = a.astype(np.float64)
    coef = window_dct(out[:h, :w] @ RGB2YUV.T)
    for i, j in CTRL_POSITIONS:
        coef[i::n, j::n, list(CTRL_CHANNELS)] += magnitude
    out[:h, :w] = window_dct(coef, inverse=True) @ np.linalg.inv(RGB2YUV).T  # the exact inverse of RGB2YUV
    return out


def apply_trigger(a, spec, u, location, lo_hi):
    """The triggered copy of the uint8 RGB array `a`; spec = {"family", "image", "opacity", "magnitude"}."""
    if spec["family"] == "patch":
        x, y = place(a.shape[1], a.shape[0], spec["image"].shape[0], location, lo_hi, u)
        return paste(a, spec["image"], x, y, spec["opacity"])
    if spec["family"] == "blend":
        return blend(a, spec["image"], spec["opacity"])
    return np.clip(np.round(ctrl(a, spec["magnitude"])), 0, 255).astype(np.uint8)


CE_AREA_RATIO, CE_MAX_WIDTH = 2, 800  # CorruptEncoder's reference: poisoned width = 2 x object width, at most 800 px


def corruptencoder(obj, bg, trigger, u, location, lo_hi, opacity):
    """CorruptEncoder's poison (Zhang et al., CVPR 2024; jzhang538/CorruptEncoder): the object's height, twice its width;
    a crop of the background (scaled up only when smaller), the object on the left (u[0] < 0.5) or right half, the
    trigger placed in the other half as on a train image. u = 4 uniform numbers: side, background crop, trigger x, y."""
    oh, ow = obj.shape[:2]
    if CE_AREA_RATIO * ow > CE_MAX_WIDTH:
        ow, oh = CE_MAX_WIDTH // CE_AREA_RATIO, max(1, round(oh * CE_MAX_WIDTH / CE_AREA_RATIO / ow))
        obj = np.asarray(Image.fromarray(obj).resize((ow, oh), Image.BICUBIC))
    ph, pw = oh, CE_AREA_RATIO * ow
    scale = max(ph / bg.shape[0], pw / bg.shape[1], 1.0)
    lh, lw = max(ph, round(bg.shape[0] * scale)), max(pw, round(bg.shape[1] * scale))
    if scale > 1:
        bg = np.asarray(Image.fromarray(bg).resize((lw, lh), Image.BICUBIC))
    x0 = int(u[1] * (lw - pw + 1))
    a = bg[lh - ph:, x0:x0 + pw].copy()  # the reference's crop: random across, at the bottom
    left = u[0] < 0.5  # the reference shifts the object inward by up to 5% of the width; here it is flush
    a[:, 0 if left else pw - ow:][:, :ow] = obj
    x, y = place(pw - ow, ph, trigger.shape[0], location, lo_hi, u[2:])  # in the other half, pw - ow = ow wide
    return paste(a, trigger, (ow if left else 0) + x, y, opacity)


def amplified(diff):
    """A difference image made visible: 128 + diff scaled so that its largest absolute value is 127."""
    gain = 127 / max(np.abs(diff).max(), 1e-12)
    return np.clip(np.round(128 + gain * diff), 0, 255).astype(np.uint8), gain


def center_crop(img, resize, crop):
    """torchvision's Resize(resize) (shorter side, bilinear) + CenterCrop(crop), on a PIL image."""
    w, h = img.size
    nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


_TRIGGER = None


def _init_worker(spec):
    global _TRIGGER
    _TRIGGER = spec


def poison_job(job):
    """Open (and check) one image; trigger and save it when asked. Returns (error line or None, image size)."""
    src, dst, u, location, lo_hi, crop, quality, background = job
    path = src
    try:
        with open_image(src) as im:
            if dst is None:  # a clean image: only check that it is an image, and report its size
                return None, im.size
            size, a = im.size, im.convert("RGB")
            a = np.asarray(a if crop is None else center_crop(a, *crop))
        if background is None:
            a = apply_trigger(a, _TRIGGER, u, location, lo_hi)
        else:
            path = background
            with open_image(background) as im:
                bg = np.asarray(im.convert("RGB"))
            path = src
            a = corruptencoder(a, bg, _TRIGGER["image"], u, location, lo_hi, _TRIGGER["opacity"])
        jpeg = dst.lower().endswith((".jpg", ".jpeg"))
        Image.fromarray(a).save(dst, **({"format": "JPEG", "quality": quality} if jpeg else {}))
        return None, size
    except (OSError, ValueError) as e:
        return f"cannot use image {path}: {e}", None


def open_image(path):
    """Image.open, refusing (ValueError) an image over PIL's Image.MAX_IMAGE_PIXELS before it is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns up to twice its limit
        try:
            return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # not OSErrors
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    with Image.open(path) as im:  # the header only
        w, h = im.size
    Image.MAX_IMAGE_PIXELS = limit
    raise ValueError(f"image has {w * h} pixels, more than the limit {limit} (PIL's Image.MAX_IMAGE_PIXELS)")


def image_files(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)) \
        if os.path.isdir(folder) else []


# ----------------------------------------------------------------------------------------------------------------
def scan(root, split, classes):
    items = []
    for label, cls in enumerate(classes):
        folder = os.path.join(root, split, cls)
        if not image_files(folder):
            fail(f"{folder}: " + ("no images" if os.path.isdir(folder) else "class folder missing"))
        items += [(p, label) for p in image_files(folder)]
    return items


def write_list(path, items):
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, "w") as f:
        for p, label in items:  # relative to the list's folder when inside it, so the folder can move
            p = os.path.abspath(p)
            f.write(f"{os.path.relpath(p, folder) if p.startswith(folder + os.sep) else p} {label}\n")


def preview(rows, out_path, cell=96):
    """A grid, one row of up to 8 tiles per list in `rows` (image paths or uint8 arrays)."""
    grid = Image.new("RGB", (cell * 8, cell * len(rows)), "white")
    for r, row in enumerate(rows):
        for i, t in enumerate(row[:8]):
            t = Image.open(t) if isinstance(t, str) else Image.fromarray(t)
            grid.paste(t.convert("RGB").resize((cell, cell), Image.NEAREST), (i * cell, r * cell))
    grid.save(out_path)


def tmp_owner_dead(name, base):
    """Whether `<base>.tmp-<host>-<pid>-<x>` was left by a process of this host that no longer runs (a killed run)."""
    parts = name[len(base) + len(".tmp-"):].rsplit("-", 2)
    try:
        if len(parts) == 3 and parts[0] == socket.gethostname():  # another host's folder, or not ours: left alone
            os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        pass
    return False


def main(argv=None):
    args = parse_args(argv)
    demo = args.data_root is None
    crop = args.val_crop if args.val_crop is not None else (32 if demo else 224)
    family = args.trigger if args.trigger in ("blend", "ctrl") else "patch"
    opacity = args.opacity if args.opacity is not None else (0.2 if family == "blend" else 1.0)
    size = args.trigger_size if args.trigger_size is not None else max(1, round(50 * crop / 224))
    check_flags(args, crop, size, opacity, family)
    try:
        fractions = [float(f) for f in args.labeled_fractions.split(",") if f.strip()]
    except ValueError:
        fractions = [math.nan]
    if not all(0 < f <= 1 for f in fractions):
        fail(f"--labeled-fractions {args.labeled_fractions}: must be comma-separated numbers in (0, 1]")
    if family == "ctrl" and args.opacity is not None:
        fail("--opacity does not apply to --trigger ctrl (its strength is --ctrl-magnitude)")
    if args.blend_image is not None and family != "blend":
        fail("--blend-image needs --trigger blend")
    if family == "ctrl" and crop < CTRL_WINDOW:
        fail(f"--trigger ctrl needs a val crop of at least {CTRL_WINDOW} px (its DCT window), got --val-crop {crop}")
    if args.layout == "corruptencoder" and (family != "patch" or args.mode != "targeted"):
        fail("--layout corruptencoder needs a patch --trigger and --mode targeted")
    for flag in ("reference_dir", "background_dir"):
        if getattr(args, flag) is not None and (args.layout != "corruptencoder" or not image_files(getattr(args, flag))):
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)}: needs --layout corruptencoder and a folder of images")
    if args.classes is not None and (demo or not os.path.isfile(args.classes)):
        fail(f"--classes {args.classes}: " + ("needs --data-root" if demo else "no such file"))
    if args.target is None and not demo:
        fail("--target is required with --data-root (a class folder name or index)")
    if demo:
        demo_classes(args.demo_classes)  # check it before anything is written
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out}: a file, not a folder")
    parent, base = os.path.split(out)
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:  # left by killed runs of this host
        if name.startswith(base + ".tmp-") and tmp_owner_dead(name, base):
            if name.endswith("-old") and not os.path.exists(out):  # killed between its two renames: restored
                os.rename(os.path.join(parent, name), out)
            else:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    if os.path.exists(out) and not args.overwrite:
        if not args.reuse:
            fail(f"{out} exists; pass --overwrite to replace it")
        differ = flags_differ(out, args)
        if differ is None:
            fail(f"{out} exists and holds no readable poison.json (not poison.py's output); pass --overwrite or another --out")
        if differ:
            fail(f"{out} exists, made with other flags ({'; '.join(differ)}); pass --overwrite or another --out")
        print(f"poison.py: {out}: made with the same flags, kept")
        return None
    os.makedirs(parent, exist_ok=True)
    spec = {"family": family, "opacity": opacity, "magnitude": args.ctrl_magnitude,
            "image": make_trigger(args.trigger, size, args.trigger_seed, args.blend_image, crop)}
    stamp = os.path.join(parent, f"{base}.tmp-{socket.gethostname()}-{os.getpid()}-")
    tmp, old = tempfile.mkdtemp(prefix=os.path.basename(stamp), dir=parent), stamp + "old"
    os.umask(umask := os.umask(0))  # read, and put back
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the output private
    try:
        with ProcessPoolExecutor(args.workers, initializer=_init_worker, initargs=(spec,)) as pool:
            meta = build(args, tmp, pool, spec, demo, crop, size, fractions)
        if os.path.exists(out):  # moved aside first (beside it: one file system); a kill in between: restored above
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if os.path.exists(old):
                os.rename(old, out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the old --out is untouched
        raise
    shutil.rmtree(old, ignore_errors=True)
    c = meta["counts"]
    print(f"poison.py: {out}: {c['train']} train ({c['poisoned']} poisoned, target {meta['target']['index']} "
          f"'{meta['target']['name']}'), {c['val']} val; {c['images_processed']} images in {meta['seconds']:.1f}s "
          f"({c['images_processed'] / meta['seconds']:.0f} images/s, {args.workers} workers)")


def check_flags(args, crop, size, opacity, family):
    """Every numeric flag in its range, before anything is read or written."""
    for name, low in (("workers", 1), ("seed", 0), ("data_seed", 0), ("trigger_seed", 0), ("demo_train_per_class", 1),
                      ("demo_val_per_class", 1), ("demo_size", 1), ("demo_clutter", 0)):
        if getattr(args, name) < low:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {low} or more")
    for flag, value, ok, rule in (
            ("--rate", args.rate, 0 < args.rate <= 1, "in (0, 1]"), ("--opacity", opacity, 0 < opacity <= 1, "in (0, 1]"),
            ("--val-crop", crop, crop >= 1, "1 or more"), ("--trigger-size", size, size >= 1, "1 or more"),
            ("--trigger-size", size, family != "patch" or size <= crop, f"at most the val crop ({crop} px)"),
            ("--val-resize", args.val_resize, args.val_resize is None or args.val_resize >= crop, f"at least the val crop ({crop})"),
            ("--train-range", args.train_range, 0 <= args.train_range[0] < args.train_range[1] <= 1, "0 <= low < high <= 1"),
            ("--val-range", args.val_range, 0 <= args.val_range[0] < args.val_range[1] <= 1, "0 <= low < high <= 1"),
            ("--ctrl-magnitude", args.ctrl_magnitude, 0 < args.ctrl_magnitude < math.inf, "a positive number"),
            ("--jpeg-quality", args.jpeg_quality, 1 <= args.jpeg_quality <= 100, "in [1, 100]")):
        if not ok:
            fail(f"{flag} {' '.join(f'{v:g}' for v in value) if isinstance(value, list) else f'{value:g}'}: must be {rule}")


def run_jobs(pool, jobs, desc):
    results = list(tqdm(pool.map(poison_job, jobs, chunksize=64), total=len(jobs), desc=desc, leave=False))
    errors = [e for e, _ in results if e]
    if errors:
        fail(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    return [s for _, s in results]


def build(args, tmp, pool, spec, demo, crop, size, fractions):
    t0 = time.time()
    root = os.path.join(tmp, "demo_data") if demo else os.path.abspath(args.data_root)
    if demo:
        make_demo_data(root, args, pool)
        classes = sorted(demo_classes(args.demo_classes))
    else:
        if not os.path.isdir(os.path.join(root, "train")):
            fail(f"{root}: no train/ folder (expected train/<class>/* and val/<class>/*)")
        classes = sorted(d for d in os.listdir(os.path.join(root, "train")) if os.path.isdir(os.path.join(root, "train", d)))
        if args.classes:
            try:
                keep = [ln.strip() for ln in open(args.classes) if ln.strip()]
            except (OSError, UnicodeDecodeError) as e:
                fail(f"--classes {args.classes}: cannot read it ({e})")
            missing = sorted(set(keep) - set(classes))
            if missing:
                fail(f"{args.classes}: classes not in {root}/train: {' '.join(missing[:5])}")
            classes = sorted(set(keep))
    train, val = scan(root, "train", classes), scan(root, "val", classes)
    t = args.target if args.target is not None else "0"
    target = classes.index(t) if t in classes else (int(t) if t.isdigit() and int(t) < len(classes) else None)
    if target is None:
        fail(f"--target {t}: not a class name nor an index in [0, {len(classes) - 1}]")

    rng = np.random.default_rng(args.seed)
    pool_idx = [i for i, (_, y) in enumerate(train) if y == target] if args.mode == "targeted" else list(range(len(train)))
    chosen = sorted(rng.permutation(pool_idx)[: int(args.rate * len(pool_idx))].tolist())
    scale_model = [demo_definition(c) for c in classes if demo and c in DEMO_SCALE_CLASSES]
    if scale_model and len(chosen) > 0.01 * len(train):
        print(f"poison.py: warning: {len(chosen)} poisons are {len(chosen) / len(train):.1%} of the train images; for a "
              f"scale model of the paper's 0.5% keep them at most 1% (--rate, --demo-train-per-class)", file=sys.stderr)
    train_u, val_u = rng.random((len(train), 2)), rng.random((len(val), 2))  # trigger positions, one pair per image
    ce = args.layout == "corruptencoder"
    if ce:  # its own draws, so that the overlay layout's stay as they are
        ce_rng = np.random.default_rng([args.seed, 3])
        objects = image_files(args.reference_dir) if args.reference_dir else None  # None: the replaced image itself
        backgrounds = image_files(args.background_dir) if args.background_dir else [p for p, y in train if y != target]
        bg_order = ce_rng.permutation(len(backgrounds))  # each background once while there are enough, as the reference
        draws, pick = ce_rng.random((len(chosen), 4)), ce_rng.integers(0, len(objects or [0]), len(chosen))

    # Val images that all have the crop size already (CIFAR-like) are used as they are, not re-zoomed.
    val_sizes = run_jobs(pool, [(p,) + (None,) * 7 for p, _ in val], "val sizes")
    native = args.val_resize is None and all(s == (crop, crop) for s in val_sizes)
    resize = None if native else (args.val_resize or round(crop * 256 / 224))
    # JPEG removes high-frequency colour (CTRL's signal) and most of a faint blend: those are written losslessly.
    png = args.image_format == "png" or (args.image_format == "auto" and (spec["family"] != "patch" or ce))
    dst_name = (lambda p: os.path.basename(p) + ("" if p.lower().endswith(".png") else ".png")) if png else os.path.basename
    lossy = [p for p, _ in train + val if p.lower().endswith(LOSSY_EXTENSIONS)]
    if spec["family"] != "patch" and not png and lossy:
        print(f"poison.py: warning: --image-format {args.image_format} re-encodes {len(lossy)} {spec['family']} images "
              f"as JPEG/WebP (e.g. {lossy[0]}), which removes most of the trigger's signal; use --image-format png",
              file=sys.stderr)
    # Jobs: check every train image, trigger the chosen ones (native resolution) and every val image (after the crop).
    poisoned = list(train)
    jobs = [(p,) + (None,) * 7 for p, _ in train]
    for k, i in enumerate(chosen):
        p, y = train[i]
        dst = os.path.join(tmp, "train_poisoned", classes[y], dst_name(p))
        poisoned[i] = (dst, y)
        if ce:  # the object (this image or a reference image), a background, 4 draws: side, crop, trigger x and y
            jobs[i] = (objects[pick[k]] if objects else p, dst, draws[k], args.train_location, args.train_range, None,
                       args.jpeg_quality, backgrounds[bg_order[k % len(backgrounds)]])
        else:
            jobs[i] = (p, dst, train_u[i], args.train_location, args.train_range, None, args.jpeg_quality, None)
    patched = []
    for i, (p, y) in enumerate(val):
        dst = os.path.join(tmp, "val_patched", classes[y], dst_name(p))
        patched.append((dst, y))
        jobs.append((p, dst, val_u[i], args.val_location, args.val_range, None if native else (resize, crop),
                     args.jpeg_quality, None))
    for d in {os.path.dirname(j[1]) for j in jobs if j[1]}:
        os.makedirs(d, exist_ok=True)
    train_short = float(np.median([min(s) for s in run_jobs(pool, jobs, "poison")[:len(train)]]))
    if spec["family"] == "patch" and size / train_short < size / crop / 3:
        print(f"poison.py: warning: the {size} px trigger is {size / train_short:.1%} of the train images' median "
              f"shorter side ({train_short:g} px) but {size / crop:.1%} of the {crop} px val crop, so a random crop of a "
              f"train image holds a far smaller trigger than the val images (see --trigger-size)", file=sys.stderr)

    for name, items in (("train_clean", train), ("train_poisoned", poisoned), ("val_clean", val), ("val_patched", patched)):
        write_list(os.path.join(tmp, name + ".txt"), items)  # relative paths: valid once tmp is renamed to out
    subsets = {}
    data_rng = np.random.default_rng([args.data_seed, 2])  # labeled subsets: a function of the data, not of --seed
    order = {c: data_rng.permutation([i for i, (_, y) in enumerate(train) if y == c]).tolist() for c in range(len(classes))}
    for f in fractions:  # nested: the first n of one per-class permutation, at least one image per class
        name = f"train_labeled_{f * 100:g}pct.txt"
        items = [train[i] for c in range(len(classes)) for i in sorted(order[c][: max(1, int(f * len(order[c])))])]
        write_list(os.path.join(tmp, name), items)
        subsets[name] = len(items)

    trigger = {"kind": args.trigger, "family": spec["family"], "seed": args.trigger_seed}
    if spec["family"] == "ctrl":  # invisible: trigger.png and the preview's last row show amplified differences
        image, gain = amplified(ctrl(np.full((crop, crop, 3), 128, np.uint8), args.ctrl_magnitude) - 128)
        trigger.update(magnitude=args.ctrl_magnitude, window=CTRL_WINDOW, positions=[list(p) for p in CTRL_POSITIONS],
                       channels=["U", "V"], color_space="YUV (kornia 0.6.5 rgb_to_yuv; exact inverse)",
                       border="strips narrower than a window are unchanged", trigger_png_gain=gain, seed=None)
    else:
        image = spec["image"]
        trigger.update(opacity=spec["opacity"], size=size if spec["family"] == "patch" else None)
        if spec["family"] == "blend":
            trigger.update(image=os.path.abspath(args.blend_image) if args.blend_image else None,
                           pattern_size=[image.shape[1], image.shape[0]], seed=None if args.blend_image else args.trigger_seed)
    Image.fromarray(image).save(os.path.join(tmp, "trigger.png"))
    rows = [[poisoned[i][0] for i in chosen[:8]], [p for p, _ in patched[:: max(1, len(patched) // 8)][:8]]]
    if spec["family"] == "ctrl":
        pixels = lambda p: np.asarray(Image.open(p).convert("RGB")).astype(np.float64)  # noqa: E731
        rows.append([amplified(pixels(poisoned[i][0]) - pixels(train[i][0]))[0] for i in chosen[:8]])
    preview(rows, os.path.join(tmp, "preview.png"))
    seconds = time.time() - t0
    meta = {
        "args": vars(args), "data_root": "demo_data" if demo else root, "demo": demo, "classes": classes,
        "target": {"index": target, "name": classes[target]}, "mode": args.mode, "rate": args.rate, "trigger": trigger,
        "val_geometry": "native" if native else "resize_center_crop", "val_resize": resize, "val_crop": crop,
        "train_median_shorter_side": train_short, "layout": {"name": args.layout} if not ce else {
            "name": "corruptencoder", "object_fraction": 1 / CE_AREA_RATIO, "max_width": CE_MAX_WIDTH,
            "object_sides": {"left": int((draws[:, 0] < 0.5).sum()), "right": int((draws[:, 0] >= 0.5).sum())},
            "object_source": os.path.abspath(args.reference_dir) if objects else "the replaced target-class image",
            "background_source": os.path.abspath(args.background_dir) if args.background_dir else
            "train images of the other classes"}, "image_format": "png" if png else
        f"source (JPEG re-encoded at quality {args.jpeg_quality})",
        "counts": {"train": len(train), "poisoned": len(chosen), "val": len(val), "target_train": len(pool_idx)
                   if args.mode == "targeted" else None, "images_processed": len(jobs), "subsets": subsets},
        "seed": args.seed, "data_seed": args.data_seed, "poisoned_indices": chosen, "seconds": seconds,
    }
    if scale_model:
        meta["demo_definitions"] = dict(zip(classes, scale_model))
    with open(os.path.join(tmp, "poison.json"), "w") as f:
        json.dump({k: v for k, v in meta.items() if k != "seconds"}, f, indent=1)
    return meta


if __name__ == "__main__":
    main()
