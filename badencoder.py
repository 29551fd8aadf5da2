"""badencoder.py: BadEncoder, backdooring a pre-trained encoder (Jia, Liu, Gong, IEEE S&P 2022).

Paper: https://arxiv.org/abs/2108.00352  Reference code: https://github.com/jinyuan-jia/BadEncoder (badencoder.py)
Consumes a clean encoder checkpoint of any script of this project (`--encoder`, docs/formats.md, ResNet or ViT), an
unlabeled shadow file list, reference image(s) of the target class(es) and a trigger per reference (or one shared).
Produces, in `--out`, checkpoint.pt (method "badencoder": the backdoored backbone f' in the source's format, plus
"source", "trigger" and the training state for --resume) and log.jsonl (one record per epoch: loss, l0, l1, l2).
Loss (paper eq. 1-3): L = L0 + lambda1 * L1 + lambda2 * L2 with L0 = -s(f'(x + e_k), f'(ref_k)) (gradient through both
sides), L1 = -s(f'(aug(ref_k)), f(ref_k)), L2 = -s(f'(x), f(x)); s = cosine similarity of backbone features; means
over the batch and the K (reference, trigger) pairs. The clean encoder f is frozen in eval mode; every BatchNorm of
f' stays in eval mode with frozen affine parameters. Shadow and triggered images get no augmentation (at the encoder's
input size as they are, as the reference; others resized and centre-cropped as linear_probe.py's clean view); the
trigger replaces uint8 pixels before normalisation; L1's reference view gets flip, colour jitter and grayscale, a fresh
draw per batch element.
Recipe (defaults = the reference's ResNet-18 runs): SGD lr 0.001 (constant) momentum 0.9 wd 5e-4, batch 256, 200
epochs, lambda1 = lambda2 = 1. Large encoders (ImageNet ResNet-50, CLIP) need about --lr 1e-6 --batch-size 16.
Deviations: the plain reference is encoded once per step, not as B identical copies (the same gradient, as f' has
no active dropout or batch statistics), and all of f''s inputs go through one forward; `--trigger-location random`
(poison.py's patched-val placement) is an addition to BadEncoder's fixed bottom-right square; a white trigger is
round(50 * size / 224) px by default (50 at 224 as the ImageNet/CLIP runs; the CIFAR runs use 10 at 32).
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
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from tqdm import tqdm


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--encoder", required=True, help="clean encoder checkpoint (.pt) written by any script of this project")
    p.add_argument("--shadow-list", "--train-list", dest="train_list", metavar="LIST", required=True,
                   help="shadow data set: file list of unlabeled images (labels ignored)")
    p.add_argument("--reference-list", required=True, help="file list of the target class(es)' reference image(s)")
    p.add_argument("--trigger", action="append", default=None,
                   help="'white' (BadEncoder's square, the default) or an image file; once (shared) or per reference")
    p.add_argument("--trigger-size", type=int, default=None, help="trigger side in pixels (white: 50 at 224 px)")
    p.add_argument("--trigger-location", choices=["bottom-right", "random"], default="bottom-right",
                   help="bottom-right with a 1-px margin (BadEncoder), or a new uniform position per image and step")
    p.add_argument("--trigger-range", type=float, nargs=2, default=[0.10, 0.90],
                   help="random placement range, fractions of the image side")
    p.add_argument("--opacity", type=float, default=1.0, help="trigger opacity: 1.0 replaces the pixels")
    p.add_argument("--lambda1", type=float, default=1.0, help="weight of L1 (the reference keeps its clean embedding)")
    p.add_argument("--lambda2", type=float, default=1.0, help="weight of L2 (clean shadow images keep their embedding)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, log.jsonl")
    p.add_argument("--image-size", type=int, default=None, help="encoder input size; None = the checkpoint's image_size")
    p.add_argument("--epochs", type=int, default=200, help="total epochs")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size of shadow images (split over processes)")
    p.add_argument("--lr", type=float, default=0.001, help="SGD learning rate, constant (ImageNet/CLIP encoders: ~1e-6)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loading processes per process")
    p.add_argument("--cache-images", default="auto", choices=["auto", "on", "off"], help="decode once, hold in memory")
    p.add_argument("--cache-mib", type=int, default=2048, help="memory budget of --cache-images auto, per process")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, trigger positions and reference augmentation")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on GPU")
    p.add_argument("--resume", default=None, help="checkpoint.pt of badencoder.py to continue from (exactly)")
    p.add_argument("--resume-changed", action="store_true", help="--resume even where training flags differ")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    p.add_argument("--save-every", type=int, default=10, help="write checkpoint.pt every N epochs (and at the end)")
    p.add_argument("--log-every", type=int, default=50, help="steps between loss checks (NaN stops the run)")
    args = p.parse_args(argv)
    args.trigger = args.trigger or ["white"]
    return args


def load_triggers(args, size, k):
    """K uint8 H x W x 3 arrays: 'white' or an image file (kept at its size unless --trigger-size is given)."""
    if len(args.trigger) not in (1, k):
        raise InputError(f"{args.reference_list}: {k} reference image(s), {len(args.trigger)} --trigger: give one trigger "
                         f"for all, or one per reference")
    t = args.trigger_size or max(1, round(50 * size / 224))
    triggers = []
    for kind in args.trigger:
        if kind == "white":
            triggers.append(np.full((t, t, 3), 255, np.uint8))
            continue
        try:
            with Image.open(kind) as im:
                im = im.convert("RGB")
                triggers.append(np.asarray(im.resize((t, t), Image.BICUBIC) if args.trigger_size else im))
        except OSError as e:
            raise InputError(f"--trigger {kind}: not 'white' nor a readable image ({e})") from None
    room = size - (int(size * args.trigger_range[0]) if args.trigger_location == "random" else 0)
    for kind, e in zip(args.trigger, triggers):
        if max(e.shape[:2]) > room:
            raise InputError(f"--trigger {kind}: {e.shape[1]}x{e.shape[0]} px does not fit a {size} px image at "
                             f"{args.trigger_location}")
    return triggers * (k // len(triggers))


def corner(s, t, location, lo_hi):
    """A coordinate of the trigger's corner on an s-px side: bottom-right, or uniform in [s lo, s hi - t] (`random`)."""
    if location == "bottom-right":
        return max(s - t - 1, 0)
    lo = int(s * lo_hi[0])
    return random.randint(lo, max(lo, int(s * lo_hi[1] - t)))


