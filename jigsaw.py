"""jigsaw.py: Jigsaw-puzzle pre-training, as run by Saha et al., "Backdoor Attacks on Self-Supervised Learning" (CVPR 2022).

Papers: Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles", ECCV 2016,
https://arxiv.org/abs/1603.09246; the attack paper https://arxiv.org/abs/2105.10123. Reference code:
UMBCvision/SSL-Backdoor jigsaw/ (its own PyTorch port of Noroozi & Favaro's CFN with a ResNet-18 trunk).
Consumes a file list (labels ignored). Produces, in `--out`, checkpoint.pt (docs/formats.md: the trunk, evaluated on
full `--image-size` images as the reference does; "perms" = the permutation set; the training state for --resume) and
log.jsonl (one record per epoch).
Recipe (defaults = the paper's ImageNet-100 run): Resize 256 -> RandomCrop 255 -> 3x3 cells of 85 px -> a random 64 px
tile per cell; grayscale with p 0.5, else a fixed colour projection with p 0.5; tile k goes to slot perm[k] of one of
2,000 permutations (maximal average Hamming distance), the label is the permutation's index. One ResNet-18 trunk runs
each of the 9 slots separately (BN statistics per tile position) -> concat 9 x 512 -> Linear(4608, 2000), cross-entropy.
SGD lr 0.01 momentum 0.9, wd 1e-4 on weights not named "bn" (so downsample BN weights DO get wd, a reference quirk),
batch 256, 105 epochs, lr x0.1 at 30, 60, 90, 100.
Deviations: sizes scale with --image-size: resize = round(s * 256 / 224), cell = resize // 3, crop = 3 * cell,
tile = round(cell * 64 / 85), tile offsets 0..cell-tile-1 (256/255/85/64/0..20 at 224; 37/36/12/9/0..2 at 32).
The permutations are regenerated from --seed with the same greedy algorithm (the reference ships a .npy; ties are
broken by a seeded shuffle of the 9! candidates; mean pairwise Hamming distance 8.004, as the shipped file); labels and
tile offsets come from the seeded torch RNG. No validation of the pretext task: the log has its training accuracy.
"""
import argparse
import itertools
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

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
COLOR_PROJECTION = torch.tensor([[0.8333, 0.3333, -0.1667], [0.3333, 0.3333, 0.3333], [-0.1667, 0.3333, 0.8333]])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-list", required=True, help="file list of training images (labels ignored)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, log.jsonl")
    p.add_argument("--arch", default="resnet18", help="torchvision ResNet constructor name (the shared trunk)")
    p.add_argument("--small-stem", action="store_true", help="3x3 stride-1 stem without max-pool (32-64 px images)")
    p.add_argument("--image-size", type=int, default=224, help="full-image size: sets the tile sizes; eval size")
    p.add_argument("--epochs", type=int, default=105, help="total epochs")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size in images (split over processes)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (x0.1 at each of --milestones)")
    p.add_argument("--milestones", type=int, nargs="*", default=[30, 60, 90, 100], help="epochs where the lr drops x0.1")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (on *weight not named bn*)")
    p.add_argument("--num-perms", type=int, default=2000, help="size of the permutation set (classes of the pretext task)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loading processes per process")
    p.add_argument("--cache-images", default="auto", choices=["auto", "on", "off"], help="decode once, hold in memory")
    p.add_argument("--cache-mib", type=int, default=2048, help="memory budget of --cache-images auto, per process")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutations, initialisation, data order, augmentation")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on GPU")
    p.add_argument("--resume", default=None, help="checkpoint.pt to continue from (exactly)")
    p.add_argument("--resume-changed", action="store_true", help="--resume even where training flags differ")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    p.add_argument("--save-every", type=int, default=10, help="write checkpoint.pt every N epochs (and at the end)")
    p.add_argument("--log-every", type=int, default=50, help="steps between loss checks (NaN stops the run)")
    return p.parse_args(argv)


