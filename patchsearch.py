"""patchsearch.py: the PatchSearch defense: find and remove patch-based poisons from an SSL training set, no clean data.

Paper: Tejankar et al., "Defending Against Patch-based Backdoor Attacks on Self-Supervised Learning", CVPR 2023,
https://arxiv.org/abs/2304.01482  Reference code: UCDvision/PatchSearch (patch_search_iterative_search.py and
patch_search_poison_classifier.py, with the settings of its run_pipeline.sh).
Consumes an encoder checkpoint trained on poisoned data (docs/formats.md) and that poisoned train list. Produces, in
`--out`: train_filtered.txt (the list without the flagged images), poison_scores.csv (the scored images), top_ranked.png
(the highest-scored images, their candidate window boxed), summary.json (counts, settings, and poison recall /
precision when poison.py's poison.json sits beside the list).
Method: (1) k-means on the L2-normalised features; (2) Grad-CAM of each candidate against the cosine classifier of the
cluster centroids, and the w x w window of the largest map sum = the candidate patch; (3) poison score = how many test
images (the images closest to each centroid) move into the candidate's cluster once the patch is pasted on them, minus
how many were there before; (4) iterative search: score a few random images per cluster, drop the 25% of clusters with
the lowest best score, repeat; (5) poison classifier: an ensemble of small ResNets trained to tell images with a top-ranked
patch pasted on them from images without; the images it calls poisoned are removed.
Scaled with the data (paper values at ImageNet-100, 224 px): k = 1000 clusters per 126,689 images; one test image per
cluster; window 60 px, pasted classifier patches 20-80 px, margin 10 px, all x image size / 224. Grad-CAM runs at the
deepest ResNet stage whose map is at least 4x4 (layer4 at 224 px; layer2 for the demo's 32 px standard-stem models).
Deviations: k-means++ init (faiss: random points, stuck in local optima for small k on small data); flips measured on
L2-normalised features (the reference assigns raw patched features to the centroids: a scale mismatch); one window per
image (no --repeat_patch, default 1); the classifier patches are cut from the top images after the search, in memory.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageDraw
from torchvision.models.resnet import BasicBlock, ResNet
from tqdm import tqdm

IMAGENET100_TRAIN = 126_689  # images per 1000 clusters in the paper


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--encoder", required=True, help="encoder checkpoint (.pt) trained on the poisoned list")
    p.add_argument("--train-list", required=True, help="the poisoned train list the encoder was trained on")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--clusters", type=int, default=0, help="k-means clusters (0: 1000 per 126,689 images, as the paper on ImageNet-100)")
    p.add_argument("--kmeans-iters", type=int, default=20, help="Lloyd iterations (faiss' default)")
    p.add_argument("--test-images", type=int, default=0, help="images the patches are pasted on (0: one per cluster)")
    p.add_argument("--window", type=int, default=60, help="candidate patch side at 224 px (scaled with the image size)")
    p.add_argument("--samples-per-iter", type=int, default=2, help="images scored per cluster and search iteration")
    p.add_argument("--prune", type=float, default=0.25, help="fraction of clusters dropped per iteration (0: score every image)")
    p.add_argument("--layer", default="auto", help="Grad-CAM layer: auto (deepest ResNet stage with a map >= 4x4), layer1..layer4")
    p.add_argument("--topk-poisons", type=int, default=20, help="top-ranked images whose patches train the poison classifier")
    p.add_argument("--top-p", type=float, default=0.10, help="fraction of top-ranked images left out of the classifier's training pool")
    p.add_argument("--ensemble", type=int, default=5, help="poison classifiers averaged (logits)")
    p.add_argument("--classifier-iters", type=int, default=2000, help="SGD iterations per poison classifier")
    p.add_argument("--batch-size", type=int, default=32, help="poison classifier batch size")
    p.add_argument("--lr", type=float, default=0.01, help="poison classifier lr (SGD momentum 0.9, wd 1e-4, cosine)")
    p.add_argument("--eval-every", type=int, default=20, help="early-stop validation every N iterations (10 equal F1s)")
    p.add_argument("--grid", type=int, default=100, help="top-ranked images in top_ranked.png")
    p.add_argument("--extract-batch-size", type=int, default=256, help="batch size of feature extraction and scoring")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loading processes")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast for the encoder on GPU")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means, the search order, patch positions and the classifiers")
    p.add_argument("--overwrite", action="store_true", help="replace the result that --out holds (its summary.json)")
    return p.parse_args(argv)

STAGES = ("layer1", "layer2", "layer3", "layer4")


def nearest(x, c, chunk=8192):
    """Index of and L2 distance to the nearest centroid for every row of x."""
    mins = [torch.cdist(xb, c).min(1) for xb in x.split(chunk)]
    return torch.cat([m.indices for m in mins]), torch.cat([m.values for m in mins])


def kmeans(x, k, iters=20, seed=0):
    """Lloyd's k-means, L2 distance, k-means++ init -> (centroids (k, d), assignment (N,), distance to it (N,))."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randint(len(x), (1,), generator=g)]
    d2 = torch.cdist(x, c).squeeze(1) ** 2
    for _ in range(1, k):  # k-means++: the next centroid is drawn with probability ~ squared distance to the nearest one
        i = torch.multinomial(d2.double().cpu() + 1e-12, 1, generator=g)
        c = torch.cat([c, x[i]])
        d2 = torch.minimum(d2, torch.cdist(x, x[i]).squeeze(1) ** 2)
    for _ in range(iters):
        a, _ = nearest(x, c)
        counts = torch.bincount(a, minlength=k)[:, None]
        c = torch.where(counts > 0, torch.zeros_like(c).index_add_(0, a, x) / counts.clamp(min=1), c)  # empty: kept
    a, d = nearest(x, c)
    return c, a, d