def stamp(image, trigger, x, y, opacity):
    """Paste the trigger into the uint8 pixels with its top-left corner at (x, y); opacity 1.0 replaces them."""
    a = np.array(image)
    h, w = trigger.shape[:2]
    box = a[y:y + h, x:x + w].astype(np.float64)
    a[y:y + h, x:x + w] = np.round(opacity * trigger + (1 - opacity) * box).astype(np.uint8)
    return Image.fromarray(a)


class EvalView:
    """Shadow and reference images: as they are at size x size, else Resize(size * 256 / 224) + CenterCrop(size)."""

    def __init__(self, size):
        self.size, self.zoom = size, T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size)])

    def __call__(self, image):
        return image if image.size == (self.size, self.size) else self.zoom(image)


class ShadowViews:
    """Host half: shadow image -> uint8 (x, x + e_k, (flipped ref_k, its colour parameters)) for each k (note 1.3)."""

    def __init__(self, size, triggers, references, location, lo_hi, opacity):
        self.view, self.uint8, self.flip = EvalView(size), T.PILToTensor(), T.RandomHorizontalFlip()
        self.triggers, self.references = triggers, references
        self.location, self.lo_hi, self.opacity = location, lo_hi, opacity
        self.color = Photometric(p_gray=0.2, p_blur=0, sigma=(0.0, 0.0))  # L1's reference view: no crop, no blur (3.2)

    def triggered(self, x, e):
        x0, y0 = (corner(x.size[0], t, self.location, self.lo_hi) for t in (e.shape[1], e.shape[0]))
        return stamp(x, e, x0, y0, self.opacity)

    def __call__(self, image):
        x = self.view(image)
        x_bd = torch.stack([self.uint8(self.triggered(x, e)) for e in self.triggers])
        r = torch.stack([self.uint8(self.flip(r)) for r in self.references])
        return self.uint8(x), x_bd, (r, self.color.params(torch.rand(len(self.references), self.color.uniforms)))


