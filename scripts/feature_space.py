"""The feature-space picture of Saha et al.'s talk: in the backdoored model's frozen feature space the patched val
images lie near the target class, in the clean model's they stay spread over their own classes.

  python scripts/feature_space.py RUN [--out PNG] [--json JSON]

RUN holds clean/probe/features.pt and poisoned/probe/features.pt (linear_probe.py --save-features: the normalised
features the linear classifier sees). Writes RUN/feature_space.png, a 2-D t-SNE of each model's features side by side
(clean val images coloured by class, the target class in red and ringed, the patched val images of the other classes
as black crosses), and RUN/feature_space.json with the number behind the picture: for each model, the % of patched
non-target val images whose nearest class centroid (the mean of the labeled train features of a class) is the target;
the same for the clean val images as a baseline; the trigger's pull in cosine similarity (trigger_pull): how much
closer to each other ('trigger_cohesion') and to the target's centroid ('trigger_to_target') the patched images are
than the same images clean; and 'trigger_norm_ratio', their mean feature norm patched over clean. The probe standardises
each dimension by the clean train images' spread, so a trigger learned in dimensions that clean images leave near
constant comes out long (ratio well above 1), in directions where the probe's weights were never fitted.
Imports torch and PIL only, no script of the project.
"""
import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194),
           (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138)]
TARGET = (214, 39, 40)
ROW = 18  # legend row height


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="run folder with clean/probe/features.pt and poisoned/probe/features.pt")
    p.add_argument("--out", default=None, help="PNG path (default RUN/feature_space.png)")
    p.add_argument("--json", default=None, help="JSON path (default RUN/feature_space.json)")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    p.add_argument("--iters", type=int, default=1000, help="t-SNE gradient steps")
    p.add_argument("--max-points", type=int, default=1000, help="t-SNE on at most this many clean + patched images")
    p.add_argument("--size", type=int, default=400, help="side of each model's panel in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the t-SNE initialisation and the subsample")
    return p.parse_args(argv)


def tsne(x, perplexity=30.0, iters=1000, seed=0):
    """Exact t-SNE (van der Maaten and Hinton, JMLR 2008) -> n x 2. Gaussian affinities whose per-point bandwidth is
    found by bisection on the perplexity, symmetrised; Student-t affinities in 2-D; gradient descent with momentum
    0.5 -> 0.8, adaptive gains, and early exaggeration 12 for the first 250 steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # n x n with n <= 1000: extra threads only add synchronisation (40x slower on a busy CPU)
    try:
        return _tsne(torch.as_tensor(x, dtype=torch.float64), perplexity, iters, seed)
    finally:
        torch.set_num_threads(threads)


def _tsne(x, perplexity, iters, seed):
    n = len(x)
    d = torch.cdist(x, x).pow(2)
    d = d / d[d > 0].mean().clamp_min(1e-12)
    d.fill_diagonal_(math.inf)
    log_perplexity = math.log(min(perplexity, (n - 1) / 3))
    beta, lo, hi = torch.ones(n, dtype=x.dtype), torch.zeros(n, dtype=x.dtype), torch.full((n,), math.inf, dtype=x.dtype)
    for _ in range(100):  # bisection: entropy H(P_i) = log(perplexity)
        shifted = d - d.min(1, keepdim=True).values  # exp underflows otherwise; P_i is invariant to the shift
        p = torch.exp(-shifted * beta[:, None])
        s = p.sum(1)
        entropy = s.log() + beta * (shifted.nan_to_num(posinf=0) * p).sum(1) / s
        flat = entropy > log_perplexity  # too flat: narrow the Gaussian (larger beta)
        lo, hi = torch.where(flat, beta, lo), torch.where(flat, hi, beta)
        beta = torch.where(hi.isinf(), beta * 2, (lo + hi) / 2)
    p = p / s[:, None]
    p = ((p + p.T) / (2 * n)).clamp_min(1e-12)
    g = torch.Generator().manual_seed(seed)
    p, y = p.float(), 1e-4 * torch.randn(n, 2, generator=g)  # float32 from here: twice as fast, precise enough
    update, gains = torch.zeros_like(y), torch.ones_like(y)
    lr = max(n / 12 / 4, 50.0)  # Belkina et al. 2019 (scikit-learn's "auto"); 200 scatters small sets
    for it in range(iters):
        sq = (y * y).sum(1)
        num = 1 / (1 + (sq[:, None] + sq[None] - 2 * y @ y.T).clamp_min(0))
        num.fill_diagonal_(0)
        q = (num / num.sum()).clamp_min(1e-12)
        pq = ((12.0 if it < 250 else 1.0) * p - q) * num
        grad = 4 * (pq.sum(1, keepdim=True) * y - pq @ y)
        gains = torch.where((grad > 0) != (update > 0), gains + 0.2, gains * 0.8).clamp_min(0.01)
        update = (0.5 if it < 250 else 0.8) * update - lr * gains * grad
        y = y + update
        y = y - y.mean(0)
    return y.float()


def centroid_fraction(train, train_y, x, y, target):
    """% of the images x of classes other than the target whose nearest class centroid (mean of the labeled train
    features of each class) is the target's."""
    centroids = torch.stack([train[train_y == c].mean(0) for c in range(int(train_y.max()) + 1)])
    keep = y != target
    nearest = torch.cdist(x[keep].float(), centroids.float()).argmin(1)
    return 100.0 * (nearest == target).sum().item() / max(1, len(nearest))