@torch.no_grad()
def embed(model, x, batch=256, amp=False):
    """L2-normalised encoder features of a tensor of images, in batches, on the model's device."""
    device = next(model.parameters()).device
    out = []
    for xb in x.split(batch):
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            out.append(model(xb.to(device)).float())
    return F.normalize(torch.cat(out), dim=1)


def cam_layer(model, arch, size, name="auto"):
    """Grad-CAM's layer: ViT's last block's input norm (reference), or a ResNet stage (auto: the deepest map >= 4x4)."""
    if arch == "vit":
        return "encoder.layers[-1].ln_1", model.encoder.layers[-1].ln_1
    if name != "auto":
        return name, getattr(model, name)
    sides = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: sides.__setitem__(n, min(o.shape[-2:])))
             for n in STAGES]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    name = next((n for n in reversed(STAGES) if sides[n] >= 4), "layer1")
    return name, getattr(model, name)


def gradcam(model, centroids, layer, x):
    """Grad-CAM of the top cluster under the cosine classifier of the centroids -> maps (B, H, W) in [0, 1]."""
    store = {}
    hook = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    with torch.enable_grad():
        logits = F.normalize(model(x.detach().requires_grad_(True)), dim=1) @ F.normalize(centroids, dim=1).T
        g, = torch.autograd.grad(logits.max(1).values.sum(), store["a"])  # target: the argmax cluster (reference default)
    hook.remove()
    a = store["a"].detach()
    if a.dim() == 3:  # ViT tokens (B, 1 + h * w, D) -> (B, D, h, w), cls token dropped
        side = int((a.shape[1] - 1) ** 0.5)
        a, g = (t[:, 1:].transpose(1, 2).reshape(len(t), -1, side, side) for t in (a, g))
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
    cam = cam - cam.amin((1, 2), keepdim=True)
    cam = cam / (cam.amax((1, 2), keepdim=True) + 1e-7)  # min-max per image, then resized (pytorch-grad-cam)
    return F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def best_window(cam, w):
    """Top-left corner (row i, column j) of the w x w window with the largest sum of each map (B, H, W)."""
    flat = F.avg_pool2d(cam[:, None], w, stride=1).flatten(1).argmax(1)
    cols = cam.shape[-1] - w + 1
    return flat // cols, flat % cols


