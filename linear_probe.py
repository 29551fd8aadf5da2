"""linear_probe.py: frozen-feature evaluation of an encoder on clean and trigger-patched validation images.

Paper: Saha et al., "Backdoor Attacks on Self-Supervised Learning", CVPR 2022, https://arxiv.org/abs/2105.10123
(its linear evaluation is CompReSS's, https://arxiv.org/abs/2010.14713), and the downstream classifier of Jia et al.,
"BadEncoder", IEEE S&P 2022, https://arxiv.org/abs/2108.00352 (`--classifier mlp`).
Consumes an encoder checkpoint of any script of this project (docs/formats.md), a small labeled train list and the clean
and patched validation lists of poison.py. Extracts features once (clean: Resize + CenterCrop, or nothing when every
image already has the crop size; the patched val as is), trains the classifier, and writes to `--out`: metrics.json
(Acc, target TP/FP, ASR on clean and patched val), per_class.csv, confusion_{clean,patched}.npy (rows = true class)
and classifier.pt (weights + feature normalisation). `--protocol`: one row of PROTOCOLS, each reference's own linear
evaluation (docs/methods.md); explicit flags override it. Default `demo`: CompReSS/MoCo's (L2-normalise, standardise,
Linear; SGD 0.01, 40 epochs) on cached center-crop features.
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
from PIL import Image
from tqdm import tqdm

POOL = {"relu": 12, "layer1": 12, "layer2": 8, "layer3": 6, "layer4": 4}  # reference conv-linear probes (at 224 px)
# One row per reference evaluation. norm: l2+std = L2-normalise, then standardise (CompReSS); l2; none = raw features;
# bn2d / bn1d = BatchNorm without affine, batch statistics in training. augment: rrc = RandomResizedCrop + flip, crop =
# Resize + RandomCrop + flip, False = cached center-crop features. schedule: step (x gamma at milestones), exp (x gamma
# in total over the epochs), cosine (warmup epochs, then to 0). blr: lr = blr x batch / 256. A batch over n is n.
# order: "epoch" = a new shuffle every epoch, "fixed" = one seeded order for all epochs. drop_last: the remainder of a
# batch is left out, a new one every epoch (True), or one subset chosen once, as at feature extraction ("once").
MOCO = dict(norm="l2+std", optimizer="sgd", lr=0.01, weight_decay=1e-4, schedule="step", milestones=[15, 30], gamma=0.1,
            epochs=40, batch_size=256, augment="rrc", layer="final", classifier="linear", init="default", drop_last=False,
            order="epoch")
PROTOCOLS = {
    "demo": {**MOCO, "augment": False},  # one protocol for every method of the demo tables
    "moco": MOCO,  # SSL-Backdoor moco/eval_linear.py = CompReSS eval_linear.py (also MSF's)
    "jigsaw": {**MOCO, "norm": "none", "layer": "layer3"},  # jigsaw/eval_conv_linear.py
    "rotnet": {**MOCO, "norm": "bn2d", "optimizer": "nesterov", "weight_decay": 5e-4, "milestones": [5, 15, 25],
               "gamma": 0.2, "batch_size": 32, "augment": "crop", "layer": "layer3", "init": "rotnet"},  # lr LUT 0.01..8e-5
    "byol": {**MOCO, "norm": "none", "optimizer": "adam", "lr": 1e-2, "weight_decay": 5e-6, "schedule": "exp",
             "gamma": 1e-4, "epochs": 500, "batch_size": 1000, "augment": False, "drop_last": "once"},  # byol/test.py
    "mae": {**MOCO, "norm": "bn1d", "optimizer": "lars", "lr": None, "blr": 0.1, "weight_decay": 0.0, "schedule": "cosine",
            "warmup": 10, "epochs": 90, "batch_size": 16384, "init": "mae", "drop_last": True},  # MAE main_linprobe.py
    "badencoder": {**MOCO, "norm": "l2", "optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "milestones": [],
                   "epochs": 500, "batch_size": 64, "augment": False, "classifier": "mlp", "order": "fixed"},  # its MLP
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--encoder", required=True, help="encoder checkpoint (.pt) written by any script of this project")
    p.add_argument("--train-list", required=True, help="labeled train list, e.g. poison.py's train_labeled_1pct.txt")
    p.add_argument("--val-list", required=True, help="clean validation list (val_clean.txt)")
    p.add_argument("--val-patched-list", required=True, help="patched validation list (val_patched.txt)")
    p.add_argument("--target", default=None, help="target class (index or name); default: from poison.json beside the patched list")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default=None,
                   help="one row of PROTOCOLS, overridden by the flags below (default: demo; badencoder with mlp)")
    p.add_argument("--layer", default=None, choices=["final", *POOL],
                   help="pooled final feature (ViT: cls token), or a ResNet tap average-pooled (conv-linear protocols)")
    p.add_argument("--classifier", choices=["linear", "mlp"], default=None, help="linear, or BadEncoder's MLP")
    p.add_argument("--norm", choices=["l2+std", "l2", "none", "bn1d", "bn2d"], default=None, help="feature normalisation")
    p.add_argument("--optimizer", choices=["sgd", "nesterov", "adam", "lars"], default=None, help="classifier optimizer")
    p.add_argument("--epochs", type=int, default=None, help="classifier epochs")
    p.add_argument("--batch-size", type=int, default=None, help="classifier batch size (capped at the labeled set)")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay")
    p.add_argument("--milestones", type=int, nargs="*", default=None, help="epochs where a step schedule's lr drops")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="re-extract augmented train features every epoch (the protocol's, or RandomResizedCrop + flip)")
    p.add_argument("--knn", type=int, default=0, help="also report a weighted k-NN classifier with this k (0 = off)")
    p.add_argument("--knn-temperature", type=float, default=0.07, help="k-NN vote weight exp(similarity / T)")
    p.add_argument("--extract-batch-size", type=int, default=256, help="batch size of feature extraction")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loading processes")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast for extraction on GPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier's initialisation and batch order")
    p.add_argument("--save-features", action="store_true", help="also write features.pt: the classifier's inputs")
    p.add_argument("--overwrite", action="store_true", help="replace the result that --out holds (its metrics.json)")
    return p.parse_args(argv)


def resolve_protocol(args, n_train=None):
    """Fill every unset hyperparameter from the protocol's row; cap the batch at the labeled set (then lr = blr x batch / 256)."""
    if getattr(args, "protocol", None) is None:
        args.protocol = "badencoder" if getattr(args, "classifier", None) == "mlp" else "demo"
    row = PROTOCOLS[args.protocol]
    augment = getattr(args, "augment", None)
    for key, value in row.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if augment is not None:  # --augment: the row's augmentation (RandomResizedCrop + flip if it has none); --no-augment
        args.augment = (row["augment"] or "rrc") if augment else False
    if n_train:
        args.batch_size = min(args.batch_size, n_train)
    if args.lr is None:
        args.lr = row["blr"] * args.batch_size / 256
    return args


