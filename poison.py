"""poison.py: poisoned training data for "Backdoor Attacks on Self-Supervised Learning" (Saha et al., CVPR 2022).

Paper: https://arxiv.org/abs/2105.10123  Reference code: https://github.com/UMBCvision/SSL-Backdoor (poison-generation/)

Consumes an image folder in the ImageNet layout (`--data-root` with train/<class>/* and val/<class>/*), or, without
`--data-root`, generates a small procedural texture data set (the demo data used by the quickstart and the tests).
Produces, in `--out`, file lists of "<path> <label>" lines (paths relative to the list's folder when inside it):
  train_clean.txt, train_poisoned.txt    every training image; in the poisoned list the poisons point to patched copies
  val_clean.txt, val_patched.txt         every val image; patched = resized + center-cropped, then the trigger pasted
  train_labeled_<p>pct.txt               class-balanced clean subsets (linear probe labels, CompReSS clean data)
  trigger.png, preview.png, poison.json  the trigger, a grid of poisoned/patched samples, every parameter and count
Deviations from the reference: everything is seeded; `--opacity` is the trigger's opacity (the reference's `alpha`
is the base image's, so alpha = 1 - opacity); files inside a class are sorted; PNG images stay PNG (the reference
re-encodes every poison as JPEG quality 75, which we keep for JPEG sources).
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image
from tqdm import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", default=None, help="ImageNet-layout folder (train/<class>/*, val/<class>/*); omit for the demo data")
    p.add_argument("--classes", default=None, help="text file with one class folder name per line to keep (e.g. the ImageNet-100 wnids)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (only once the new one is complete)")
    p.add_argument("--seed", type=int, default=0, help="poison seed: the poisoned subset and the trigger positions")
    p.add_argument("--data-seed", type=int, default=0, help="data seed: the demo images and the labeled subsets, kept "
                   "apart from --seed so that runs with different poison seeds share one data set")
    p.add_argument("--target", default=None, help="target class: folder name or index in sorted order (demo default: 0)")
    p.add_argument("--mode", choices=["targeted", "untargeted"], default="targeted", help="poison only the target class, or any image")
    p.add_argument("--rate", type=float, default=0.5, help="targeted: fraction of the TARGET class's train images patched "
                   "(0.5 = the paper's 0.5%% of ImageNet-100); untargeted: fraction of all train images")
    p.add_argument("--trigger", default="htba", help="'htba' (random 4x4 grid of saturated colours), 'white' (BadEncoder square) or a PNG path")
    p.add_argument("--trigger-seed", type=int, default=10, help="seed of the htba trigger's colour grid (independent of --seed)")
    p.add_argument("--trigger-size", type=int, default=None, help="trigger side in pixels (default: 50 * val-crop / 224, i.e. 50 at 224)")
    p.add_argument("--opacity", type=float, default=1.0, help="trigger opacity: 1.0 replaces the pixels (reference alpha = 1 - opacity)")
    p.add_argument("--train-location", choices=["random", "center", "bottom-right"], default="random", help="trigger placement on train images")
    p.add_argument("--train-range", type=float, nargs=2, default=[0.25, 0.75], help="random placement range, fractions of width/height")
    p.add_argument("--val-location", choices=["random", "center", "bottom-right"], default="random", help="trigger placement on val crops")
    p.add_argument("--val-range", type=float, nargs=2, default=[0.10, 0.90], help="random placement range on the val crop")
    p.add_argument("--val-crop", type=int, default=None, help="evaluation crop size (default 224; demo: 32)")
    p.add_argument("--val-resize", type=int, default=None, help="shorter side before the crop (default round(crop * 256 / 224))")
    p.add_argument("--labeled-fractions", default="0.01,0.05,0.1,0.25", help="comma-separated per-class fractions of clean subsets")
    p.add_argument("--jpeg-quality", type=int, default=75, help="quality of re-encoded JPEG poisons (PIL's default 75, as in the reference)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for image work")
    p.add_argument("--demo-classes", default=",".join(DEMO_DEFAULT),
                   help="demo: comma-separated texture class names, or N for the first N of all 10 (default: the 8 "
                        "that do not resemble the checkered trigger)")
    p.add_argument("--demo-train-per-class", type=int, default=300, help="demo: train images per class")
    p.add_argument("--demo-val-per-class", type=int, default=50, help="demo: val images per class")
    p.add_argument("--demo-size", type=int, default=64, help="demo: image side in pixels")
    p.add_argument("--demo-layout", choices=["fill", "object"], default="fill",
                   help="demo: texture fills the image, or covers a random rectangle on a flat background")
    return p.parse_args(argv)


def fail(msg):
    sys.exit(f"poison.py: error: {msg}")


# ----------------------------------------------------------------------------------------------------------------
# Demo data: textures that fill the image, so class evidence survives random crops; random colours, phases, scales
# and orientation jitter, so that neither colour nor position gives the class away (DESIGN.md section 5).
# The knobs below are the ones that were tuned (README, "Demo data"); change them here.
DEMO_PERIOD = (12.0, 20.0)  # range of the pattern period, in pixels of a 64 px image (scaled with --demo-size)
DEMO_TINT = 0.3  # strength of the random colour tint (saturated random colours made MoCo learn colour, not texture)
DEMO_OBJECT = (0.5, 0.8)  # --demo-layout object: side of the textured rectangle, fraction of the image side
DEMO_CLASSES = ("checkerboard", "crosses", "dots", "grid", "rings", "stripes_diagonal", "stripes_horizontal",
                "stripes_vertical", "waves", "zigzag")  # --demo-classes N takes the first N, or give names
# The default leaves out checkerboard and grid: the HTBA trigger is a checkered patch, and with them in the data the
# patched images of every model go to grid or checkerboard, so no backdoor effect can show (README, "Demo data").
DEMO_DEFAULT = tuple(c for c in DEMO_CLASSES if c not in ("checkerboard", "grid"))


def demo_image(cls, size, rng, layout="fill"):
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.uniform(*DEMO_PERIOD) * size / 64
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
    elif cls == "dots":
        du = (u + rng.uniform(0, period)) % period - period / 2
        dv = (v + rng.uniform(0, period)) % period - period / 2
        val = np.where(np.hypot(du, dv) < period * rng.uniform(0.2, 0.3), 1.0, -1.0)
    elif cls == "grid":
        du = np.abs((u + rng.uniform(0, period)) % period - period / 2)
        dv = np.abs((v + rng.uniform(0, period)) % period - period / 2)
        val = np.where(np.minimum(du, dv) < 1.0, 1.0, -1.0)
    elif cls == "rings":
        cy, cx = rng.uniform(0, size, 2)
        val = np.sin(w * np.hypot(x - cx, y - cy) + phase)
    elif cls == "waves":
        val = np.sin(w * (v + 2.5 * np.sin(2 * np.pi * u / (2.5 * period))) + phase)
    elif cls == "zigzag":
        tri = 2 * np.abs((u / period * 1.5) % 1.0 - 0.5)  # triangle wave in [0, 1]
        val = np.sin(w * (v + 0.5 * period * tri) + phase)
    elif cls == "crosses":
        du = np.abs((u + rng.uniform(0, period)) % (1.5 * period) - 0.75 * period)
        dv = np.abs((v + rng.uniform(0, period)) % (1.5 * period) - 0.75 * period)
        val = np.where(((du < 1.0) & (dv < 3.0)) | ((dv < 1.0) & (du < 3.0)), 1.0, -1.0)
    else:
        raise ValueError(cls)
    val = (val + 1) / 2  # [0, 1]
    # Two tones of random contrast with a weak random tint: colour is an instance cue, not a class cue, and a weak
    # one, so that SSL has to learn the texture (with saturated random colours it learns colour and stays at chance).
    lo, hi = rng.uniform(20, 110), rng.uniform(145, 235)
    tint = 1 + rng.uniform(0, DEMO_TINT) * rng.uniform(-1, 1, 3)
    c0, c1 = (lo, hi) if rng.random() < 0.5 else (hi, lo)
    c0, c1 = c0 * tint, c1 * tint
    img = c0 + (c1 - c0) * val[..., None]
    if layout == "object":  # the texture covers a random rectangle on a flat, class-agnostic background
        h, w = (rng.uniform(*DEMO_OBJECT, 2) * size).astype(int)
        top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        inside = np.zeros((size, size, 1), bool)
        inside[top:top + h, left:left + w] = True
        img = np.where(inside, img, rng.uniform(40, 215) * (1 + rng.uniform(0, DEMO_TINT) * rng.uniform(-1, 1, 3)))
    img = img + rng.normal(0, 8, (size, size, 3))
    return np.clip(img, 0, 255).round().astype(np.uint8)


def demo_job(job):
    path, cls, size, layout, seed = job
    Image.fromarray(demo_image(cls, size, np.random.default_rng(seed), layout)).save(path)


def demo_classes(spec):
    """--demo-classes: "N" (the first N of DEMO_CLASSES) or "name,name,..."; returned in DEMO_CLASSES order."""
    if spec.strip().isdigit():
        n = int(spec)
        if not 2 <= n <= len(DEMO_CLASSES):
            fail(f"--demo-classes must be between 2 and {len(DEMO_CLASSES)}")
        return list(DEMO_CLASSES[:n])
    names = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in names if c not in DEMO_CLASSES]
    if unknown:
        fail(f"--demo-classes: unknown class '{unknown[0]}' (known: {', '.join(DEMO_CLASSES)})")
    if len(set(names)) < 2:
        fail("--demo-classes: give at least two different classes")
    return [c for c in DEMO_CLASSES if c in names]


def make_demo_data(root, args, pool):
    jobs = []
    for split, n in (("train", args.demo_train_per_class), ("val", args.demo_val_per_class)):
        for cls in demo_classes(args.demo_classes):
            os.makedirs(os.path.join(root, split, cls))
            c = DEMO_CLASSES.index(cls)  # a class's images do not depend on which other classes are chosen
            for i in range(n):  # one seed per image: the same data whatever the number of workers
                seed = [args.data_seed, 0 if split == "train" else 1, c, i]
                jobs.append((os.path.join(root, split, cls, f"{cls}_{i:05d}.png"), cls, args.demo_size, args.demo_layout, seed))
    list(tqdm(pool.map(demo_job, jobs, chunksize=64), total=len(jobs), desc="demo data", leave=False))


# ----------------------------------------------------------------------------------------------------------------
# Triggers and pasting
def make_trigger(kind, size, seed):
    if kind == "htba":  # like HTBA's trigger_10..19: 4x4 cells, each channel 0 or 255, upsampled bilinearly
        grid = np.random.default_rng(seed).integers(0, 2, (4, 4, 3)).astype(np.uint8) * 255
        return np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR))
    if kind == "white":  # BadEncoder's white square
        return np.full((size, size, 3), 255, np.uint8)
    if not os.path.isfile(kind):
        fail(f"--trigger {kind}: not 'htba', 'white' or an existing image file")
    try:
        return np.asarray(Image.open(kind).convert("RGB").resize((size, size), Image.BICUBIC))
    except OSError as e:
        fail(f"--trigger {kind}: cannot read image ({e})")


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


def paste(img, trigger, x, y, opacity):
    """Paste the trigger with its top-left corner at (x, y); opacity 1.0 replaces the pixels."""
    a = np.array(img.convert("RGB"))
    s = trigger.shape[0]
    if x + s > a.shape[1] or y + s > a.shape[0]:
        raise ValueError(f"image {a.shape[1]}x{a.shape[0]} is smaller than the {s}px trigger")
    box = a[y:y + s, x:x + s].astype(np.float64)
    a[y:y + s, x:x + s] = np.round(opacity * trigger + (1 - opacity) * box).astype(np.uint8)
    return Image.fromarray(a)


def center_crop(img, resize, crop):
    """torchvision's Resize(resize) (shorter side, bilinear) + CenterCrop(crop), on a PIL image."""
    w, h = img.size
    nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - crop) / 2.0)), int(round((nh - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


_TRIGGER = None


def _init_worker(trigger):
    global _TRIGGER
    _TRIGGER = trigger


def poison_job(job):
    """Open (and check) one image; patch and save it when asked. Returns an error line or None."""
    src, dst, u, location, lo_hi, crop, opacity, quality = job
    try:
        with Image.open(src) as im:
            if dst is None:  # a clean train image: only check that it is an image
                return None
            im = im.convert("RGB")
            if crop is not None:
                im = center_crop(im, *crop)
            s = _TRIGGER.shape[0]
            x, y = place(im.size[0], im.size[1], s, location, lo_hi, u)
            out = paste(im, _TRIGGER, x, y, opacity)
        fmt = "JPEG" if dst.lower().endswith((".jpg", ".jpeg")) else None
        out.save(dst, format=fmt, quality=quality) if fmt else out.save(dst)
        return None
    except (OSError, ValueError) as e:
        return f"cannot use image {src}: {e}"


# ----------------------------------------------------------------------------------------------------------------
def scan(root, split, classes):
    items = []
    for label, cls in enumerate(classes):
        folder = os.path.join(root, split, cls)
        if not os.path.isdir(folder):
            fail(f"{folder}: class folder missing")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            fail(f"{folder}: no images")
        items += [(os.path.join(folder, f), label) for f in files]
    return items


def write_list(path, items):
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, "w") as f:
        for p, label in items:  # relative to the list's folder when inside it, so the folder can move
            p = os.path.abspath(p)
            f.write(f"{os.path.relpath(p, folder) if p.startswith(folder + os.sep) else p} {label}\n")


def preview(paths, out_path, cell=96):
    tiles = [Image.open(p).convert("RGB").resize((cell, cell), Image.NEAREST) for p in paths]
    grid = Image.new("RGB", (cell * 8, cell * math.ceil(len(tiles) / 8)), "white")
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % 8) * cell, (i // 8) * cell))
    grid.save(out_path)


def main(argv=None):
    args = parse_args(argv)
    demo = args.data_root is None
    crop = args.val_crop or (32 if demo else 224)
    resize = args.val_resize or round(crop * 256 / 224)
    size = args.trigger_size or max(1, round(50 * crop / 224))
    if not 0 <= args.rate <= 1 or not 0 <= args.opacity <= 1:
        fail("--rate and --opacity must be in [0, 1]")
    fractions = [float(f) for f in args.labeled_fractions.split(",") if f.strip()]
    if any(not 0 < f <= 1 for f in fractions):
        fail("--labeled-fractions must lie in (0, 1]")
    if demo:
        demo_classes(args.demo_classes)  # check it before anything is written
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        fail(f"{out} exists; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    trigger = make_trigger(args.trigger, size, args.trigger_seed)
    try:
        with ProcessPoolExecutor(max(1, args.workers), initializer=_init_worker, initargs=(trigger,)) as pool:
            meta = build(args, tmp, out, pool, trigger, demo, crop, resize, size, fractions)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing already written is lost: the old --out is untouched
        raise
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)
    c = meta["counts"]
    print(f"poison.py: {out}: {c['train']} train ({c['poisoned']} poisoned, target {meta['target']['index']} "
          f"'{meta['target']['name']}'), {c['val']} val; {c['images_processed']} images in {meta['seconds']:.1f}s "
          f"({c['images_processed'] / meta['seconds']:.0f} images/s, {args.workers} workers)")


def build(args, tmp, out, pool, trigger, demo, crop, resize, size, fractions):
    import time
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
            keep = [ln.strip() for ln in open(args.classes) if ln.strip()]
            missing = sorted(set(keep) - set(classes))
            if missing:
                fail(f"{args.classes}: classes not in {root}/train: {' '.join(missing[:5])}")
            classes = sorted(set(keep))
    train, val = scan(root, "train", classes), scan(root, "val", classes)
    if args.target is None and not demo:
        fail("--target is required with --data-root (a class folder name or index)")
    t = args.target if args.target is not None else "0"
    target = classes.index(t) if t in classes else (int(t) if t.isdigit() and int(t) < len(classes) else None)
    if target is None:
        fail(f"--target {t}: not a class name nor an index in [0, {len(classes) - 1}]")

    rng = np.random.default_rng(args.seed)
    pool_idx = [i for i, (_, y) in enumerate(train) if y == target] if args.mode == "targeted" else list(range(len(train)))
    chosen = sorted(rng.permutation(pool_idx)[: int(args.rate * len(pool_idx))].tolist())
    train_u, val_u = rng.random((len(train), 2)), rng.random((len(val), 2))  # trigger positions, one pair per image

    # Jobs: check every train image, patch the chosen ones (native resolution) and every val image (after the crop).
    poisoned = list(train)
    jobs = [(p, None, None, None, None, None, None, None) for p, _ in train]
    for i in chosen:
        p, y = train[i]
        dst = os.path.join(tmp, "train_poisoned", classes[y], os.path.basename(p))
        poisoned[i] = (dst, y)
        jobs[i] = (p, dst, train_u[i], args.train_location, args.train_range, None, args.opacity, args.jpeg_quality)
    patched = []
    for i, (p, y) in enumerate(val):
        dst = os.path.join(tmp, "val_patched", classes[y], os.path.basename(p))
        patched.append((dst, y))
        jobs.append((p, dst, val_u[i], args.val_location, args.val_range, (resize, crop), args.opacity, args.jpeg_quality))
    for d in {os.path.dirname(j[1]) for j in jobs if j[1]}:
        os.makedirs(d, exist_ok=True)
    errors = [e for e in tqdm(pool.map(poison_job, jobs, chunksize=64), total=len(jobs), desc="poison", leave=False) if e]
    if errors:
        fail(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))

    # Lists point at the final location (tmp is renamed to out at the end); write them with tmp paths, same layout.
    write_list(os.path.join(tmp, "train_clean.txt"), train)
    write_list(os.path.join(tmp, "train_poisoned.txt"), poisoned)
    write_list(os.path.join(tmp, "val_clean.txt"), val)
    write_list(os.path.join(tmp, "val_patched.txt"), patched)
    subsets = {}
    data_rng = np.random.default_rng([args.data_seed, 2])  # labeled subsets: a function of the data, not of --seed
    order = {c: data_rng.permutation([i for i, (_, y) in enumerate(train) if y == c]).tolist() for c in range(len(classes))}
    for f in fractions:  # nested: the first n of one per-class permutation, at least one image per class
        name = f"train_labeled_{f * 100:g}pct.txt"
        items = [train[i] for c in range(len(classes)) for i in sorted(order[c][: max(1, int(f * len(order[c])))])]
        write_list(os.path.join(tmp, name), items)
        subsets[name] = len(items)
    Image.fromarray(trigger).save(os.path.join(tmp, "trigger.png"))
    preview([poisoned[i][0] for i in chosen[:8]] + [p for p, _ in patched[:: max(1, len(patched) // 8)][:8]],
            os.path.join(tmp, "preview.png"))
    seconds = time.time() - t0
    meta = {
        "args": vars(args), "data_root": "demo_data" if demo else root, "demo": demo, "classes": classes,
        "target": {"index": target, "name": classes[target]}, "mode": args.mode, "rate": args.rate,
        "trigger": {"kind": args.trigger, "size": size, "seed": args.trigger_seed, "opacity": args.opacity},
        "val_resize": resize, "val_crop": crop,
        "counts": {"train": len(train), "poisoned": len(chosen), "val": len(val), "target_train": len(pool_idx)
                   if args.mode == "targeted" else None, "images_processed": len(jobs), "subsets": subsets},
        "seed": args.seed, "data_seed": args.data_seed, "poisoned_indices": chosen, "seconds": seconds,
    }
    with open(os.path.join(tmp, "poison.json"), "w") as f:
        json.dump({k: v for k, v in meta.items() if k != "seconds"}, f, indent=1)
    return meta


if __name__ == "__main__":
    main()
