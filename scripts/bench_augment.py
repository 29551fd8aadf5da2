"""Augmentation throughput: the PIL aug-plus of commit d14acef's moco.py against this moco.py's split (the host half
in the loader, the colour half batched), measured side by side in one process.

  python scripts/bench_augment.py [--old OLD_MOCO.py] [--jpegs DIR] [--n 200] [--batch 256] [--size 224]
1. the loader alone, one core: images/s for two views of 300-500 px JPEGs (tests/make_jpegs.py), old against new host
   half; 2. the new colour half on a batch of 2 x --batch views at --size px, on this machine's CPU (and GPU if any).
Without --old, the old aug-plus is taken from `git show d14acef:moco.py`.
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from make_jpegs import make_jpegs  # noqa: E402


def module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def rate(fn, items, repeat=2):
    """Items per second of fn over items, best of `repeat` passes."""
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = max(best, len(items) / (time.perf_counter() - t0))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", help="the old moco.py (default: git show d14acef:moco.py)")
    p.add_argument("--jpegs", help="an ImageNet-layout JPEG folder (default: 200 made by tests/make_jpegs.py)")
    p.add_argument("--n", type=int, default=200, help="images for the loader measurement")
    p.add_argument("--batch", type=int, default=256, help="batch of the colour-half measurement (x 2 views)")
    p.add_argument("--size", type=int, default=224, help="view size")
    a = p.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    old_path = a.old or os.path.join(tmp, "moco_old.py")
    if not a.old:
        with open(old_path, "w") as f:
            f.write(subprocess.run(["git", "show", "d14acef:moco.py"], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout)
    old, new = module(old_path, "moco_old"), module(os.path.join(ROOT, "moco.py"), "moco_new")
    root = a.jpegs or make_jpegs(os.path.join(tmp, "jpegs"), n=a.n, classes=4)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs)[: a.n]
    samples = [(path, 0) for path in paths]
    old_views = old.FileList(samples, old.TwoViews(old.aug_plus(a.size)))
    new_views = new.FileList(samples, new.TwoViews(*new.aug_plus(a.size)))
    keys = [(0, i) for i in range(len(samples))]
    r_old, r_new = rate(old_views.__getitem__, keys), rate(new_views.__getitem__, keys)
    print(f"1. loader, one core, two {a.size} px views of {len(samples)} JPEGs of 300-500 px: "
          f"old PIL aug-plus {r_old:.0f} images/s, new host half {r_new:.0f} images/s ({r_new / r_old:.2f}x)")
    color = new.aug_plus(a.size)[1]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        torch.set_num_threads(os.cpu_count() if device == "cpu" else 1)
        x = torch.randint(0, 256, (2 * a.batch, 3, a.size, a.size), dtype=torch.uint8)
        params = torch.stack([color.draw() for _ in range(len(x))])
        x, params = x.to(device), params.to(device)
        step = lambda _: new.to_device(x, device, torch.contiguous_format, new.MEAN, new.STD, color, params)
        step(0)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            step(0)
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 3 * 1000
        print(f"2. colour half on {device} ({torch.get_num_threads()} threads): {2 * a.batch} views at {a.size} px "
              f"in {ms:.0f} ms ({2 * a.batch / ms * 1000:.0f} views/s)")


if __name__ == "__main__":
    main()