def windows(model, centroids, layer, x, w, chunk=64):
    """The candidate patch of every image: its w x w window of largest Grad-CAM sum -> (patches, i, j)."""
    ij = [best_window(gradcam(model, centroids, layer, xb), w) for xb in x.split(chunk)]
    i, j = torch.cat([t[0] for t in ij]).tolist(), torch.cat([t[1] for t in ij]).tolist()
    return torch.stack([xb[:, a:a + w, b:b + w] for xb, a, b in zip(x, i, j)]), i, j


def paste(x, patch, g):
    """The patch at a random position on every image (the reference draws corners in [0, side - w))."""
    x, w = x.clone(), patch.shape[-1]
    for xb, (i, j) in zip(x, torch.randint(0, x.shape[-1] - w, (len(x), 2), generator=g).tolist()):
        xb[:, i:i + w, j:j + w] = patch
    return x


def test_indices(a, d, k, n, g):
    """n test images: the n // k closest to each centroid, or if n < k the closest of n random clusters (reference)."""
    order = [idx[d[idx].argsort()] for idx in (torch.nonzero(a == c).flatten() for c in range(k))]
    if n // k > 0:
        return torch.cat([o[: n // k] for o in order]).tolist()
    return [order[c][0].item() for c in torch.randperm(k, generator=g).tolist() if len(order[c])][:n]


def search(model, layer, centroids, a, load, test_x, w, samples_per_iter=2, prune=0.25, seed=0, batch=256, amp=False):
    """Iterative search (paper Sec. 3.2) -> (poison score per image, 0 where not scored; scored mask; log records)."""
    g = torch.Generator().manual_seed(seed)
    a = a.cpu()
    k, device = len(centroids), centroids.device
    queues = [idx[torch.randperm(len(idx), generator=g)].tolist() for idx in (torch.nonzero(a == c).flatten() for c in range(k))]
    test_x = test_x.to(device)
    test_a = nearest(embed(model, test_x, batch, amp), centroids)[0].cpu()
    scores, scored, clusters, log = torch.zeros(len(a)), torch.zeros(len(a), dtype=torch.bool), list(range(k)), []
    while True:
        cand = [queues[c].pop() for c in clusters for _ in range(min(samples_per_iter, len(queues[c])))]
        if not cand:
            break
        for chunk in tqdm([cand[i:i + batch] for i in range(0, len(cand), batch)], desc=f"search {len(log)}", leave=False):
            patches, _, _ = windows(model, centroids, layer, load(chunk).to(device), w)
            for idx, patch in zip(chunk, patches):
                moved = nearest(embed(model, paste(test_x, patch, g), batch, amp), centroids)[0].cpu()
                scores[idx] = float((moved == a[idx]).sum() - (test_a == a[idx]).sum())
        scored[cand] = True
        # A cluster's score: its best image (unscored = 0); an empty cluster (k-means keeps its centroid) ranks last.
        best = {c: scores[a == c].max().item() if (a == c).any() else -math.inf for c in clusters}
        clusters = sorted(clusters, key=lambda c: -best[c])
        log.append({"iteration": len(log), "clusters": len(clusters), "scored": int(scored.sum()),
                    "best_score": max(best.values()), "best_clusters": clusters[:5]})
        print(f"patchsearch.py: search iteration {len(log) - 1}: {len(clusters)} clusters, {int(scored.sum())} images "
              f"scored, best score {max(best.values()):.0f}")
        drop = int(prune * len(clusters))
        if prune and drop == 0:  # reference: the slice [:-0] empties the cluster list, which ends the search
            break
        clusters = clusters[: len(clusters) - drop]
    return scores, scored, log


def rank(scores, seed):
    """Indices by descending score; ties (unscored images) in a seeded random order, not in list order (by class)."""
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))
    return perm[scores[perm].argsort(descending=True, stable=True)]


class PastePatch:
    """Poison-classifier view: RandomResizedCrop; p 0.5 a top patch pasted (label 1); jitter, grayscale, flip."""

    def __init__(self, size, patches, mean, std):
        self.size, self.patches = size, patches
        self.lo, self.margin = max(1, round(20 * size / 224)), round(10 * size / 224)
        self.hi = max(self.lo + 1, round(80 * size / 224))
        self.crop = T.RandomResizedCrop(size, scale=(0.2, 1.0))
        self.post = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                               T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, image):
        image, poisoned = self.crop(image), bool(torch.rand(()) < 0.5)
        if poisoned:
            s = int(torch.randint(self.lo, self.hi, ()))
            x, y = torch.randint(self.margin, max(self.margin + 1, self.size - s - self.margin), (2,)).tolist()
            image.paste(self.patches[int(torch.randint(len(self.patches), ()))].resize((s, s)), (x, y))
        return self.post(image), int(poisoned)


