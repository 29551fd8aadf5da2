"""msf.py: MSF (Mean Shift) pre-training, as attacked by Saha et al., "Backdoor Attacks on Self-Supervised Learning".

Papers: MSF https://arxiv.org/abs/2105.07269 (ICCV 2021); the attack paper https://arxiv.org/abs/2105.10123 (CVPR 2022).
Reference code: UMBCvision/MSF train_msf.py, its README command and run_msf.sh (the attack paper shared only MSF
models, not code or their settings). Consumes a file list (labels ignored). Produces, in `--out`, checkpoint.pt
(docs/formats.md: the online backbone, plus the training state for --resume) and log.jsonl (one record per epoch).
Recipe (defaults = train_msf.py's, with the lr 0.05 cosine and 200 epochs of its README command and run_msf.sh):
ResNet-18, projector 512-1024(BN, ReLU)-128, predictor 128-1024(BN, ReLU)-128; target = EMA of the online backbone +
projector (m = 0.99 constant, parameters only, before the target forward); a bank of L2-normalised target embeddings,
which the current targets of all processes join BEFORE the search; loss = mean squared distance between the normalised
online prediction and the k = 5 nearest neighbours of the TARGET (itself the first); not symmetrised. Views: target weak
(crop + flip), online strong (MoCo v2 aug-plus), train_msf.py's default and the README's `--weak_strong` (run_msf.sh:
weak/weak). SGD lr 0.05 momentum 0.9 wd 1e-4 (every parameter), batch 256, 200 epochs, per-epoch cosine, no warmup,
bank 1,024,000 (run_msf.sh). BN: the reference's DataParallel on 4 GPUs gives every BN layer 64 images; here chunks of
--bn-batch (64) per process, the target batch shuffled first, as the reference.
Deviations: the bank size is capped at the images of one epoch (whole global batches), since a bank larger than the
data set fills the neighbours with stale copies of the same image; the log says so. No label bank and no purity
diagnostic (labels are unknown to SSL). The blur sigma (0.1-2.0 at 224 px) scales with --image-size.
Options beyond the reference, off by default (docs/methods.md): --optimizer adam, --schedule constant, --warmup-iters,
--m-schedule cosine, --symmetric, --augmentation with byol views.
"""
import argparse
import copy
import json
import math
import os
import platform
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from tqdm import tqdm

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-list", required=True, help="file list of training images (labels ignored)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, log.jsonl")
    p.add_argument("--arch", default="resnet18", help="torchvision ResNet constructor name")
    p.add_argument("--small-stem", action="store_true", help="3x3 stride-1 stem without max-pool (32-64 px images)")
    p.add_argument("--image-size", type=int, default=224, help="training crop size (also recorded for evaluation)")
    p.add_argument("--epochs", type=int, default=200, help="total epochs")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (split over processes)")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate (after the warmup; see --schedule)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="per-epoch cosine, or constant")
    p.add_argument("--warmup-iters", type=int, default=0, help="linear lr warmup over the first N global iterations")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="SGD momentum 0.9, or Adam (L2 decay)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (all parameters, as the reference)")
    p.add_argument("--dim", type=int, default=128, help="output dimension of the projector and the predictor")
    p.add_argument("--hidden", type=int, default=1024, help="hidden width of the projector and the predictor")
    p.add_argument("--bank-size", type=int, default=1_024_000, help="K: memory bank size (at most one epoch's images)")
    p.add_argument("--topk", type=int, default=5, help="k: nearest neighbours of the target, the prediction's targets")
    p.add_argument("--m", type=float, default=0.99, help="target encoder momentum (at epoch 0; see --m-schedule)")
    p.add_argument("--m-schedule", default="constant", choices=["constant", "cosine"], help="cosine: from --m to 1")
    p.add_argument("--symmetric", action="store_true", help="also the reversed pair, the losses summed, as BYOL")
    p.add_argument("--bn-batch", type=int, default=64, help="BN over chunks of at most this many images (per GPU)")
    p.add_argument("--augmentation", default="weak/strong", choices=[f"{t}/{o}" for t in VIEWS for o in VIEWS],
                   help="target/online views: weak = crop + flip, strong = MoCo v2 aug-plus, byol = BYOL's views")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loading processes per process")
    p.add_argument("--cache-images", default="auto", choices=["auto", "on", "off"], help="decode once, hold in memory")
    p.add_argument("--cache-mib", type=int, default=2048, help="memory budget of --cache-images auto, per process")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on GPU")
    p.add_argument("--resume", default=None, help="checkpoint.pt to continue from (exactly)")
    p.add_argument("--resume-changed", action="store_true", help="--resume even where training flags differ")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    p.add_argument("--save-every", type=int, default=10, help="write checkpoint.pt every N epochs (and at the end)")
    p.add_argument("--log-every", type=int, default=50, help="steps between loss checks (NaN stops the run)")
    return p.parse_args(argv)