def hamming_permutations(n, seed):
    """Noroozi & Favaro's Algorithm 1 (maximal average Hamming distance): from a random permutation, greedily add the
    one with the largest summed Hamming distance to those chosen so far."""
    rng = np.random.default_rng(seed)
    P = np.array(list(itertools.permutations(range(9))), dtype=np.int8)[rng.permutation(math.factorial(9))]
    columns = np.ascontiguousarray(P.T)
    matches = np.zeros(len(P), dtype=np.int32)  # summed equal positions = 9 * len(chosen) - summed Hamming distance
    chosen = [0]  # P is shuffled: row 0 is the random start, and argmin breaks ties at random
    for _ in range(n - 1):
        for k in range(9):
            matches += columns[k] == P[chosen[-1], k]
        matches[chosen[-1]] = 2**30  # never chosen again
        chosen.append(int(matches.argmin()))
    return torch.from_numpy(P[chosen].astype(np.int64))


def jigsaw_sizes(image_size):
    """(resize, crop, cell, tile): 256, 255, 85, 64 at 224 px, scaled with the image size."""
    resize = round(image_size * 256 / 224)
    cell = resize // 3
    return resize, 3 * cell, cell, max(1, round(cell * 64 / 85))


def shuffle_tiles(x, perm, cell, tile):
    """3x3 grid of cells in raster order k; a random tile x tile crop of cell k goes to slot perm[k] (not the inverse)."""
    offsets = torch.randint(max(1, cell - tile), (9, 2)).tolist()  # 0..20 at 85/64 px, as the reference
    out = x.new_empty(9, x.shape[0], tile, tile)
    for k, (dy, dx) in enumerate(offsets):
        i, j = k // 3 * cell + dy, k % 3 * cell + dx
        out[perm[k]] = x[:, i : i + tile, j : j + tile]
    return out


class JigsawTransform:
    """Host half: image -> (9 uint8 tiles in the slots of a random permutation, colour flags), permutation index."""

    def __init__(self, perms, image_size):
        resize, crop, self.cell, self.tile = jigsaw_sizes(image_size)
        self.perms, self.crop = perms, T.Compose([T.Resize(resize), T.RandomCrop(crop), T.PILToTensor()])

    def __call__(self, image):
        x = self.crop(image)
        gray, project = (torch.rand(2) < 0.5).tolist()  # 50% gray, 25% projected, 25% as is: no chromatic shortcut
        y = torch.randint(len(self.perms), ())
        flags = torch.tensor([gray, project and not gray], dtype=torch.float32)
        return (shuffle_tiles(x, self.perms[y].tolist(), self.cell, self.tile), flags), y


def jigsaw_color(x, flags):
    """Device half, float [0, 1] tiles (B, 9, 3, t, t): grayscale or the colour projection (unclipped, as reference)."""
    gray, project = (flags[:, i].to(x.device, non_blocking=True).view(-1, 1, 1, 1, 1) > 0 for i in (0, 1))
    y = (x * x.new_tensor([0.2989, 0.587, 0.114]).view(3, 1, 1)).sum(-3, keepdim=True).expand_as(x)
    p = torch.einsum("ij,...jhw->...ihw", COLOR_PROJECTION.to(x.device), x)
    return torch.where(gray, y, torch.where(project, p, x))


def param_groups(model, weight_decay):
    """The reference's rule by name: wd on "*weight" without "bn", so downsample.1.weight (a BN weight) IS decayed."""
    named = dict(model.named_parameters())
    decay = [n for n in named if n.endswith("weight") and "bn" not in n]
    return [{"params": [named[n] for n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in named.items() if n not in decay], "weight_decay": 0.0}]


def step_lr(lr, epoch, milestones):
    return lr * 0.1 ** sum(epoch >= m for m in milestones)


