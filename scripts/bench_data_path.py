"""The data path of moco.py per batch, its parts timed side by side in one process (interleaved rounds, median):
host half (decode, crop and flip, parameter draws, collate) per image from disk, per image from memory, and batched
from memory (FileList.load + ResizedCrop.batch); the colour half (Photometric) on the batch's two views.
    python3 scripts/bench_data_path.py LIST [--size 32] [--batch 128] [--rounds 5]
Run on a quiet machine or compare only ratios measured together."""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import moco  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("list")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    samples = moco.read_list(a.list)
    views = moco.TwoViews(*moco.aug_plus(a.size))
    disk, memory = moco.FileList(samples, views), moco.FileList(samples, views)
    print(memory.load("on"))
    collate = torch.utils.data.default_collate
    keys = lambda r: [(r, i) for i in range(r * a.batch % (len(samples) - a.batch), r * a.batch % (len(samples) - a.batch) + a.batch)]
    batch = collate(memory.__getitems__(keys(0)))
    (q, pq), (k, pk) = batch[0]
    color = views.photometric
    parts = {
        "host, per image from disk": lambda r: collate([disk[key] for key in keys(r)]),
        "host, per image from memory": lambda r: collate([memory[key] for key in keys(r)]),
        "host, batched from memory": lambda r: collate(memory.__getitems__(keys(r))),
        "colour half, 2 x batch views": lambda r: [moco.to_device(x, torch.device("cpu"), torch.channels_last, moco.MEAN,
                                                                 moco.STD, color, px) for x, px in ((q, pq), (k, pk))],
    }
    times = {name: [] for name in parts}
    for r in range(a.rounds + 1):
        for name, f in parts.items():
            t0 = time.perf_counter()
            f(r)
            if r:  # round 0 warms up
                times[name].append((time.perf_counter() - t0) * 1000)
    print(f"{a.batch} images ({2 * a.batch} views) of {a.size} px per batch, {torch.get_num_threads()} threads, "
          f"median of {a.rounds} interleaved rounds:")
    for name, t in times.items():
        print(f"  {name:32s} {statistics.median(t):7.1f} ms")


if __name__ == "__main__":
    main()