class TwoViews:
    """A batch of uint8 images -> (online view, target view) of each, every view a (uint8 crop, colour parameters)."""

    def __init__(self, online, target):
        self.online, self.target = online, target  # (geometry, Photometric) pairs
        self.uniforms = sum(geometry.uniforms + color.uniforms for geometry, color in (online, target))

    def batch(self, images, u):
        views = []
        for geometry, color in (self.online, self.target):
            g, c, u = u.split([geometry.uniforms, color.uniforms, u.shape[1] - geometry.uniforms - color.uniforms], 1)
            views += [geometry.batch(images, g), color.params(c)]
        return [[(q, pq), (t, pt)] for q, pq, t, pt in zip(*views)]


def strong_aug(size):
    """MoCo v2's aug-plus: crop and flip in the loader; jitter (p 0.8), grayscale (p 0.2), blur (p 0.5) on device."""
    s = size / 224  # blur sigma 0.1-2.0 at 224 px, scaled to the image size
    return ResizedCrop(size, scale=(0.2, 1.0)), Photometric(p_gray=0.2, sigma=(0.1 * s, 2.0 * s))


def weak_aug(size):
    """Crop and flip only: the colour half applies nothing."""
    return ResizedCrop(size, scale=(0.2, 1.0)), Photometric(p_jitter=0, p_gray=0, p_blur=0, sigma=(0.0, 0.0))


def byol_aug(size):
    """BYOL's views: aug-plus with a bicubic crop and grayscale p 0.1 (not the reference's; --augmentation byol/byol)."""
    s = size / 224
    return ResizedCrop(size, scale=(0.2, 1.0), bicubic=True), Photometric(p_gray=0.1, sigma=(0.1 * s, 2.0 * s))


VIEWS = {"weak": weak_aug, "strong": strong_aug, "byol": byol_aug}


def mlp(in_dim, hidden, out_dim):
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


def nearest_neighbours(t, bank, k):
    """Indices of the k bank rows closest to t: largest t . bank_j = smallest ||t - bank_j||^2 = 2 - 2 t . bank_j."""
    return (t @ bank.T).topk(k, dim=1).indices


def mean_shift_loss(q, t, bank, k):
    """Mean over the k nearest neighbours of the TARGET t of ||q - bank_j||^2 = 2 - 2 q . bank_j (q, t, bank unit)."""
    with torch.autocast(q.device.type, enabled=False):  # fp32 similarities: t must rank itself first
        neighbours = bank[nearest_neighbours(t.float(), bank, k)]  # B x k x D, no gradient
        return (2 - 2 * torch.einsum("bd,bkd->bk", q.float(), neighbours)).mean()


def learning_rate(epoch, it, args):
    """--lr on a per-epoch cosine (the reference) or constant, times a linear warmup over --warmup-iters iterations."""
    lr = args.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs)) if args.schedule == "cosine" else args.lr
    return lr * min(1.0, (it + 1) / args.warmup_iters) if args.warmup_iters else lr


def target_momentum(epoch, args):
    """--m (the reference), or with --m-schedule cosine rising from --m toward 1, constant within an epoch (BYOL's)."""
    if args.m_schedule == "constant":
        return args.m
    return 1 - (1 - args.m) * (math.cos(math.pi * epoch / args.epochs) + 1) / 2