class Jigsaw(nn.Module):
    def __init__(self, arch, arch_kwargs, num_perms):
        super().__init__()
        self.trunk, feat = build_backbone(arch, arch_kwargs)
        self.fc = nn.Linear(9 * feat, num_perms)  # no fc6/fc7 MLP in the reference

    def forward(self, tiles, y):
        """tiles: 9 tensors (B, 3, t, t), one per slot; each slot is its own trunk pass, so BN statistics are per slot."""
        logits = self.fc(torch.cat([self.trunk(x) for x in tiles], dim=1)).float()
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).sum()


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup(args, ("num_perms",), (), ())
    if not 1 <= args.num_perms <= math.factorial(9):
        raise InputError(f"--num-perms {args.num_perms}: must be between 1 and 9! = 362880")
    samples = read_list(args.train_list)
    ckpt = resume_checkpoint(args, "jigsaw") if args.resume else None
    if ckpt and len(ckpt["perms"]) != args.num_perms:
        raise InputError(f"{args.resume}: {len(ckpt['perms'])} permutations, but --num-perms {args.num_perms}")
    perms = ckpt["perms"] if ckpt else hamming_permutations(args.num_perms, args.seed)
    arch_kwargs = {"small_stem": args.small_stem}
    memory_format = torch.channels_last  # faster on GPU, and on CPU too (docs/benchmarks.md)
    model = Jigsaw(args.arch, arch_kwargs, args.num_perms).to(device).to(memory_format=memory_format)
    optimizer = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=0.9)
    start = 0
    if ckpt:
        load_state(model, ckpt["train_state"]["model"], args)
        optimizer.load_state_dict(ckpt["train_state"]["optimizer"])
        set_rng_state(ckpt["train_state"]["rng"], args, rank, world, ckpt["epoch"])
        start = ckpt["epoch"]
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    data = FileList(samples, JigsawTransform(perms, args.image_size), args.seed)
    cache = data.load(args.cache_images, args.cache_mib)  # checks every image; may decode them once
    loader, sampler = make_loader(data, args, rank, world, device)
    resize, crop, cell, tile = jigsaw_sizes(args.image_size)
    log(args, rank, {"start_epoch": start, "world_size": world, "device": str(device), "images": len(samples), "cache": cache,
                     "steps_per_epoch": len(loader), "resize": resize, "crop": crop, "cell": cell, "tile": tile,
                     "args": vars(args), "machine": machine(device)}, new=not args.resume)
    records = []  # logged once a checkpoint holds their epochs
    if rank == 0:
        print(f"jigsaw.py: {len(samples)} images, {len(loader)} steps/epoch, {world} process(es) on {device}, "
              f"{tile} px tiles from {cell} px cells of a {crop} px crop, {len(perms)} permutations")
        print(f"jigsaw.py: {cache}")

    for epoch in range(start, args.epochs):
        lr = step_lr(args.lr, epoch, args.milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler.epoch = epoch
        model.train()
        t0, total, correct = time.time(), torch.zeros((), device=device), torch.zeros((), device=device)
        for step, (((tiles, flags), y), _, _) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False,
                                                                 disable=rank != 0)):
            tiles = to_device(tiles, device, memory_format, MEAN, STD, jigsaw_color, flags)  # B x 9 x 3 x t x t
            tiles = [x.contiguous(memory_format=memory_format) for x in tiles.unbind(1)]
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp and device.type == "cuda"):
                loss, hits = net(tiles, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            correct += hits
            if (step + 1) % args.log_every == 0 and not torch.isfinite(total):  # the only host sync in the loop
                sys.exit(f"jigsaw.py: error: loss is {total.item()} at epoch {epoch} step {step}; lower --lr")
        epoch_loss = total.item() / len(loader)  # waits for the GPU: the time below covers all of the epoch's work
        seconds = time.time() - t0
        record = {"epoch": epoch + 1, "loss": epoch_loss, "lr": lr, "seconds": seconds,
                  "images_per_s": len(loader) * args.batch_size / seconds,
                  "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                  "pretext_acc": 100.0 * correct.item() / (len(loader) * args.batch_size // world)}  # this process's
        if not math.isfinite(record["loss"]):
            sys.exit(f"jigsaw.py: error: loss is {record['loss']} in epoch {epoch}; lower --lr")
        records.append(record)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {record['loss']:.4f}  pretext acc {record['pretext_acc']:.1f}%  "
                  f"lr {lr:.4g}  {record['images_per_s']:.0f} img/s  {seconds:.1f}s", flush=True)
        rng = rng_state() if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs else None  # all ranks'
        if rank == 0 and rng is not None:
            save_checkpoint(os.path.join(args.out, "checkpoint.pt"), {
                "method": "jigsaw", "arch": args.arch, "arch_kwargs": arch_kwargs,
                "feature_dim": model.fc.in_features // 9, "image_size": args.image_size, "mean": MEAN, "std": STD,
                "encoder": model.trunk.state_dict(), "epoch": epoch + 1, "args": vars(args), "perms": perms,
                "train_state": {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng}})
        if rng is not None:
            log(args, rank, *records)
            records = []
    if world > 1:
        dist.destroy_process_group()


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


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        sys.exit(f"jigsaw.py: error: {error_line(e)}")
    except OSError as e:  # a full disk, a read-only folder
        sys.exit(f"jigsaw.py: error: {e.filename or ''}: {e.strerror or e}")
