"""Write an ImageNet-layout folder of random-content JPEGs of 300-500 px (for poison.py tests and benchmarks).

python tests/make_jpegs.py OUT [--n 2000] [--classes 10]: 90% of the images under train/<class>/, 10% under val/<class>/.
"""
import argparse
import os

import numpy as np
from PIL import Image


def make_jpegs(root, n=2000, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        split = "val" if (i // classes) % 10 == 9 else "train"  # every 10th image of each class
        folder = os.path.join(root, split, f"class{i % classes:02d}")
        os.makedirs(folder, exist_ok=True)
        w, h = rng.integers(300, 501, 2)
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)  # smooth content, JPEG-like sizes
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        img.save(os.path.join(folder, f"img{i:05d}.JPEG"), quality=90)
    return root


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--classes", type=int, default=10)
    a = p.parse_args()
    make_jpegs(a.out, a.n, a.classes)