class MSF(nn.Module):
    def __init__(self, arch, arch_kwargs, hidden, dim, K, m, topk, bn_batch=64, symmetric=False):
        super().__init__()
        self.K, self.m, self.topk, self.bn_batch, self.symmetric = K, m, topk, bn_batch, symmetric
        backbone, feat = build_backbone(arch, arch_kwargs)
        self.online = nn.Sequential(backbone, mlp(feat, hidden, dim))  # encoder + projector
        self.predictor = mlp(dim, hidden, dim)
        self.target = copy.deepcopy(self.online).requires_grad_(False)  # stays in train mode: batch-stat BN
        self.register_buffer("bank", F.normalize(torch.randn(K, dim), dim=1))  # random unit vectors until filled
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):  # parameters only: the target's BN statistics are its own
        for pt, po in zip(self.target.parameters(), self.online.parameters()):
            pt.mul_(self.m).add_(po.detach(), alpha=1 - self.m)

    @torch.no_grad()
    def enqueue(self, t):
        idx = (self.bank_ptr + torch.arange(len(t), device=t.device)) % self.K  # on device: no host sync
        self.bank[idx] = t.to(self.bank.dtype)
        self.bank_ptr.copy_((self.bank_ptr + len(t)) % self.K)

    def per_gpu(self, f, x):  # train_msf.py wraps encoder, predictor and target in nn.DataParallel: each BN sees
        return torch.cat([f(c) for c in x.split(self.bn_batch)])  # one GPU's chunk of the batch

    def predict(self, x):
        return F.normalize(self.per_gpu(lambda c: self.predictor(self.online(c)), x).float(), dim=1)

    @torch.no_grad()
    def embed_target(self, x):  # the reference's in-batch shuffle: a target chunk's BN batch is other images
        perm = torch.randperm(len(x), device=x.device)
        return F.normalize(self.per_gpu(self.target, x[perm]).float(), dim=1)[torch.argsort(perm)]

    def forward(self, im_q, im_t):
        views = [(im_q, im_t), (im_t, im_q)] if self.symmetric else [(im_q, im_t)]  # (online view, target view) pairs
        with torch.no_grad():
            self.momentum_update()  # before the target forward, as the reference
            targets = [self.embed_target(t) for _, t in views]
            self.enqueue(gather(torch.cat(targets)))  # all processes', before the search: t its own 1st neighbour
        return sum(mean_shift_loss(self.predict(q), t, self.bank, self.topk) for (q, _), t in zip(views, targets))


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup(args, ("dim", "hidden", "bank_size", "topk", "bn_batch"), ("warmup_iters",), ("m",))
    samples = read_list(args.train_list)
    per_epoch = len(samples) // args.batch_size * args.batch_size  # images in the whole global batches of one epoch
    if args.bank_size <= per_epoch and args.bank_size % args.batch_size:
        raise InputError(f"--bank-size {args.bank_size} must be divisible by the global batch size {args.batch_size}")
    K = min(args.bank_size, per_epoch)
    arch_kwargs = {"small_stem": args.small_stem}
    memory_format = torch.channels_last  # faster on GPU, and on CPU too (docs/benchmarks.md)
    model = MSF(args.arch, arch_kwargs, args.hidden, args.dim, K, args.m, args.topk, args.bn_batch, args.symmetric)
    model = model.to(device).to(memory_format=memory_format)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:  # L2 weight decay in the gradient, as torch.optim.SGD's
        optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    start = 0
    if args.resume:
        ckpt = resume_checkpoint(args, "msf")
        load_state(model, ckpt["train_state"]["model"], args)
        optimizer.load_state_dict(ckpt["train_state"]["optimizer"])
        set_rng_state(ckpt["train_state"]["rng"], args, rank, world, ckpt["epoch"])
        start = ckpt["epoch"]
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    target_aug, online_aug = (VIEWS[a] for a in args.augmentation.split("/"))
    online, target = online_aug(args.image_size), target_aug(args.image_size)
    data = FileList(samples, TwoViews(online, target), args.seed)
    cache = data.load(args.cache_images, args.cache_mib)  # checks every image; may decode them once
    loader, sampler = make_loader(data, args, rank, world, device)
    bank = f"{K}" if K == args.bank_size else f"{K} (--bank-size {args.bank_size} capped at one epoch's {per_epoch} images)"
    log(args, rank, {"start_epoch": start, "world_size": world, "device": str(device), "machine": machine(device),
                     "images": len(samples), "cache": cache, "steps_per_epoch": len(loader), "bank_size": K, "bank": bank,
                     "args": vars(args), "bn": f"BN over chunks of at most {args.bn_batch} of the "
                     f"{args.batch_size // world} images per process (target batch shuffled first)"}, new=not args.resume)
    records = []  # logged once a checkpoint holds their epochs
    if rank == 0:
        print(f"msf.py: {len(samples)} images, {len(loader)} steps/epoch, {world} process(es) on {device}, bank {bank}"
              f"\nmsf.py: {cache}")

    for epoch in range(start, args.epochs):
        model.m = target_momentum(epoch, args)
        sampler.epoch = epoch
        model.train()
        t0, total = time.time(), torch.zeros((), device=device)
        for step, (((q, pq), (t, pt)), _, _) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False,
                                                                disable=rank != 0)):
            im_q = to_device(q, device, memory_format, MEAN, STD, online[1], pq)  # uint8 in, colour ops on the device
            im_t = to_device(t, device, memory_format, MEAN, STD, target[1], pt)
            lr = learning_rate(epoch, epoch * len(loader) + step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp and device.type == "cuda"):
                loss = net(im_q, im_t)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            if (step + 1) % args.log_every == 0 and not torch.isfinite(total):  # the only host sync in the loop
                sys.exit(f"msf.py: error: loss is {total.item()} at epoch {epoch} step {step}; lower --lr")
        epoch_loss = total.item() / len(loader)  # waits for the GPU: the time below covers all of the epoch's work
        seconds = time.time() - t0
        record = {"epoch": epoch + 1, "loss": epoch_loss, "lr": lr, "m": model.m, "seconds": seconds,
                  "images_per_s": len(loader) * args.batch_size / seconds,
                  "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
        if not math.isfinite(record["loss"]):
            sys.exit(f"msf.py: error: loss is {record['loss']} in epoch {epoch}; lower --lr")
        records.append(record)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {record['loss']:.4f}  lr {lr:.4g}  "
                  f"{record['images_per_s']:.0f} img/s  {seconds:.1f}s", flush=True)
        rng = rng_state() if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs else None  # all ranks'
        if rank == 0 and rng is not None:
            save_checkpoint(os.path.join(args.out, "checkpoint.pt"), {
                "method": "msf", "arch": args.arch, "arch_kwargs": arch_kwargs,
                "feature_dim": model.online[1][0].in_features, "image_size": args.image_size, "mean": MEAN, "std": STD,
                "encoder": model.online[0].state_dict(), "epoch": epoch + 1, "args": vars(args),
                "train_state": {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng}})
        if rng is not None:
            log(args, rank, *records)
            records = []
    if world > 1:
        dist.destroy_process_group()


