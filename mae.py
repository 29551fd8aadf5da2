"""mae.py: MAE pre-training, as run by Saha et al., "Backdoor Attacks on Self-Supervised Learning" (CVPR 2022).

Papers: MAE https://arxiv.org/abs/2111.06377; the attack paper https://arxiv.org/abs/2105.10123. Reference code:
facebookresearch/mae (models_mae.py, main_pretrain.py, util/pos_embed.py, util/lr_sched.py). Consumes a file list
(labels ignored). Produces, in `--out`, checkpoint.pt (docs/formats.md: arch "vit", a torchvision VisionTransformer
without `heads`; the decoder only in the training state for --resume) and log.jsonl (one record per epoch).
Recipe (defaults = the paper's / PRETRAIN.md): ViT-B/16 at 224 px, decoder 8 blocks x 512 wide x 16 heads, 75% of the
patches masked per sample, MSE on the masked patches of per-patch normalised pixels, fixed 2-D sin-cos position
embeddings, AdamW betas (0.9, 0.95) wd 0.05 (none on biases, norms, 1-D parameters), lr = 1.5e-4 x batch / 256 with a
global batch of 4096 (64 GPUs), 800 epochs, 40 warmup epochs then cosine to 0 per iteration, RandomResizedCrop
(0.2-1, bicubic) + flip only. linear_probe.py's feature is the cls token after the final LayerNorm, as in MAE's linear
probe (its classifier is linear_probe.py's own); linear probing underestimates MAE (paper, ViT-B on ImageNet-1k: 68.0%
linear probe vs 83.6% fine-tuned).
Deviations: encoder = torchvision's VisionTransformer, decoder blocks = torchvision's EncoderBlock (the same pre-norm
math as the reference's timm blocks; conv_proj's bias starts at zero); bf16 autocast instead of fp16 + GradScaler; no
gradient accumulation (lower --batch-size on fewer GPUs, lr follows --blr); every process draws the masking noise of
the whole global batch and keeps its own rows (reference: a seed per rank), so the processes' RNGs stay in step and
--resume is exact; --small-stem does not apply (use --patch-size 4-8 for 32-64 px images).
"""
import argparse
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
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.models.vision_transformer import EncoderBlock
from tqdm import tqdm

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRESETS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}  # width/depth/heads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-list", required=True, help="file list of training images (labels ignored)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, log.jsonl")
    p.add_argument("--arch", default="vit", choices=["vit"], help="torchvision VisionTransformer (see --model)")
    p.add_argument("--model", default="base", choices=list(PRESETS), help="ViT size (width/depth/heads, MLP 4 x width)")
    p.add_argument("--patch-size", type=int, default=16, help="patch side in pixels (4-8 for 32-64 px images)")
    p.add_argument("--width", type=int, default=None, help="encoder width, overrides --model")
    p.add_argument("--depth", type=int, default=None, help="encoder blocks, overrides --model")
    p.add_argument("--heads", type=int, default=None, help="encoder attention heads, overrides --model")
    p.add_argument("--decoder-width", type=int, default=512, help="decoder width")
    p.add_argument("--decoder-depth", type=int, default=8, help="decoder blocks")
    p.add_argument("--decoder-heads", type=int, default=16, help="decoder attention heads")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of the patches removed per sample")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="target = pixels normalised per patch (mean, unbiased var + 1e-6)")
    p.add_argument("--image-size", type=int, default=224, help="training crop size (also recorded for evaluation)")
    p.add_argument("--epochs", type=int, default=800, help="total epochs")
    p.add_argument("--warmup-epochs", type=int, default=40, help="epochs of linear lr warmup (per iteration)")
    p.add_argument("--batch-size", type=int, default=4096, help="global batch size (split over processes)")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base learning rate: lr = blr x batch size / 256")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate, overrides --blr")
    p.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (none on biases, norms, 1-D params)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loading processes per process")
    p.add_argument("--cache-images", default="auto", choices=["auto", "on", "off"], help="decode once, hold in memory")
    p.add_argument("--cache-mib", type=int, default=2048, help="memory budget of --cache-images auto, per process")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order, augmentation and masks")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on GPU")
    p.add_argument("--resume", default=None, help="checkpoint.pt to continue from (exactly)")
    p.add_argument("--resume-changed", action="store_true", help="--resume even where training flags differ")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    p.add_argument("--save-every", type=int, default=20, help="write checkpoint.pt every N epochs (and at the end)")
    p.add_argument("--log-every", type=int, default=50, help="steps between loss checks (NaN stops the run)")
    return p.parse_args(argv)


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos table (grid^2 + 1, dim), row 0 (cls) zero; channels: [sin, cos] of the column, then of the row,
    at frequencies w_k = 10000^(-4k/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    halves = [torch.outer(pos.repeat(grid), omega), torch.outer(pos.repeat_interleave(grid), omega)]  # column, row
    table = torch.cat([torch.cat([h.sin(), h.cos()], dim=1) for h in halves], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


def patchify(imgs, p):
    """(N, 3, H, W) -> (N, L, p*p*3), patches in row-major order (as conv_proj's tokens), pixels (row, col, channel)."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def random_masking(x, mask_ratio, noise):
    """Keep the int(L (1 - mask_ratio)) tokens of least noise -> (visible tokens, mask (1 = removed), ids_restore)."""
    n, L, d = x.shape
    keep = int(L * (1 - mask_ratio))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    x_masked = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(n, L, device=x.device)
    mask[:, :keep] = 0
    return x_masked, mask.gather(1, ids_restore), ids_restore


def mae_loss(imgs, pred, mask, p, norm_pix_loss):
    """Per-patch MSE averaged over the removed patches only (mask 1)."""
    target = patchify(imgs, p)
    if norm_pix_loss:
        var, mean = torch.var_mean(target, dim=-1, keepdim=True)  # unbiased variance, as the reference's .var()
        target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def param_groups(model, weight_decay):
    """timm's add_weight_decay: no decay for biases, norms and 1-D parameters; frozen ones (pos embeddings) left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(e, lr, args):
    """Linear warmup, then half-cosine to --min-lr, at the fractional epoch e (reference util/lr_sched.py)."""
    if e < args.warmup_epochs:
        return lr * e / args.warmup_epochs
    progress = (e - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
    return args.min_lr + (lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class MAE(nn.Module):
    def __init__(self, arch_kwargs, decoder_depth, decoder_width, decoder_heads, mask_ratio, norm_pix_loss):
        super().__init__()
        self.p, self.mask_ratio, self.norm_pix_loss = arch_kwargs["patch_size"], mask_ratio, norm_pix_loss
        self.vit, dim = build_backbone("vit", arch_kwargs)  # heads = Identity: no unused or decayed classifier
        grid = arch_kwargs["image_size"] // self.p
        self.decoder_embed = nn.Linear(dim, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(decoder_width, grid)[None])
        self.decoder_blocks = nn.Sequential(*[EncoderBlock(decoder_heads, decoder_width, 4 * decoder_width, 0.0, 0.0)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_width, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_width, self.p**2 * 3)
        for m in self.modules():  # reference init: xavier Linear (MHA's fused in_proj already is), zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.vit.conv_proj.weight.view(dim, -1))  # the patch embedding as a (D, 3p^2) Linear
        nn.init.normal_(self.vit.class_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.vit.encoder.pos_embedding.data.copy_(sincos_pos_embed(dim, grid)[None])
        self.vit.encoder.pos_embedding.requires_grad_(False)  # fixed, and kept out of the optimizer

    def forward_encoder(self, imgs, mask_ratio):
        vit, pos = self.vit, self.vit.encoder.pos_embedding
        x = vit.conv_proj(imgs).flatten(2).transpose(1, 2) + pos[:, 1:]  # positions are added before masking
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        noise = torch.rand(world, *x.shape[:2], device=x.device)[rank]  # the global batch's noise: RNGs stay in step
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        x = torch.cat([(vit.class_token + pos[:, :1]).expand(len(x), -1, -1), x], dim=1)
        x = vit.encoder.ln(vit.encoder.layers(vit.encoder.dropout(x)))  # not vit.encoder(x): it adds pos_embedding again
        return x, mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)
        n, L = ids_restore.shape
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(n, L + 1 - x.shape[1], -1)], dim=1)  # visible, then mask tokens
        x_ = x_.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # back to patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))[:, 1:]  # without the cls position

    def forward(self, imgs):
        latent, mask, ids_restore = self.forward_encoder(imgs, self.mask_ratio)
        return mae_loss(imgs, self.forward_decoder(latent, ids_restore), mask, self.p, self.norm_pix_loss)


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup(args, ("patch_size", "width", "depth", "heads", "decoder_width", "decoder_depth", "decoder_heads", "blr"), ("warmup_epochs",), ("mask_ratio",))
    width, depth, heads = (new or old for new, old in zip((args.width, args.depth, args.heads), PRESETS[args.model]))
    arch_kwargs = {"image_size": args.image_size, "patch_size": args.patch_size, "num_layers": depth, "num_heads": heads,
                   "hidden_dim": width, "mlp_dim": 4 * width}
    if args.image_size % args.patch_size or width % 4 or width % heads or args.decoder_width % 4 or \
            args.decoder_width % args.decoder_heads:
        raise InputError(f"ViT {arch_kwargs}, decoder width {args.decoder_width} with {args.decoder_heads} heads: the "
                         f"image size must be a multiple of the patch size, each width of 4 (sin-cos) and of its heads")
    L = (args.image_size // args.patch_size) ** 2
    if not 0 < int(L * (1 - args.mask_ratio)) < L:
        raise InputError(f"--mask-ratio {args.mask_ratio} must keep at least one and remove at least one of {L} patches")
    samples = read_list(args.train_list)
    model = MAE(arch_kwargs, args.decoder_depth, args.decoder_width, args.decoder_heads, args.mask_ratio,
                args.norm_pix_loss).to(device)
    lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    start = 0
    if args.resume:
        ckpt = resume_checkpoint(args, "mae")
        load_state(model, ckpt["train_state"]["model"], args)
        optimizer.load_state_dict(ckpt["train_state"]["optimizer"])
        set_rng_state(ckpt["train_state"]["rng"], args, rank, world, ckpt["epoch"])
        start = ckpt["epoch"]
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    transform = ResizedCrop(args.image_size, scale=(0.2, 1.0), bicubic=True)  # + flip, uint8; no colour augmentation
    data = FileList(samples, transform, args.seed)
    cache = data.load(args.cache_images, args.cache_mib)  # checks every image; may decode them once
    loader, sampler = make_loader(data, args, rank, world, device)
    log(args, rank, {"start_epoch": start, "world_size": world, "device": str(device), "arch_kwargs": arch_kwargs, "peak_lr": lr,
                     "images": len(samples), "cache": cache, "steps_per_epoch": len(loader), "args": vars(args),
                     "machine": machine(device)}, new=not args.resume)
    records = []  # logged once a checkpoint holds their epochs
    if rank == 0:
        print(f"mae.py: {len(samples)} images, {len(loader)} steps/epoch, {world} process(es) on {device}, ViT "
              f"{width}/{depth}/{heads} patch {args.patch_size} ({L} patches), peak lr {lr:.4g}")
        print(f"mae.py: {cache}")

    for epoch in range(start, args.epochs):
        sampler.epoch = epoch
        model.train()
        t0, total = time.time(), torch.zeros((), device=device)
        for step, (imgs, _, _) in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=rank != 0)):
            lr_now = learning_rate(epoch + step / len(loader), lr, args)  # per iteration
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            imgs = to_device(imgs, device, torch.contiguous_format, MEAN, STD)  # normalised on the device
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp and device.type == "cuda"):
                loss = net(imgs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            if (step + 1) % args.log_every == 0 and not torch.isfinite(total):  # the only host sync in the loop
                sys.exit(f"mae.py: error: loss is {total.item()} at epoch {epoch} step {step}; lower --blr")
        epoch_loss = total.item() / len(loader)  # waits for the GPU: the time below covers all of the epoch's work
        seconds = time.time() - t0
        record = {"epoch": epoch + 1, "loss": epoch_loss, "lr": lr_now, "seconds": seconds,
                  "images_per_s": len(loader) * args.batch_size / seconds,
                  "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
        if not math.isfinite(record["loss"]):
            sys.exit(f"mae.py: error: loss is {record['loss']} in epoch {epoch}; lower --blr")
        records.append(record)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {record['loss']:.4f}  lr {lr_now:.4g}  "
                  f"{record['images_per_s']:.0f} img/s  {seconds:.1f}s", flush=True)
        rng = rng_state() if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs else None  # all ranks'
        if rank == 0 and rng is not None:
            save_checkpoint(os.path.join(args.out, "checkpoint.pt"), {
                "method": "mae", "arch": args.arch, "arch_kwargs": arch_kwargs, "feature_dim": width,
                "image_size": args.image_size, "mean": MEAN, "std": STD, "encoder": model.vit.state_dict(),
                "epoch": epoch + 1, "args": vars(args),
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
        sys.exit(f"mae.py: error: {error_line(e)}")
    except OSError as e:  # a full disk, a read-only folder
        sys.exit(f"mae.py: error: {e.filename or ''}: {e.strerror or e}")