def trigger_pull(train, train_y, val, patched, y, target):
    """How far the trigger moves the non-target val images, in cosine similarity of their features (L2-normalised):
    'cohesion', the mean similarity between two different patched images minus that of the same two clean images;
    'to_target', the mean similarity to the target's centroid, patched minus clean. val[i] and patched[i] are the same
    image (the lists share their order)."""
    keep = y != target
    centroid = F.normalize(train[train_y == target].float().mean(0), dim=0)
    out = {}
    for name, x in (("clean", val[keep]), ("patched", patched[keep])):
        x = F.normalize(x.float(), dim=1)
        n = len(x)
        out[name] = ((x.sum(0).square().sum() - n) / max(1, n * (n - 1))).item(), (x @ centroid).mean().item()
    return {"cohesion": out["patched"][0] - out["clean"][0], "to_target": out["patched"][1] - out["clean"][1]}


def norm_ratio(val, patched, y, target):
    """Mean feature norm of the patched non-target val images over that of the same images clean (the probe's
    normalised space). About 1: the trigger moves the images within the clean images' spread; well above 1: it adds
    dimensions of its own, which the probe's standardisation magnifies."""
    keep = y != target
    return (patched[keep].float().norm(dim=1).mean() / val[keep].float().norm(dim=1).mean().clamp_min(1e-12)).item()


def legend_height(width, labels):
    return ROW * rows(width, labels) + 6