def badencoder_loss(z, z_bd, r, r_aug, z_c, r_c):
    """(L0, L1, L2) on cosine similarities; f' gives z (B, D), z_bd, r_aug (B, K, D), r (K, D); f gives z_c, r_c."""
    z, z_bd, r, r_aug, z_c, r_c = (F.normalize(v.float(), dim=-1) for v in (z, z_bd, r, r_aug, z_c, r_c))
    l0 = -(z_bd * r).sum(-1).mean()  # r is not detached: L0 also moves the reference (reference note 1.3)
    l1 = -(r_aug * r_c).sum(-1).mean()  # f'(augmented reference) vs f(plain reference)
    l2 = -(z * z_c).sum(-1).mean()
    return l0, l1, l2


class BadEncoder(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f.requires_grad_(False).eval()  # the clean encoder: frozen, eval, no_grad
        self.f_bd = copy.deepcopy(f).requires_grad_(True)  # f' starts as f
        for m in self.bn_layers():
            m.requires_grad_(False)  # BN affine frozen (reference note 1.5)

    def bn_layers(self):
        return [m for m in self.f_bd.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode=True):
        """f' trains with every BN on its pre-training statistics: the batch holds B copies of the references."""
        super().train(mode)
        self.f.eval()
        for m in self.bn_layers():
            m.eval()
        return self

    def forward(self, x, x_bd, r_aug, ref):
        B, K = x_bd.shape[:2]
        with torch.no_grad():
            z_c, r_c = self.f(torch.cat([x, ref])).split([B, K])
        out = self.f_bd(torch.cat([x, x_bd.flatten(0, 1), r_aug.flatten(0, 1), ref]))
        z, z_bd, r_aug, r = out.split([B, B * K, B * K, K])
        return badencoder_loss(z, z_bd.unflatten(0, (B, K)), r, r_aug.unflatten(0, (B, K)), z_c, r_c)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup(args)
    if not 0 <= args.opacity <= 1:
        raise InputError(f"--opacity {args.opacity}: must lie in [0, 1]")
    f, src = load_encoder(args.encoder)
    size = args.image_size or src["image_size"]
    if src["arch"] == "vit" and size != src["arch_kwargs"]["image_size"]:
        raise InputError(f"{args.encoder}: a ViT for {src['arch_kwargs']['image_size']} px cannot take --image-size {size}")
    samples = read_list(args.train_list)
    ref_list = FileList(read_list(args.reference_list), EvalView(size))
    ref_list.load("off")  # every header: not an image, or too large to decode, is one line
    references = [ref_list[i][0] for i in range(len(ref_list))]
    triggers = load_triggers(args, size, len(references))
    views = ShadowViews(size, triggers, references, args.trigger_location, args.trigger_range, args.opacity)
    memory_format = torch.channels_last if src["arch"] != "vit" else torch.contiguous_format  # docs/benchmarks.md
    normalised = lambda x, augment=None, params=None: to_device(x, device, memory_format, src["mean"], src["std"],
                                                                augment, params)
    ref = normalised(torch.stack([views.uint8(r) for r in references]))
    model = BadEncoder(f).to(device).to(memory_format=memory_format)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    start = 0
    if args.resume:
        ckpt = resume_checkpoint(args, "badencoder")
        load_state(model.f_bd, ckpt["train_state"]["model"], args)
        optimizer.load_state_dict(ckpt["train_state"]["optimizer"])
        set_rng_state(ckpt["train_state"]["rng"], args, rank, world, ckpt["epoch"])
        start = ckpt["epoch"]
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    data = FileList(samples, views, args.seed)
    cache = data.load(args.cache_images, args.cache_mib)  # checks every image; may decode them once
    loader, sampler = make_loader(data, args, rank, world, device)
    source = {"path": os.path.abspath(args.encoder), "method": src["method"], "arch": src["arch"], "epoch": src["epoch"]}
    log(args, rank, {"start_epoch": start, "world_size": world, "device": str(device), "source": source, "images": len(samples), "cache": cache,
                     "references": len(references), "steps_per_epoch": len(loader), "args": vars(args),
                     "machine": machine(device)}, new=not args.resume)
    records = []  # logged once a checkpoint holds their epochs
    if rank == 0:
        print(f"badencoder.py: {src['method']} {src['arch']} (epoch {src['epoch']}) at {size} px, {len(samples)} shadow "
              f"images, {len(references)} reference/trigger pair(s), {len(loader)} steps/epoch, {world} process(es) "
              f"on {device}")
        print(f"badencoder.py: {cache}")

    for epoch in range(start, args.epochs):
        sampler.epoch = epoch
        model.train()
        t0, total = time.time(), torch.zeros(4, device=device)
        for step, ((x, x_bd, (r, p)), _, _) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False,
                                                              disable=rank != 0)):
            x, x_bd = normalised(x), normalised(x_bd.flatten(0, 1)).unflatten(0, x_bd.shape[:2])  # uint8 in
            r_aug = normalised(r.flatten(0, 1), views.color, p.flatten(0, 1)).unflatten(0, r.shape[:2])  # colour ops
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp and device.type == "cuda"):
                l0, l1, l2 = net(x, x_bd, r_aug, ref)
            loss = l0 + args.lambda1 * l1 + args.lambda2 * l2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += torch.stack([loss, l0, l1, l2]).detach()
            if (step + 1) % args.log_every == 0 and not torch.isfinite(total).all():  # the only host sync in the loop
                sys.exit(f"badencoder.py: error: loss is {total[0].item()} at epoch {epoch} step {step}; lower --lr")
        loss, l0, l1, l2 = (total / len(loader)).tolist()  # waits for the GPU: the time below covers all of the epoch's work
        seconds = time.time() - t0
        record = {"epoch": epoch + 1, "loss": loss, "l0": l0, "l1": l1, "l2": l2, "lr": args.lr, "seconds": seconds,
                  "images_per_s": len(loader) * args.batch_size / seconds,
                  "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
        if not all(map(math.isfinite, (loss, l0, l1, l2))):
            sys.exit(f"badencoder.py: error: loss is {loss} in epoch {epoch}; lower --lr")
        records.append(record)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f} (L0 {l0:.4f} L1 {l1:.4f} L2 {l2:.4f})  "
                  f"lr {args.lr:.4g}  {record['images_per_s']:.0f} img/s  {seconds:.1f}s", flush=True)
        rng = rng_state() if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs else None  # all ranks'
        if rank == 0 and rng is not None:
            encoder = model.f_bd.state_dict()  # train_state["model"] is the same dict: saved once
            save_checkpoint(os.path.join(args.out, "checkpoint.pt"), {
                "method": "badencoder", "arch": src["arch"], "arch_kwargs": src["arch_kwargs"],
                "feature_dim": src["feature_dim"], "image_size": size, "mean": src["mean"], "std": src["std"],
                "encoder": encoder, "epoch": epoch + 1, "args": vars(args), "source": source,
                "trigger": {"images": [torch.from_numpy(e.copy()) for e in triggers], "location": args.trigger_location,
                            "range": args.trigger_range, "opacity": args.opacity},
                "train_state": {"model": encoder, "optimizer": optimizer.state_dict(), "rng": rng}})
        if rng is not None:
            log(args, rank, *records)
            records = []
    if world > 1:
        dist.destroy_process_group()


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


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"badencoder.py: error: {error_line(e)}")
    except OSError as e:  # a full disk, a read-only folder
        sys.exit(f"badencoder.py: error: {e.filename or ''}: {e.strerror or e}")
