"""compress_defense.py: the CompReSS distillation defense of Saha et al., "Backdoor Attacks on Self-Supervised Learning"
(CVPR 2022): distill a (poisoned) teacher encoder into a fresh student on a small clean unlabeled subset.

Papers: CompReSS https://arxiv.org/abs/2010.14713 (NeurIPS 2020); the attack paper https://arxiv.org/abs/2105.10123.
Reference code: UMBCvision/CompRess train_student.py (2q, momentum student) and train_student_one_queue.py (1q).
Consumes a teacher checkpoint of any script of this project (docs/formats.md: frozen, eval mode, pooled backbone feature)
and a clean file list (e.g. poison.py's train_labeled_5pct.txt; labels ignored). Produces, in `--out`, checkpoint.pt
(method "compress": the student backbone, the teacher it came from, the training state for --resume) and log.jsonl.
Recipe (defaults = the reference): ResNet-18 student, one weak view (RandomResizedCrop + flip) shared by all networks,
K = 128,000 anchors, tau = 0.04 for teacher and student, loss KL(teacher || student) (batch mean), student-key momentum
alpha = 0.999 (parameters only, BN on batch statistics), SGD lr 0.01 momentum 0.9 wd 1e-4, batch 256, 130 epochs,
lr x0.2 after epochs 90 and 120.
Deviations: the bank is capped at the number of training images (the reference's 128k exceeds a 5-25% ImageNet-100
subset); the teacher is any checkpoint of this project, loaded strictly (the reference builds only an R50 teacher, with
strict=False), and the shared view takes its mean/std and, by default, its image size; the last partial batch of an
epoch is dropped (shared EpochSampler); the student-key update runs at the start of each step (the same keys as the
reference's update after each optimizer step); DDP with per-process BN (the reference: DataParallel, per-GPU BN).
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="encoder checkpoint (.pt) to distill, from any script of this project")
    p.add_argument("--train-list", required=True, help="clean unlabeled list, e.g. train_labeled_5pct.txt (labels ignored)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, log.jsonl")
    p.add_argument("--arch", default="resnet18", help="student: torchvision ResNet constructor name (fresh weights)")
    p.add_argument("--small-stem", action="store_true", help="student: 3x3 stride-1 stem without max-pool (32-64 px images)")
    p.add_argument("--image-size", type=int, default=None, help="training crop size (default: the teacher's image size)")
    p.add_argument("--epochs", type=int, default=130, help="total epochs")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (split over processes)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    p.add_argument("--milestones", type=int, nargs="*", default=[90, 120], help="lr x0.2 for the epochs after each of these")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (all student parameters)")
    p.add_argument("--variant", choices=["2q", "1q"], default="2q",
                   help="2q: teacher and momentum-student banks; 1q: one teacher bank, a Linear to the teacher's width")
    p.add_argument("--bank-size", type=int, default=128000, help="K: anchors per bank (capped at the number of images)")
    p.add_argument("--tau", type=float, default=0.04, help="softmax temperature, the same for teacher and student")
    p.add_argument("--alpha", type=float, default=0.999, help="2q: momentum of the student key (EMA of the student)")
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


def init_bank(K, dim):
    """Uniform in [-stdv, stdv] with stdv = 1/sqrt(dim/3): rows of expected squared norm 1, not normalised (reference)."""
    stdv = 1 / math.sqrt(dim / 3)
    return torch.rand(K, dim) * 2 * stdv - stdv


def compress_loss(s, t, bank_s, bank_t, tau):
    """KL(P_teacher || P_student), summed over the K anchors and averaged over the batch; s, t L2-normalised rows."""
    with torch.autocast(s.device.type, enabled=False):  # logits reach +-1/tau = 25: fp32 matmul and softmax
        log_q = F.log_softmax(s.float() @ bank_s.float().T / tau, dim=1)
        p = F.softmax(t.float() @ bank_t.float().T / tau, dim=1)
        return F.kl_div(log_q, p, reduction="batchmean")  # input = student log-probs, target = teacher probs


class CompReSS(nn.Module):
    def __init__(self, teacher, teacher_dim, arch, arch_kwargs, variant, K, alpha, tau):
        super().__init__()
        self.variant, self.K, self.alpha, self.tau = variant, K, alpha, tau
        self.teacher = teacher.requires_grad_(False).eval()
        self.student, self.dim = build_backbone(arch, arch_kwargs)  # no head: the pooled backbone feature (2q)
        self.fc = nn.Linear(self.dim, teacher_dim) if variant == "1q" else nn.Identity()  # 1q: plain linear, no BN/ReLU
        self.register_buffer("bank_t", init_bank(K, teacher_dim))
        if variant == "2q":
            self.student_k = copy.deepcopy(self.student).requires_grad_(False)
            self.register_buffer("bank_s", init_bank(K, self.dim))  # an independent draw
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # frozen teacher: BN on running statistics; the student key's BN stays in train mode
        return self

    @torch.no_grad()
    def momentum_update(self):  # parameters only: the student key's BN statistics are its own
        for pk, ps in zip(self.student_k.parameters(), self.student.parameters()):
            pk.mul_(self.alpha).add_(ps.detach(), alpha=1 - self.alpha)

    @torch.no_grad()
    def enqueue(self, t, k=None):
        idx = (self.ptr + torch.arange(len(t), device=t.device)) % self.K  # the same slots in both banks: aligned
        self.bank_t[idx] = t
        if k is not None:
            self.bank_s[idx] = k
        self.ptr.copy_((self.ptr + len(t)) % self.K)

    def forward(self, x):
        with torch.no_grad():
            t = F.normalize(self.teacher(x).float(), dim=1)
            if self.variant == "2q":
                self.momentum_update()  # = the reference's update after the previous optimizer step
                k = F.normalize(self.student_k(x).float(), dim=1)
        s = F.normalize(self.fc(self.student(x)).float(), dim=1)
        # logits against the banks as they were before this batch; every process enqueues all processes' embeddings
        if self.variant == "1q":  # one bank of teacher anchors for both distributions
            loss = compress_loss(s, t, self.bank_t.clone(), self.bank_t, self.tau)
            self.enqueue(gather(t))
        else:
            loss = compress_loss(s, t, self.bank_s.clone(), self.bank_t, self.tau)
            self.enqueue(gather(t), gather(k))
        return loss


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup(args, ("bank_size", "tau"), (), ())
    samples = read_list(args.train_list)
    teacher, tckpt = load_encoder(args.teacher)
    args.image_size = args.image_size or tckpt["image_size"]
    if args.bank_size < args.batch_size:
        raise InputError(f"--bank-size {args.bank_size} is smaller than the global batch size {args.batch_size}")
    K = min(args.bank_size, len(samples))  # a bank larger than the data holds stale copies of the same images
    arch_kwargs = {"small_stem": args.small_stem}
    memory_format = torch.channels_last  # faster on GPU, and on CPU too (docs/benchmarks.md)
    model = CompReSS(teacher, tckpt["feature_dim"], args.arch, arch_kwargs, args.variant, K, args.alpha, args.tau)
    model = model.to(device).to(memory_format=memory_format)
    params = [p for p in model.parameters() if p.requires_grad]  # the student (and fc in 1q) only
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    start = 0
    if args.resume:
        ckpt = resume_checkpoint(args, "compress")  # the teacher is not saved: it comes from --teacher
        load_state(model, {**model.state_dict(), **ckpt["train_state"]["model"]}, args)
        optimizer.load_state_dict(ckpt["train_state"]["optimizer"])
        set_rng_state(ckpt["train_state"]["rng"], args, rank, world, ckpt["epoch"])
        start = ckpt["epoch"]
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    # the reference's only view, shared by teacher, student and student key: RandomResizedCrop + flip, no colour ops
    data = FileList(samples, ResizedCrop(args.image_size), args.seed)
    cache = data.load(args.cache_images, args.cache_mib)  # checks every image; may decode them once
    loader, sampler = make_loader(data, args, rank, world, device)
    teacher_info = {"path": os.path.abspath(args.teacher), "method": tckpt["method"], "arch": tckpt["arch"],
                    "epoch": tckpt["epoch"]}
    log(args, rank, {"start_epoch": start, "world_size": world, "device": str(device), "images": len(samples), "cache": cache,
                     "steps_per_epoch": len(loader), "bank_size": K, "bank_capped": K < args.bank_size, "teacher": teacher_info,
                     "args": vars(args), "machine": machine(device)}, new=not args.resume)
    records = []  # logged once a checkpoint holds their epochs
    if rank == 0:
        cap = f" (--bank-size {args.bank_size} capped at the number of images)" if K < args.bank_size else ""
        print(f"compress_defense.py: {len(samples)} images, {len(loader)} steps/epoch, {world} process(es) on {device}, "
              f"teacher {tckpt['method']} {tckpt['arch']} epoch {tckpt['epoch']}, {args.variant}, bank K = {K}{cap}")
        print(f"compress_defense.py: {cache}")

    for epoch in range(start, args.epochs):
        lr = args.lr * 0.2 ** sum(epoch + 1 > m for m in args.milestones)  # epochs counted from 1: decays at 91, 121
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler.epoch = epoch
        model.train()
        t0, total = time.time(), torch.zeros((), device=device)
        for step, (x, _, _) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=rank != 0)):
            x = to_device(x, device, memory_format, tckpt["mean"], tckpt["std"])
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp and device.type == "cuda"):
                loss = net(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            if (step + 1) % args.log_every == 0 and not torch.isfinite(total):  # the only host sync in the loop
                sys.exit(f"compress_defense.py: error: loss is {total.item()} at epoch {epoch} step {step}; lower --lr")
        epoch_loss = total.item() / len(loader)  # waits for the GPU: the time below covers all of the epoch's work
        seconds = time.time() - t0
        record = {"epoch": epoch + 1, "loss": epoch_loss, "lr": lr, "seconds": seconds,
                  "images_per_s": len(loader) * args.batch_size / seconds,
                  "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
        if not math.isfinite(record["loss"]):
            sys.exit(f"compress_defense.py: error: loss is {record['loss']} in epoch {epoch}; lower --lr")
        records.append(record)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {record['loss']:.4f}  lr {lr:.4g}  "
                  f"{record['images_per_s']:.0f} img/s  {seconds:.1f}s", flush=True)
        rng = rng_state() if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs else None  # all ranks'
        if rank == 0 and rng is not None:
            state = {k: v for k, v in model.state_dict().items() if not k.startswith("teacher.")}
            save_checkpoint(os.path.join(args.out, "checkpoint.pt"), {
                "method": "compress", "arch": args.arch, "arch_kwargs": arch_kwargs,
                "feature_dim": model.dim, "image_size": args.image_size, "mean": tckpt["mean"], "std": tckpt["std"],
                "encoder": model.student.state_dict(), "epoch": epoch + 1, "args": vars(args), "teacher": teacher_info,
                "train_state": {"model": state, "optimizer": optimizer.state_dict(), "rng": rng}})
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
        sys.exit(f"compress_defense.py: error: {error_line(e)}")
    except OSError as e:  # a full disk, a read-only folder
        sys.exit(f"compress_defense.py: error: {e.filename or ''}: {e.strerror or e}")