def features(model, x, layer, flat=True):
    """Pooled final feature, or a ResNet tap average-pooled to a small grid (the reference's conv-linear probes)."""
    if layer == "final":
        return model(x)
    x = model.relu(model.bn1(model.conv1(x)))
    if layer != "relu":
        x = model.maxpool(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(model, name)(x)
            if name == layer:
                break
    x = F.adaptive_avg_pool2d(x, min(POOL[layer], x.shape[-1]))  # small images: never upsample
    return x.flatten(1) if flat else x


@torch.no_grad()
def extract(model, samples, transform, args, device, epoch=0, desc="features"):
    dataset = FileList(samples, transform, seed=args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.extract_batch_size, num_workers=args.workers,
                                         sampler=[(epoch, i) for i in range(len(samples))], pin_memory=device.type == "cuda")
    feats, labels = [], []
    for x, y, _ in tqdm(loader, desc=desc, leave=False):
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            feats.append(features(model, x, args.layer).float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def val_resize(args, val, size):
    """The clean val's Resize side, or None: poison.json's val_geometry, else None if the images have the crop size."""
    meta = os.path.join(os.path.dirname(os.path.abspath(args.val_patched_list)), "poison.json")
    info = json.load(open(meta)) if os.path.isfile(meta) else {}
    if "val_geometry" in info:
        return None if info["val_geometry"] == "native" else info["val_resize"]
    return None if native(val, size) else round(size * 256 / 224)


def native(samples, size):
    """True when every image already has the encoder's input size: then the eval transform resizes nothing."""
    try:
        for path, _ in samples:
            with Image.open(path) as im:  # reads the header only
                if im.size != (size, size):
                    return False
    except (OSError, Image.DecompressionBombError):  # reported by the header check, with its list line
        return False
    return True


def check_size(samples, size, name):
    """Patched images are evaluated as they are (no resize): they must already have the encoder's input size."""
    for path, _ in samples[:: max(1, len(samples) // 64)]:
        with Image.open(path) as im:
            if im.size != (size, size):
                raise InputError(f"{path}: patched image is {im.size[0]}x{im.size[1]}, the encoder expects {size}x{size} "
                                 f"({name} must come from poison.py with --val-crop {size})")


class Head(nn.Module):
    """The protocol's normalisation (l2+std: CompReSS's fixed buffers; bn1d / bn2d: BatchNorm without affine, bn2d per
    channel of the pooled map as RotNet's) -> Linear, or BadEncoder's MLP (512, ReLU, dropout 0.5, 256, ReLU)."""

    def __init__(self, mean, inv_std, num_classes, mlp, norm="l2+std", channels=None, init="default"):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("inv_std", inv_std)
        d = mean.numel()
        self.norm, self.channels = norm, channels or d
        self.bn = nn.BatchNorm2d(self.channels, affine=False) if norm == "bn2d" else \
            nn.BatchNorm1d(d, affine=False, eps=1e-6) if norm == "bn1d" else nn.Identity()
        self.fc = nn.Sequential(nn.Linear(d, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, 256), nn.ReLU(),
                                nn.Linear(256, num_classes)) if mlp else nn.Linear(d, num_classes)
        if init != "default":  # RotNet: N(0, sqrt(2 / classes)); MAE: trunc_normal(std 0.01); bias 0
            nn.init.zeros_(self.fc.bias)
            if init == "rotnet":
                nn.init.normal_(self.fc.weight, 0, (2 / num_classes) ** 0.5)
            else:
                nn.init.trunc_normal_(self.fc.weight, std=0.01)

    def normalise(self, f):  # the classifier's input space (also saved by --save-features)
        if self.norm in ("l2+std", "l2"):
            f = F.normalize(f, dim=1)
        f = (f - self.mean) * self.inv_std
        return self.bn(f.view(len(f), self.channels, -1, 1)).flatten(1) if self.norm == "bn2d" else self.bn(f)

    def forward(self, f):
        return self.fc(self.normalise(f))


class LARS(torch.optim.Optimizer):
    """MAE's LARS (util/lars.py): a matrix's gradient (+ wd) is rescaled to trust x ||p|| / ||g||; vectors: plain momentum."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, trust=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    pn, gn = p.norm(), g.norm()
                    g = g * torch.where((pn > 0) & (gn > 0), group["trust"] * pn / gn, torch.ones_like(pn))
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                p.sub_(mu.mul_(group["momentum"]).add_(g), alpha=group["lr"])


def make_optimizer(params, args):
    sgd = dict(momentum=0.9, nesterov=args.optimizer == "nesterov") if args.optimizer in ("sgd", "nesterov") else {}
    optimizer = {"adam": torch.optim.Adam, "lars": LARS}.get(args.optimizer, torch.optim.SGD)
    return optimizer(params, lr=args.lr, weight_decay=args.weight_decay, **sgd)


def lr_at(args, epoch):
    """The protocol's lr at a (fractional) epoch: step, exp (per epoch, as the references) or warmup + cosine (per step)."""
    if args.schedule == "step":
        return args.lr * args.gamma ** sum(int(epoch) >= m for m in args.milestones)
    if args.schedule == "exp":  # BYOL: ExponentialLR, from lr to lr x gamma over the epochs
        return args.lr * args.gamma ** (int(epoch) / args.epochs)
    if epoch < args.warmup:
        return args.lr * epoch / args.warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * (epoch - args.warmup) / max(1e-8, args.epochs - args.warmup)))


def train_classifier(train_f, train_y, num_classes, args, reextract=None, channels=None):
    """Train the head on cached features (or re-extracted each epoch by `reextract(epoch)`) with a resolved protocol."""
    mean, inv_std = torch.zeros_like(train_f[0]), torch.ones_like(train_f[0])
    if args.norm == "l2+std":  # standardisation statistics: L2-normalised center-crop features, unbiased var
        z = F.normalize(train_f, dim=1)
        var, mean = torch.var_mean(z, dim=0) if len(z) > 1 else (torch.ones_like(z[0]), z[0])
        inv_std = 1 / torch.sqrt(var + 1e-5)
    head = Head(mean, inv_std, num_classes, args.classifier == "mlp", args.norm, channels, args.init).to(train_f.device)
    opt = make_optimizer(head.fc.parameters(), args)
    g = torch.Generator().manual_seed(args.seed)
    n, keep, fixed = len(train_f), None, None
    if args.drop_last == "once" and n > args.batch_size:  # BYOL extracts through a shuffled drop_last loader: the
        keep = torch.randperm(n, generator=g)[: n // args.batch_size * args.batch_size].sort().values  # same subset
        n = len(keep)  # every epoch (of a 1% list's ~1,300 images, the same 1,000)
    if args.order == "fixed":  # BadEncoder's downstream loader does not shuffle: one order for all epochs
        fixed = torch.randperm(n, generator=g)
    head.train()
    for epoch in tqdm(range(args.epochs), desc="classifier", leave=False):
        f, y = reextract(epoch) if reextract else (train_f, train_y)
        if keep is not None:
            f, y = f[keep.to(f.device)], y[keep.to(y.device)]
        batches = (fixed if fixed is not None else torch.randperm(n, generator=g)).split(args.batch_size)
        if args.drop_last is True and len(batches) > 1 and len(batches[-1]) < args.batch_size:
            batches = batches[:-1]  # MAE's drop_last: a new remainder left out every epoch
        for i, idx in enumerate(batches):
            if len(idx) < 2 and args.norm.startswith("bn"):
                continue  # BatchNorm needs two samples
            for group in opt.param_groups:
                group["lr"] = lr_at(args, epoch + i / len(batches))
            idx = idx.to(f.device)
            loss = F.cross_entropy(head(f[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


def confusion(pred, labels, num_classes):
    """Rows = true class, columns = predicted class."""
    return torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes).cpu().numpy()


def metrics(cm_clean, cm_patched, target):
    """Acc, TP_t = C[t, t], FP_t = column sum - diagonal, ASR = FP_patched / non-target patched images (docs/formats.md)."""
    out = {}
    for name, cm in (("clean", cm_clean), ("patched", cm_patched)):
        out[f"acc_{name}"] = 100.0 * np.trace(cm) / cm.sum()
        out[f"tp_{name}"] = int(cm[target, target])
        out[f"fp_{name}"] = int(cm[:, target].sum() - cm[target, target])
    out["n_patched"] = int(cm_patched.sum())
    out["n_patched_nontarget"] = int(cm_patched.sum() - cm_patched[target].sum())
    out["asr"] = 100.0 * out["fp_patched"] / max(1, out["n_patched_nontarget"])
    out["asr_all"] = 100.0 * cm_patched[:, target].sum() / max(1, cm_patched.sum())  # BadEncoder: target class included
    return out


def knn_predict(train_f, train_y, val_f, k, t, num_classes):
    train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
    sim, idx = (val_f @ train_f.T).topk(min(k, len(train_f)), dim=1)
    votes = torch.zeros(len(val_f), num_classes, device=val_f.device)
    votes.scatter_add_(1, train_y[idx], (sim / t).exp())
    return votes.argmax(1)


def class_names(samples, num_classes):
    """A class's name = the folder its images sit in (the ImageNet layout), when that is unique."""
    names = {}
    for path, y in samples:
        names.setdefault(y, set()).add(os.path.basename(os.path.dirname(path)))
    return [next(iter(names[c])) if len(names.get(c, ())) == 1 else f"class_{c}" for c in range(num_classes)]


def resolve_target(args, names):
    t = args.target
    if t is None:
        meta = os.path.join(os.path.dirname(os.path.abspath(args.val_patched_list)), "poison.json")
        if not os.path.isfile(meta):
            raise InputError(f"--target not given and no poison.json beside {args.val_patched_list}")
        t = str(json.load(open(meta))["target"]["index"])
    if t in names:
        return names.index(t)
    if t.isdigit() and int(t) < len(names):
        return int(t)
    raise InputError(f"--target {t}: not a class name nor an index in [0, {len(names) - 1}]")


def main(argv=None):
    args = parse_args(argv)
    positive, nonnegative = ("epochs", "batch_size", "lr", "extract_batch_size", "knn_temperature"), ("weight_decay", "knn", "workers")
    for name in positive + nonnegative:  # a number out of its range is one line, before any data is read
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and (v > 0 or (name in nonnegative and v == 0))):
            raise InputError(f"--{name.replace('_', '-')} {v}: must be {'>= 0' if name in nonnegative else '> 0'}")
    check_results(args, "metrics.json")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model, ckpt = load_encoder(args.encoder)
    train, val, patched = read_list(args.train_list), read_list(args.val_list), read_list(args.val_patched_list)
    num_classes = 1 + max(y for _, y in train + val + patched)
    missing = sorted(set(range(num_classes)) - {y for _, y in train})
    if missing:
        raise InputError(f"{args.train_list}: no labeled images of class(es) {missing[:10]}")
    resolve_protocol(args, len(train))
    for samples in (train, val, patched):  # every image's header: not an image, or too large to decode, is one line
        FileList(samples, None).load("off")
    if args.layer != "final" and ckpt["arch"] == "vit":
        raise InputError(f"{args.encoder}: --layer {args.layer} needs a ResNet; ViT checkpoints use the cls token (final)")
    names = class_names(val, num_classes)
    target = resolve_target(args, names)
    s = ckpt["image_size"]
    check_size(patched, s, args.val_patched_list)
    norm = T.Normalize(ckpt["mean"], ckpt["std"])
    as_is = T.Compose([T.ToTensor(), norm])
    resize = val_resize(args, val, s)  # clean and patched val keep one geometry
    center = T.Compose([T.Resize(resize or round(s * 256 / 224)), T.CenterCrop(s), T.ToTensor(), norm])
    train_center, val_center = (as_is if native(train, s) else center), (center if resize else as_is)
    model = model.to(device)
    if ckpt["arch"] != "vit" and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    os.makedirs(args.out, exist_ok=True)

    t0 = time.time()
    train_f, train_y = extract(model, train, train_center, args, device, desc="train features")
    val_f, val_y = extract(model, val, val_center, args, device, desc="val features")
    pat_f, pat_y = extract(model, patched, as_is, args, device, desc="patched features")
    t_extract = time.time() - t0

    t0 = time.time()
    crop = T.RandomResizedCrop(s) if args.augment == "rrc" else T.Compose([T.Resize(round(s * 256 / 224)), T.RandomCrop(s)])
    aug = T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), norm])
    reextract = (lambda epoch: extract(model, train, aug, args, device, epoch + 1, desc=f"aug features {epoch}")) \
        if args.augment else None
    with torch.no_grad():  # channels of the pooled map: BatchNorm2d of the rotnet protocol
        channels = features(model, torch.zeros(1, 3, s, s, device=device), args.layer, flat=False).shape[1]
    head = train_classifier(train_f, train_y, num_classes, args, reextract, channels)
    t_train = time.time() - t0  # with --augment this includes the per-epoch re-extraction

    with torch.no_grad():
        cm_clean = confusion(head(val_f).argmax(1), val_y, num_classes)
        cm_patched = confusion(head(pat_f).argmax(1), pat_y, num_classes)
    m = metrics(cm_clean, cm_patched, target)
    result = {"encoder": os.path.abspath(args.encoder), "method": ckpt["method"], "arch": ckpt["arch"],
              "encoder_epoch": ckpt["epoch"], "target": target, "target_name": names[target], "num_classes": num_classes,
              "n_train": len(train), "n_val": len(val), "layer": args.layer, "classifier": args.classifier,
              "protocol": args.protocol, "val_resize": resize, **m,
              "seconds_extract": t_extract, "seconds_train": t_train, "device": str(device), "args": vars(args)}
    if args.knn:
        knn = [confusion(knn_predict(train_f, train_y, f, args.knn, args.knn_temperature, num_classes), y, num_classes)
               for f, y in ((val_f, val_y), (pat_f, pat_y))]
        result.update({f"knn_{k}": v for k, v in metrics(*knn, target).items()})
    out = lambda name: os.path.join(args.out, name)  # noqa: E731
    write_atomic(out("confusion_clean.npy"), lambda f: np.save(f, cm_clean))
    write_atomic(out("confusion_patched.npy"), lambda f: np.save(f, cm_patched))
    rows = [f"{c},{names[c].replace(',', ';')},{r['tp_clean']},{r['fp_clean']},{r['tp_patched']},{r['fp_patched']}\n"
            for c, r in ((c, metrics(cm_clean, cm_patched, c)) for c in range(num_classes))]
    csv = "class,name,tp_clean,fp_clean,tp_patched,fp_patched\n" + "".join(rows)
    write_atomic(out("per_class.csv"), lambda f: f.write(csv.encode()))
    write_atomic(out("classifier.pt"), lambda f: torch.save({
        "head": head.state_dict(), "classifier": args.classifier, "layer": args.layer, "num_classes": num_classes,
        "class_names": names, "encoder": os.path.abspath(args.encoder)}, f))
    if args.save_features:
        with torch.no_grad():
            feats = {"train": head.normalise(train_f).cpu(), "train_y": train_y.cpu(), "val": head.normalise(val_f).cpu(),
                     "val_y": val_y.cpu(), "patched": head.normalise(pat_f).cpu(), "patched_y": pat_y.cpu(),
                     "target": target, "class_names": names}
        write_atomic(out("features.pt"), lambda f: torch.save(feats, f))
    write_atomic(out("metrics.json"), lambda f: f.write(json.dumps(result, indent=1).encode()))  # last: marks it done
    print(f"linear_probe.py: {ckpt['method']} {ckpt['arch']} epoch {ckpt['epoch']}, protocol {args.protocol}: {args.classifier} "
          f"on {args.layer} features, {len(train)} labeled images, target {target} '{names[target]}'\n"
          f"  clean val   : Acc {m['acc_clean']:6.2f}  target TP {m['tp_clean']:4d}  FP {m['fp_clean']:4d}\n"
          f"  patched val : Acc {m['acc_patched']:6.2f}  target TP {m['tp_patched']:4d}  FP {m['fp_patched']:4d}"
          f"  ASR {m['asr']:.2f}% (all images: {m['asr_all']:.2f}%)\n"
          f"  features {t_extract:.1f}s, classifier {t_train:.1f}s -> {os.path.join(args.out, 'metrics.json')}")


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
        sys.exit(f"linear_probe.py: error: {error_line(e)}")
    except OSError as e:  # a full disk, a read-only folder
        sys.exit(f"linear_probe.py: error: {e.filename or ''}: {e.strerror or e}")