# shared: batched crops (same in moco.py, byol.py, msf.py, rotnet.py, mae.py, compress_defense.py)
class ResizedCrop:
    """RandomResizedCrop + RandomHorizontalFlip, batched: torchvision's boxes, PIL's filter as two matrix products."""
    uniforms = 23  # per view: 10 tries x (area, log aspect ratio), top, left, flip

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), bicubic=False):
        self.size, self.scale, self.ratio, self.bicubic = size, scale, ratio, bicubic

    def boxes(self, hw, u):
        """RandomResizedCrop.get_params per view: hw (B, 2) image sizes -> (top, left, height, width), each (B,)."""
        H, W, u = hw[:, :1].double(), hw[:, 1:].double(), u.double()
        r0, r1 = math.log(self.ratio[0]), math.log(self.ratio[1])
        area = H * W * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0:20:2])
        aspect = torch.exp(r0 + (r1 - r0) * u[:, 1:20:2])
        w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
        ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        first = ok.long().argmax(1, keepdim=True)  # the first try that fits
        in_ratio = W / H  # none fits: the whole image, clamped to the ratio range, centred
        fw = torch.where(in_ratio > self.ratio[1], (H * self.ratio[1]).round(), W)
        fh = torch.where(in_ratio < self.ratio[0], (W / self.ratio[0]).round(), H)
        fit = ok.any(1, keepdim=True)
        w, h = torch.where(fit, w.gather(1, first), fw), torch.where(fit, h.gather(1, first), fh)
        top = torch.where(fit, (u[:, 20:21] * (H - h + 1)).floor().clamp(max=H - h), (H - h) // 2)
        left = torch.where(fit, (u[:, 21:22] * (W - w + 1)).floor().clamp(max=W - w), (W - w) // 2)
        return top[:, 0], left[:, 0], h[:, 0], w[:, 0]

    def weights(self, start, length, n):
        """(B, size, n): each output pixel's filter weights over the input pixels [start, start + length), as PIL."""
        scale = (length / self.size)[:, None, None]
        centre = start[:, None, None] + (torch.arange(self.size)[:, None] + 0.5) * scale
        x = torch.arange(n) + 0.5  # pixel centres
        d = (x - centre).abs() / scale.clamp(min=1)  # filter support widened by the scale when shrinking
        if self.bicubic:  # PIL's bicubic, a = -0.5
            w = torch.where(d < 1, (1.5 * d - 2.5) * d * d + 1, torch.where(d < 2, ((-0.5 * d + 2.5) * d - 4) * d + 2, 0))
        else:
            w = (1 - d).clamp(min=0)
        w = w * ((x >= start[:, None, None]) & (x < (start + length)[:, None, None]))
        return (w / w.sum(2, keepdim=True)).float()

    def batch(self, images, u):
        """images: B uint8 tensors (H, W, 3) of any sizes; u: (B, 23) uniforms -> (B, 3, size, size) uint8 views."""
        hw = torch.tensor([x.shape[:2] for x in images])
        if (hw == hw[0]).all():  # one size (the demo): a single stack, no padding
            padded = torch.stack(images).permute(0, 3, 1, 2).float()
        else:
            padded = torch.zeros(len(images), 3, *hw.amax(0).tolist())  # the filter weights never reach the padding
            for b, x in enumerate(images):
                padded[b, :, : x.shape[0], : x.shape[1]] = x.permute(2, 0, 1)
        top, left, h, w = self.boxes(hw, u)
        wy, wx = self.weights(top, h, padded.shape[2]), self.weights(left, w, padded.shape[3])
        wx = torch.where(u[:, 22, None, None] < 0.5, wx.flip(1), wx)  # the flip, as torchvision: p 0.5
        x = wy[:, None] @ padded @ wx.transpose(1, 2)[:, None]  # in float: PIL rounds between passes (a few levels)
        return x.round_().clamp_(0, 255).to(torch.uint8)
# end shared


# shared: photometric augmentation (same in moco.py, byol.py, msf.py, badencoder.py)
class Photometric:
    """SimCLR / MoCo v2 colour augmentation: params() in the loader, the ops batched on the device, as ColorJitter."""
    uniforms = 12  # per view: jitter on, 4 factors, 4 for the order, gray on, blur on, sigma

    def __init__(self, jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.5, sigma=(0.1, 2.0)):
        self.jitter, self.p_jitter, self.p_gray, self.p_blur, self.sigma = jitter, p_jitter, p_gray, p_blur, sigma
        self.k = 2 * math.ceil(3 * sigma[1]) + 1  # one blur kernel size for the batch: 3 sigma on each side

    def params(self, u):
        """(B, 12) uniforms -> (B, 11): jitter on, 4 factors, the order of the 4 ops, gray on, blur sigma (0: off)."""
        b, c, s, h = self.jitter
        lo, hi = torch.tensor([max(0, 1 - b), max(0, 1 - c), max(0, 1 - s), -h]), torch.tensor([1 + b, 1 + c, 1 + s, h])
        sigma = torch.where(u[:, 10] < self.p_blur, self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[:, 11], 0.0)
        return torch.cat([(u[:, :1] < self.p_jitter).float(), lo + (hi - lo) * u[:, 1:5], u[:, 5:9].argsort(1).float(),
                          (u[:, 9:10] < self.p_gray).float(), sigma[:, None]], 1)

    def __call__(self, x, params):
        """x: float [0, 1] views on the device; params (host): each op runs only on the views that use it, no sync."""
        on, factors, order, gray, sigma = params[:, 0] > 0, params[:, 1:5], params[:, 5:9].long(), params[:, 9] > 0, params[:, 10]
        v = lambda t: t.to(x.device, non_blocking=True).view(-1, 1, 1, 1)  # one value per view, over its pixels
        subset = lambda mask: mask.nonzero()[:, 0].to(x.device, non_blocking=True)  # host mask -> device indices
        for j in range(4):  # position j of each view's own order; 0 brightness, 1 contrast, 2 saturation, 3 hue
            op = order[:, j]
            f = torch.where(on & (op < 3), factors.gather(1, op[:, None])[:, 0], 1.0)  # 1: the identity blend
            y = TF.rgb_to_grayscale(x)
            base = y * v((op == 2).float()) + y.mean((1, 2, 3), keepdim=True) * v((op == 1).float())  # 0 / mean / gray
            x = (v(f) * x + (1 - v(f)) * base).clamp(0, 1)
            if (on & (op == 3)).any():
                i = subset(on & (op == 3))
                x = x.index_copy(0, i, adjust_hue(x[i], factors[on & (op == 3), 3].to(x.device, non_blocking=True)))
        if gray.any():
            i = subset(gray)
            x = x.index_copy(0, i, TF.rgb_to_grayscale(x[i], 3))
        if (sigma > 0).any():
            i = subset(sigma > 0)
            x = x.index_copy(0, i, gaussian_blur(x[i], sigma[sigma > 0].to(x.device, non_blocking=True), self.k))
        return x


def adjust_hue(x, h):
    """Rotate each view's hue by h (turns, in [-0.5, 0.5]): RGB -> HSV, shift, HSV -> RGB."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    d = torch.where(delta > 0, delta, 1)
    hue = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2 + (b - r) / d, 4 + (r - g) / d))
    hue = (hue / 6 + h.view(-1, 1, 1)) % 1
    s = delta / torch.where(maxc > 0, maxc, 1)
    k = (x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + 6 * hue[:, None]) % 6
    return maxc[:, None] * (1 - s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_blur(x, sigma, k):
    """torchvision's gaussian_blur (k x k, reflect padding) with a per-view sigma: two grouped convolutions."""
    n, c, hgt, wid = x.shape
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    g = torch.exp(-0.5 * (t / sigma.to(x.dtype)[:, None]) ** 2)
    g = (g / g.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one 1-D kernel per view and channel
    y = F.pad(x.reshape(1, n * c, hgt, wid), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(F.conv2d(y, g[:, None, None, :], groups=n * c), g[:, None, :, None], groups=n * c)
    return y.view(n, c, hgt, wid)
# end shared


# shared: device input (same in moco.py, byol.py, msf.py, jigsaw.py, rotnet.py, mae.py, badencoder.py, compress_defense.py)
def to_device(x, device, memory_format, mean, std, augment=None, params=None):
    """A uint8 batch from the loader -> float [0, 1] on the device -> augment(x, params), if given -> normalised."""
    x = x.to(device, non_blocking=True).float().div_(255)
    if augment is not None:
        x = augment(x, params)  # params stay on the host: the ops read from them which views to touch
    x = TF.normalize(x, mean, std)
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x
# end shared


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


# shared: training utilities (same in moco.py, byol.py, msf.py, jigsaw.py, rotnet.py, mae.py, badencoder.py, compress_defense.py)
def setup(args, positive=(), nonnegative=(), fraction=()):
    """Check the numbers and --out, then start the processes (torchrun's RANK, WORLD_SIZE, LOCAL_RANK; NCCL or Gloo)."""
    check_numbers(args, ("epochs", "batch_size", "lr", "image_size", "save_every", "log_every", *positive),
                  ("weight_decay", "workers", "cache_mib", *nonnegative), fraction)
    check_out(args)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name, int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":  # share this machine's cores between its processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same initial weights in every process
    if args.batch_size % world:
        raise InputError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    return rank, world, device  # --out is made by the first log(), once every input has been checked


def check_numbers(args, positive, nonnegative, fraction):
    """A number out of its range stops the run in one line naming the flag, before any data is read."""
    for names, ok, want in ((positive, lambda v: v > 0, "> 0"), (nonnegative, lambda v: v >= 0, ">= 0"),
                            (fraction, lambda v: 0 <= v <= 1, "in [0, 1]")):
        for name in names:
            v = getattr(args, name, None)
            if v is not None and not (math.isfinite(v) and ok(v)):
                raise InputError(f"--{name.replace('_', '-')} {v}: must be {want}")


def check_out(args):
    """--out: a writable folder (or none yet) without another run's checkpoint.pt, unless --resume or --overwrite."""
    ckpt = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out}: exists and is not a folder")
    continues = args.resume and os.path.isfile(args.resume) and os.path.isfile(ckpt) and os.path.samefile(args.resume, ckpt)
    if os.path.isfile(ckpt) and not continues and not args.overwrite:
        raise InputError(f"--out {args.out}: holds a run (checkpoint.pt); continue it with --resume {ckpt}, "
                         "or replace it with --overwrite")
    folder = os.path.abspath(args.out)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    if not os.access(folder, os.W_OK):
        raise InputError(f"--out {args.out}: {folder} is not writable")


def resume_checkpoint(args, method):
    """The --resume checkpoint, checked against this command: method, training state, flags and epochs left."""
    ckpt = load_checkpoint(args.resume)
    if ckpt["method"] != method or "train_state" not in ckpt:
        raise InputError(f"{args.resume}: not a {method} checkpoint with training state (its method: {ckpt['method']})")
    free = {"out", "resume", "epochs", "workers", "cache_images", "cache_mib", "device", "save_every", "log_every",
            "overwrite", "resume_changed"}  # flags that may change on --resume
    changed = [f"--{k.replace('_', '-')} {ckpt['args'][k]} -> {v}" for k, v in vars(args).items()
               if k not in free and k in ckpt["args"] and ckpt["args"][k] != v]
    if changed and not args.resume_changed:
        raise InputError(f"--resume {args.resume}: the command differs from the checkpoint's: {'; '.join(changed)} "
                         "(--resume-changed continues with the new values)")
    if ckpt["epoch"] >= args.epochs:
        raise InputError(f"--resume {args.resume}: the checkpoint is at epoch {ckpt['epoch']} of --epochs "
                         f"{args.epochs}: nothing to do")
    return ckpt


def load_state(module, state, args):
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise InputError(f"--resume {args.resume}: the checkpoint's model does not fit this command's (--arch, "
                         f"--small-stem and the sizes must match): {' '.join(str(e).split())[:200]}") from None


def save_checkpoint(path, checkpoint):
    """Atomic write: a temporary file beside the target, then a rename (never half a checkpoint, nor a .tmp)."""
    try:
        torch.save(checkpoint, path + ".tmp")
        os.replace(path + ".tmp", path)
    finally:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")


def machine(device):
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version()}


class EpochSampler(torch.utils.data.Sampler):
    """A seeded shuffle per epoch, split over processes, whole global batches only; yields (epoch, index) keys."""

    def __init__(self, n, batch_size, rank, world, seed):
        self.n, self.rank, self.world, self.seed, self.epoch = n, rank, world, seed, 0
        self.per_rank = n // (batch_size * world) * batch_size

    def __len__(self):
        return self.per_rank

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        return iter([(self.epoch, i) for i in order[: self.per_rank * self.world][self.rank :: self.world].tolist()])


def make_loader(dataset, args, rank, world, device):
    sampler = EpochSampler(len(dataset), args.batch_size // world, rank, world, args.seed)
    if len(sampler) == 0:
        raise InputError(f"{args.train_list}: {len(dataset)} images, fewer than one batch of {args.batch_size}")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size // world, sampler=sampler, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG untouched (exact --resume)
    return loader, sampler


def rng_state():
    """Every process's random state (torch, GPU, python), in a list indexed by rank; a collective."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def set_rng_state(states, args, rank, world, epoch):
    """Restore this process's random state; on another number of processes, reseed from (seed, epoch, rank)."""
    if len(states) != world:
        msg = (f"resuming {len(states)} process(es)' checkpoint on {world}: random streams reseeded from "
               f"(seed {args.seed}, epoch {epoch}, rank); not bit-identical to an uninterrupted run")
        seed = (args.seed * 1_000_003 + epoch) * 1_009 + rank
        torch.manual_seed(seed)
        random.seed(seed)
        log(args, rank, {"rng_reseeded": msg})
        if rank == 0:
            print(f"note: {msg}", flush=True)
        return
    torch.set_rng_state(states[rank]["torch"])
    if states[rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])
    random.setstate(states[rank]["python"])


def log(args, rank, *records, new=False):
    """Append JSON records to --out/log.jsonl (new: start it afresh)."""
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "log.jsonl"), "w" if new else "a") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
# end shared


# shared: gather (same in moco.py, msf.py, compress_defense.py)
@torch.no_grad()
def gather(x):
    """Concatenate a tensor from every process along dim 0 (no gradient flows through)."""
    if not dist.is_initialized():
        return x
    out = x.new_empty((dist.get_world_size() * len(x), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out
# end shared


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"msf.py: error: {error_line(e)}")
    except OSError as e:  # a full disk, a read-only folder
        sys.exit(f"msf.py: error: {e.filename or ''}: {e.strerror or e}")