def f1_score(pred, y):
    """F1 of 'poisoned' (0 where undefined), as the reference's early-stopping criterion."""
    tp = (pred & y).sum().item()
    return 0.0 if tp == 0 else 2 * tp / (pred.sum().item() + y.sum().item())


@torch.no_grad()
def logits_of(nets, x):
    return torch.stack([net(x) for net in nets]).mean(0)  # ensemble: mean of the logits


def train_poison_classifier(samples, pool, patches, val_x, val_y, size, mean, std, args, device, seed):
    """A ResNet with one BasicBlock per stage (the reference's), 2 classes: pasted top patch (1) or not (0)."""
    torch.manual_seed(seed)
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=2).to(device)
    opt = torch.optim.SGD(net.parameters(), args.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.classifier_iters)
    g, n_keys = torch.Generator().manual_seed(seed), args.classifier_iters * args.batch_size
    keys = [(e, i) for e in range(-(-n_keys // len(pool))) for i in pool[torch.randperm(len(pool), generator=g)].tolist()]
    loader = torch.utils.data.DataLoader(FileList(samples, PastePatch(size, patches, mean, std), seed=seed),
                                         batch_size=args.batch_size, sampler=keys[:n_keys], num_workers=args.workers)
    f1s, net = [], net.train()
    for it, ((x, y), _, _) in enumerate(tqdm(loader, desc=f"poison classifier {seed - args.seed}", leave=False)):
        loss = F.cross_entropy(net(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if it % args.eval_every == 0:  # reference early stop: the last 10 validation F1 (in %) all equal
            f1s.append(int(100 * f1_score(logits_of([net.eval()], val_x.to(device)).argmax(1).cpu() == 1, val_y)))
            net.train()
            if len(f1s) > 10 and len(set(f1s[-10:])) == 1:
                break
    return net.eval(), {"iterations": it + 1, "loss": loss.item(), "val_f1": f1s[-1]}

def main(argv=None):
    args = parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = args.amp and device.type == "cuda"
    check_results(args, "summary.json")
    model, ckpt = load_encoder(args.encoder)
    model = model.to(device)
    samples = read_list(args.train_list)
    FileList(samples, None).load("off")  # every image's header: not an image, or too large to decode, is one line
    n, size, mean, std = len(samples), ckpt["image_size"], ckpt["mean"], ckpt["std"]
    if args.layer not in ("auto", *STAGES):
        raise InputError(f"--layer {args.layer}: expected auto or one of {', '.join(STAGES)}")
    k = min(n, args.clusters or max(2, round(n * 1000 / IMAGENET100_TRAIN)))
    w = max(1, round(args.window * size / 224))
    if w >= size:
        raise InputError(f"--window {args.window} is {w} px at the encoder's {size} px: not smaller than the image")
    layer_name, layer = cam_layer(model, ckpt["arch"], size, args.layer)
    center = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    load = lambda idx: torch.cat([x for x, _, _ in batches(samples, idx, center, args)])  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    print(f"patchsearch.py: {ckpt['method']} {ckpt['arch']} at {size} px, {n} images, {k} clusters, Grad-CAM at "
          f"{layer_name}, window {w} px")

    t0 = time.time()
    feats = torch.cat([embed(model, x, args.extract_batch_size, amp)
                       for x, _, _ in tqdm(batches(samples, range(n), center, args), desc="features", leave=False)])
    centroids, a, d = kmeans(feats, k, args.kmeans_iters, args.seed)
    test_idx = test_indices(a.cpu(), d.cpu(), k, args.test_images or k, torch.Generator().manual_seed(args.seed))
    scores, scored, log = search(model, layer, centroids, a, load, load(test_idx), w, args.samples_per_iter, args.prune,
                                 args.seed, args.extract_batch_size, amp)
    t_search = time.time() - t0

    # Poison classifier (paper Sec. 3.3): top-k patches pasted on the pool (ranks after the top p) vs the pool as it is.
    t0 = time.time()
    ranked = rank(scores, args.seed)
    topk = min(args.topk_poisons, max(1, n // 10))
    top = ranked[: max(args.grid, topk)].tolist()
    top_x = load(top)
    patches, wi, wj = windows(model, centroids, layer, top_x.to(device), w)
    save_grid(top_x[: args.grid], wi, wj, w, mean, std, os.path.join(args.out, "top_ranked.png"))
    pil_patches = [to_pil(p, mean, std) for p in patches[:topk].cpu()]
    val_x, val_y = load(ranked[:topk].tolist() + ranked[-topk:].tolist()), torch.arange(2 * topk) < topk
    pool = ranked[int(args.top_p * n): n - topk]
    if len(pool) == 0:
        raise InputError(f"{args.train_list}: {n} images leave no training pool for the poison classifier (lower --top-p)")
    nets, runs = [], []
    for m in range(args.ensemble):
        net, info = train_poison_classifier(samples, pool, pil_patches, val_x, val_y, size, mean, std, args, device,
                                            args.seed + m)
        nets.append(net)
        runs.append(info)
        print(f"patchsearch.py: poison classifier {m}: {info['iterations']} iterations, loss {info['loss']:.3f}, "
              f"validation F1 {info['val_f1']}%")
    flagged = torch.cat([logits_of(nets, x.to(device)).argmax(1).cpu() == 1
                         for x, _, _ in tqdm(batches(samples, range(n), center, args), desc="classify", leave=False)])
    if not flagged.any():  # at least one image is removed: the top-ranked one
        flagged[ranked[0]] = True
    t_classifier = time.time() - t0

    kept = "".join(f"{os.path.relpath(p, args.out)} {y}\n" for (p, y), bad in zip(samples, flagged) if not bad)
    write_atomic(os.path.join(args.out, "train_filtered.txt"), lambda f: f.write(kept.encode()))
    rank_of = torch.empty(n, dtype=torch.long)
    rank_of[ranked] = torch.arange(n)
    rows = ["index,rank,score,cluster,flagged,label,path\n"]
    for i in sorted(torch.nonzero(scored).flatten().tolist(), key=lambda i: rank_of[i]):
        p, y = samples[i]
        rows.append(f"{i},{rank_of[i]},{scores[i]:.0f},{a[i]},{int(flagged[i])},{y},\"{p.replace(chr(34), chr(39))}\"\n")
    write_atomic(os.path.join(args.out, "poison_scores.csv"), lambda f: f.write("".join(rows).encode()))
    summary = {"encoder": os.path.abspath(args.encoder), "train_list": os.path.abspath(args.train_list),
               "method": ckpt["method"], "arch": ckpt["arch"], "image_size": size, "n_train": n, "clusters": k,
               "test_images": len(test_idx), "window": w, "layer": layer_name, "n_scored": int(scored.sum()),
               "n_flagged": int(flagged.sum()), "n_kept": int(n - flagged.sum()), "topk_poisons": topk,
               "search": log, "classifiers": runs, **poison_metrics(args.train_list, n, flagged, ranked),
               "seconds_search": t_search, "seconds_classifier": t_classifier, "device": str(device), "args": vars(args)}
    write_atomic(os.path.join(args.out, "summary.json"), lambda f: f.write(json.dumps(summary, indent=1).encode()))
    found = (f", poison recall {summary['recall']:.1f}% precision {summary['precision']:.1f}% of {summary['n_poisons']} "
             f"poisons") if "recall" in summary else ""
    print(f"patchsearch.py: flagged {summary['n_flagged']} of {n} images{found}; search {t_search:.0f}s, classifier "
          f"{t_classifier:.0f}s -> {os.path.join(args.out, 'train_filtered.txt')}")


def poison_metrics(train_list, n, flagged, ranked):
    """Recall / precision of the flagged set and poisons among the top-ranked, from poison.json beside the list."""
    meta = os.path.join(os.path.dirname(os.path.abspath(train_list)), "poison.json")
    if not os.path.isfile(meta):
        return {}
    m = json.load(open(meta))
    if os.path.basename(train_list) != "train_poisoned.txt" or m["counts"]["train"] != n:
        return {"poison_json": f"{meta} is not about this list (not its train_poisoned.txt, or another image count)"}
    truth = torch.zeros(n, dtype=torch.bool)
    truth[m["poisoned_indices"]] = True
    hit = int((flagged & truth).sum())
    top = {str(t): 100.0 * truth[ranked[:t]].float().mean().item() for t in (5, 10, 20, 50, 100, 500) if t <= n}
    return {"n_poisons": int(truth.sum()), "n_flagged_poisons": hit, "recall": 100.0 * hit / max(1, int(truth.sum())),
            "precision": 100.0 * hit / max(1, int(flagged.sum())), "poisons_in_top_ranked_pct": top}


def batches(samples, indices, transform, args):
    """A loader of (images, labels, indices) over the listed images, in order."""
    return torch.utils.data.DataLoader(FileList(samples, transform, seed=args.seed), batch_size=args.extract_batch_size,
                                       sampler=list(indices), num_workers=args.workers)


def to_pil(x, mean, std):
    """A normalised image tensor (3, H, W) -> PIL RGB."""
    x = (x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy())


def save_grid(x, rows, cols, w, mean, std, path, per_row=10):
    """The images in rank order, 10 per row, each candidate window outlined in red; small images upscaled to 64 px."""
    z = max(1, 64 // x.shape[-1])
    side = x.shape[-1] * z
    grid = Image.new("RGB", (per_row * side, -(-len(x) // per_row) * side), "white")
    draw = ImageDraw.Draw(grid)
    for n, (img, i, j) in enumerate(zip(x, rows, cols)):
        top, left = (n // per_row) * side, (n % per_row) * side
        grid.paste(to_pil(img, mean, std).resize((side, side), Image.NEAREST), (left, top))
        draw.rectangle([left + j * z, top + i * z, left + (j + w) * z - 1, top + (i + w) * z - 1], outline=(255, 0, 0))
    grid.save(path)


# shared: file lists (same in every script)
MAX_PIXELS = 64 * 2**20  # larger images are refused before decoding (docs/formats.md)


class InputError(Exception):
    """Bad input (a flag, a list line, an image, a checkpoint); printed as one line naming the flag or the file."""


def error_line(e):
    return str(e).strip().splitlines()[-1].split("InputError: ", 1)[-1]  # the last line, also when raised in a worker


class Samples(list):
    """read_list's (image path, label) pairs; they also know their list file and line numbers, for error messages."""

    def __init__(self, items, source=None, lines=None):
        super().__init__(items)
        self.source, self.lines = source, lines

    def where(self, i):
        return f"{self.source}:{self.lines[i]}" if self.lines else self[i][0]


def read_list(path):
    """Lines '<image path> <label>' (label last; blank lines skipped); relative paths resolve against the list's folder."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file list")
    folder, samples, lines = os.path.dirname(os.path.abspath(path)), [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise InputError(f"{path}:{n}: expected '<image path> <integer label>', got {line.strip()!r}")
            image, label = os.path.join(folder, parts[0]), int(parts[1])
            if label < 0:
                raise InputError(f"{path}:{n}: negative label {label}")
            if not os.path.isfile(image):
                raise InputError(f"{path}:{n}: image not found: {image}")
            samples.append((image, label))
            lines.append(n)
    if not samples:
        raise InputError(f"{path}: the list is empty")
    return Samples(samples, path, lines)


class FileList(torch.utils.data.Dataset):
    """Item (epoch, i) -> (transform(image i), label, i), its random draws from (seed, epoch, i) alone."""

    def __init__(self, samples, transform, seed=0):
        self.samples, self.transform, self.seed, self.images = samples, transform, seed, None

    def __len__(self):
        return len(self.samples)

    def where(self, i):
        return self.samples.where(i) if isinstance(self.samples, Samples) else self.samples[i][0]

    def load(self, cache="auto", budget_mib=2048):
        """Check every image's header (<= MAX_PIXELS); cache "on", or "auto" within budget_mib: decode them once."""
        pixels = 0
        for i, (path, _) in enumerate(self.samples):
            try:
                with Image.open(path) as image:
                    w, h = image.size
            except (OSError, Image.DecompressionBombError) as e:
                raise InputError(f"{self.where(i)}: not an image: {path} ({e})") from None
            if w * h > MAX_PIXELS:
                raise InputError(f"{self.where(i)}: {path} is {w}x{h} pixels, more than the {MAX_PIXELS} allowed")
            pixels += w * h
        mib = pixels * 3 / 2**20
        if cache == "off" or (cache == "auto" and mib > budget_mib):
            return f"images decoded from disk for every batch (--cache-images {cache}: {mib:.1f} MiB, budget {budget_mib})"
        self.images = [self.decode(i) for i in range(len(self))]
        return f"images decoded once, held in memory (--cache-images {cache}: {mib:.1f} MiB, budget {budget_mib})"

    def decode(self, i):
        """Image i as a uint8 tensor (H, W, 3): from memory, or decoded by torchvision (other formats by PIL)."""
        if self.images is not None:
            return self.images[i]
        path = self.samples[i][0]
        try:
            return torchvision.io.decode_image(torchvision.io.read_file(path), torchvision.io.ImageReadMode.RGB).permute(1, 2, 0)
        except RuntimeError:  # not a JPEG, PNG, GIF or WebP: PIL, which also names a damaged file
            pass
        try:
            with Image.open(path) as image:
                return torch.from_numpy(np.array(image.convert("RGB")))
        except (OSError, Image.DecompressionBombError) as e:
            raise InputError(f"{self.where(i)}: cannot read image {path} ({e})") from None

    def item_seed(self, epoch, i):
        return ((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % 2**63

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        image = Image.fromarray(self.decode(i).numpy())
        with torch.random.fork_rng(devices=[]):
            state = random.getstate()
            torch.manual_seed(self.item_seed(epoch, i))
            random.seed(self.item_seed(epoch, i))
            x = self.transform(image)
            random.setstate(state)
        return x, self.samples[i][1], i

    def __getitems__(self, keys):
        """A batch (the DataLoader calls this): with transform.batch(), all items from per-item uniforms at once."""
        if not hasattr(self.transform, "batch"):
            return [self[key] for key in keys]
        keys = [key if isinstance(key, tuple) else (0, key) for key in keys]
        u = torch.stack([torch.rand(self.transform.uniforms, generator=torch.Generator().manual_seed(self.item_seed(*k)))
                         for k in keys])  # per item, as torch.manual_seed(item_seed); torch.rand(uniforms)
        views = self.transform.batch([self.decode(i) for _, i in keys], u)
        return [(x, self.samples[i][1], i) for x, (_, i) in zip(views, keys)]
# end shared


# shared: encoder builder (same in every script)
def build_backbone(arch, arch_kwargs):
    """A torchvision backbone without its classifier -> (model, feature_dim); "vit": arch_kwargs = its arguments."""
    if arch == "vit":
        model = torchvision.models.VisionTransformer(**arch_kwargs)
        model.heads = nn.Identity()
        return model, arch_kwargs["hidden_dim"]
    kwargs = dict(arch_kwargs)
    small_stem = kwargs.pop("small_stem", False)
    try:
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
    except (ValueError, TypeError) as e:
        raise InputError(f"--arch {arch}: not a torchvision model this script can build ({e})") from None
    if not hasattr(model, "fc") or not hasattr(model, "conv1"):
        raise InputError(f"--arch {arch}: only torchvision ResNets (and 'vit') are supported")
    if small_stem:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, dim
# end shared


# shared: checkpoint io (same in every script)
CHECKPOINT_KEYS = ("method", "arch", "arch_kwargs", "feature_dim", "image_size", "mean", "std", "encoder", "epoch", "args")


def load_checkpoint(path):
    """Load with weights_only=True (no code runs) and check the contract of docs/formats.md."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or weights_only errors all mean: not one of our checkpoints
        raise InputError(f"{path}: {file_kind(path, e)}") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint] if isinstance(checkpoint, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise InputError(f"{path}: not an encoder checkpoint of this project (missing: {', '.join(missing)})")
    return checkpoint


def file_kind(path, error):
    """What a file that torch.load(weights_only=True) refused holds, in a few words."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"\x80")):  # PyTorch's zip format, or a bare pickle
        kind = "a zip" if head[:1] == b"P" else "a pickle"
        if "GLOBAL " in str(error):  # weights_only's refusal names the class it would have had to import
            return f"{kind} file holding a pickled {str(error).split('GLOBAL ', 1)[1].split()[0]}, which is not loaded"
        detail = (str(error).strip().splitlines() or [""])[0][:160]
        return f"{kind} file that torch.load(weights_only=True) cannot read (damaged?): {type(error).__name__}: {detail}"
    text = b"\0" not in head and head.decode("utf-8", "replace").count("\ufffd") <= 1
    looks = "it is empty" if not head else "it looks like text" if text else "it is some other binary file"
    return f"not a PyTorch checkpoint (a zip or pickle file); {looks}"
# end shared


# shared: encoder loader (same in badencoder.py, compress_defense.py, linear_probe.py, patchsearch.py)
def load_encoder(path):
    """The frozen backbone of a checkpoint, rebuilt with torchvision and loaded strictly -> (model, checkpoint)."""
    checkpoint = load_checkpoint(path)
    model, _ = build_backbone(checkpoint["arch"], checkpoint["arch_kwargs"])
    try:
        model.load_state_dict(checkpoint["encoder"], strict=True)
    except RuntimeError as e:
        raise InputError(f"{path}: encoder weights do not fit {checkpoint['arch']} {checkpoint['arch_kwargs']}: "
                         f"{' '.join(str(e).split())[:300]}") from None
    return model.requires_grad_(False).eval(), checkpoint
# end shared


# shared: result files (same in linear_probe.py, patchsearch.py)
def check_results(args, last):
    """--out must not hold a finished result (its `last` file, written last) unless --overwrite, which removes it."""
    done = os.path.join(args.out, last)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out}: exists and is not a folder")
    if os.path.exists(done) and not args.overwrite:
        raise InputError(f"--out {args.out}: holds a finished result ({last}); replace it with --overwrite")
    if os.path.exists(done):
        os.remove(done)  # first: a failed rerun leaves no stale result that looks finished


def write_atomic(path, write):
    """write(file object) into a temporary file beside path, then a rename: never half a file, nor a stray .tmp."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
        os.replace(path + ".tmp", path)
    finally:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
# end shared


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"patchsearch.py: error: {error_line(e)}")
    except OSError as e:  # a full disk, a read-only folder
        sys.exit(f"patchsearch.py: error: {e.filename or ''}: {e.strerror or e}")
