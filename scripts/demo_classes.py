"""How distinct poison.py's demo classes are, without SSL training: fixed features and two simple classifiers.

Each image (generated in memory with poison.py's seeds, so the images of `poison.py --demo-classes SPEC`) becomes a
fixed feature vector: its grayscale FFT magnitude summed in 8 radius x 8 orientation bins (position- and phase-free
texture), and the mean and spread of its RGB values and chromaticities (colour). A nearest-centroid and a logistic-
regression classifier are fitted on the train images and scored on the val images. The HTBA trigger (poison.py's
default, --trigger-size px at a random place in [0.1, 0.9] of the image) is then pasted on the val images: the share
of patched images the logistic regression sends to its most frequent class says whether the trigger acts as a class.
  python scripts/demo_classes.py [--classes scale:64] [--train 40] [--val 20] [--size 32] [--trigger-size 8]
"""
import argparse
import importlib.util
import json
import os
import platform
import time

import numpy as np
import torch

spec = importlib.util.spec_from_file_location("poison", os.path.join(os.path.dirname(__file__), "..", "poison.py"))
poison = importlib.util.module_from_spec(spec)
spec.loader.exec_module(poison)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", default="scale:64", help="poison.py --demo-classes value")
    p.add_argument("--train", type=int, default=40, help="train images per class")
    p.add_argument("--val", type=int, default=20, help="val images per class")
    p.add_argument("--size", type=int, default=32, help="image side (poison.py --demo-size)")
    p.add_argument("--trigger-size", type=int, default=8, help="side of the pasted HTBA trigger")
    p.add_argument("--data-seed", type=int, default=0, help="poison.py --data-seed")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def features(img):
    """64 FFT-magnitude bins (8 radii up to Nyquist x 8 orientations in [0, pi)) and 12 colour statistics."""
    g = img.astype(np.float64).mean(2)
    f = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean())))
    n = g.shape[0]
    ky, kx = np.mgrid[0:n, 0:n] - n // 2
    radius = np.minimum(np.hypot(kx, ky) / (n / 2) * 8, 7).astype(int)
    angle = (np.arctan2(ky, kx) % np.pi / np.pi * 8).astype(int) % 8
    texture = np.bincount((radius * 8 + angle).ravel(), weights=f.ravel(), minlength=64)
    rgb = img.reshape(-1, 3).astype(np.float64) / 255
    chroma = rgb / np.maximum(rgb.sum(1, keepdims=True), 1e-6)
    return np.concatenate([np.log1p(texture / texture.sum() * 64), rgb.mean(0), rgb.std(0), chroma.mean(0),
                           chroma.std(0)])


def images(classes, split, n, size, data_seed):
    """The demo images of poison.py (same seeds), as arrays, with their labels (index in sorted classes)."""
    out, labels = [], []
    for label, cls in enumerate(sorted(classes)):
        c = poison.DEMO_ALL.index(cls)
        for i in range(n):
            out.append(poison.demo_image(cls, size, np.random.default_rng([data_seed, 0 if split == "train" else 1, c, i])))
            labels.append(label)
    return out, np.array(labels)


def patched(imgs, trigger, seed=0):
    rng = np.random.default_rng(seed)
    return [poison.paste(a, trigger, *poison.place(a.shape[1], a.shape[0], trigger.shape[0], "random", (0.1, 0.9),
                                                   rng.random(2)), 1.0) for a in imgs]


def logistic_regression(x, y, classes, steps=300):
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=1e-4)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return lambda z: model(torch.tensor(z, dtype=torch.float32)).argmax(1).numpy()


def measure(spec_classes, n_train, n_val, size, trigger_size, data_seed=0):
    classes = poison.demo_classes(spec_classes)
    t0 = time.time()
    train, ytr = images(classes, "train", n_train, size, data_seed)
    val, yva = images(classes, "val", n_val, size, data_seed)
    trigger = poison.make_trigger("htba", trigger_size, 10)
    ftr, fva, fpa = (np.stack([features(a) for a in imgs]) for imgs in (train, val, patched(val, trigger)))
    mean, std = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fva, fpa = (ftr - mean) / std, (fva - mean) / std, (fpa - mean) / std
    centroids = np.stack([ftr[ytr == c].mean(0) for c in range(len(classes))])
    nearest = ((fva[:, None] - centroids[None]) ** 2).sum(2).argmin(1)
    predict = logistic_regression(ftr, ytr, len(classes))
    clean, on_patched = predict(fva), predict(fpa)
    top = np.bincount(on_patched, minlength=len(classes))
    return {"classes": len(classes), "train": len(train), "val": len(val), "size": size, "chance": 1 / len(classes),
            "nearest_centroid": float((nearest == yva).mean()), "logistic_regression": float((clean == yva).mean()),
            "patched_logistic_regression": float((on_patched == yva).mean()),
            "patched_top_class_share": float(top.max() / len(val)), "patched_top_class": sorted(classes)[top.argmax()],
            "clean_top_class_share": float(np.bincount(clean, minlength=len(classes)).max() / len(val)),
            "seconds": round(time.time() - t0, 1)}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    r = measure(args.classes, args.train, args.val, args.size, args.trigger_size, args.data_seed)
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    r.update(spec=args.classes, machine=f"{cpu}, {os.cpu_count()} cores")
    print(f"{r['classes']} classes ({args.classes}), {r['train']} train / {r['val']} val images of {args.size} px: "
          f"nearest centroid {r['nearest_centroid']:.1%}, logistic regression {r['logistic_regression']:.1%} "
          f"(chance {r['chance']:.1%}); with the {args.trigger_size} px trigger: {r['patched_logistic_regression']:.1%}, "
          f"its most frequent class '{r['patched_top_class']}' gets {r['patched_top_class_share']:.1%} of the patched "
          f"images ({r['clean_top_class_share']:.1%} of the clean ones); {r['seconds']}s on {r['machine']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