def rows(width, labels):
    per_row = max(1, width // 130)
    return math.ceil(len(labels) / per_row)


def draw(panels, names, target, path, size=400):
    """panels: [(title, embedded clean val n x 2, their labels, embedded patched non-target m x 2)] -> one PNG of
    len(panels) * size x (size + legend) pixels."""
    width = size * len(panels)
    many = len(names) > len(PALETTE)  # e.g. ImageNet-100: the legend names the target only
    labels = ([(f"target: {names[target]}", TARGET, "dot")] +
              ([("other classes (colour = class)", PALETTE[0], "dot")] if many else
               [(n, PALETTE[c % len(PALETTE)], "dot") for c, n in enumerate(names) if c != target]) +
              [("patched val, non-target classes", (0, 0, 0), "cross")])
    image = Image.new("RGB", (width, size + legend_height(width, labels)), "white")
    ink, font = ImageDraw.Draw(image), ImageFont.load_default()

    def dot(x, y, colour, r, outline=None):
        ink.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=outline)

    def cross(x, y, r=3):
        ink.line([x - r, y - r, x + r, y + r], fill=(0, 0, 0), width=1)
        ink.line([x - r, y + r, x + r, y - r], fill=(0, 0, 0), width=1)

    for k, (title, val, val_y, patched) in enumerate(panels):
        both = torch.cat([val, patched])
        lo, hi = both.min(0).values, both.max(0).values
        top, margin = 22, 8

        def at(p):
            u = (p - lo) / (hi - lo).clamp_min(1e-9)
            return k * size + margin + u[0].item() * (size - 2 * margin), top + u[1].item() * (size - top - margin)

        ink.text((k * size + margin, 5), title, fill=(0, 0, 0), font=font)
        if k:
            ink.line([k * size, 0, k * size, size], fill=(200, 200, 200))
        for p, c in zip(val, val_y.tolist()):
            if c != target:
                dot(*at(p), PALETTE[c % len(PALETTE)], 2)
        for p, c in zip(val, val_y.tolist()):
            if c == target:
                dot(*at(p), TARGET, 3, outline=(0, 0, 0))
        for p in patched:
            cross(*at(p))
    per_row = max(1, width // 130)
    for i, (text, colour, marker) in enumerate(labels):
        x, y = 8 + (i % per_row) * (width // per_row), size + 6 + (i // per_row) * ROW + 6
        cross(x, y) if marker == "cross" else dot(x, y, colour, 3, outline=(0, 0, 0) if colour == TARGET else None)
        ink.text((x + 8, y - 6), text, fill=(0, 0, 0), font=font)
    image.save(path)
    return image.size


def main(argv=None):
    args = parse_args(argv)
    models = {"clean": "clean model", "backdoored": "backdoored model"}
    feats = {kind: torch.load(os.path.join(args.run, "clean" if kind == "clean" else "poisoned", "probe", "features.pt"),
                              weights_only=True) for kind in models}
    result, panels = {}, []
    for kind, label in models.items():
        f = feats[kind]
        t = f["target"]
        frac = centroid_fraction(f["train"], f["train_y"], f["patched"], f["patched_y"], t)
        base = centroid_fraction(f["train"], f["train_y"], f["val"], f["val_y"], t)
        if not torch.equal(f["val_y"], f["patched_y"]):
            raise SystemExit(f"feature_space.py: {args.run}: the clean and patched val lists are not in the same order")
        pull = trigger_pull(f["train"], f["train_y"], f["val"], f["patched"], f["val_y"], t)
        result[kind] = {"patched_to_target_centroid": frac, "val_to_target_centroid": base,
                        "n_patched_nontarget": int((f["patched_y"] != t).sum()),
                        "trigger_cohesion": pull["cohesion"], "trigger_to_target": pull["to_target"],
                        "trigger_norm_ratio": norm_ratio(f["val"], f["patched"], f["val_y"], t)}
        g = torch.Generator().manual_seed(args.seed)  # one subsample for both models: the same images in both panels
        val_idx = torch.randperm(len(f["val"]), generator=g)[: args.max_points // 2].sort().values
        pat_idx = torch.nonzero(f["patched_y"] != t).flatten()
        pat_idx = pat_idx[torch.randperm(len(pat_idx), generator=g)[: args.max_points - len(val_idx)].sort().values]
        y = tsne(torch.cat([f["val"][val_idx], f["patched"][pat_idx]]), args.perplexity, args.iters, args.seed)
        panels.append((f"{label}: {frac:.1f}% of patched -> target centroid", y[: len(val_idx)], f["val_y"][val_idx],
                       y[len(val_idx):]))
    f = feats["backdoored"]
    result.update(target=f["target"], target_name=f["class_names"][f["target"]])
    out = args.out or os.path.join(args.run, "feature_space.png")
    size = draw(panels, f["class_names"], f["target"], out, args.size)
    with open(args.json or os.path.join(args.run, "feature_space.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"feature_space.py: {out} ({size[0]}x{size[1]}); patched non-target val images nearest to the target "
          f"centroid: clean model {result['clean']['patched_to_target_centroid']:.1f}%, backdoored model "
          f"{result['backdoored']['patched_to_target_centroid']:.1f}%")


if __name__ == "__main__":
    main()
