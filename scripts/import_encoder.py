"""scripts/import_encoder.py: published encoder weights -> an encoder checkpoint of this project (docs/formats.md).

Consumes a weights file that someone else pre-trained (a torchvision resnet50-*.pth or vit_b_16-*.pth, MoCo v1/v2/v3,
SSL-Backdoor or solo-learn checkpoints): a bare state dict, or one under "state_dict" or "model", with the backbone's
torchvision key names under some prefix ("module.encoder_q.", "module.base_encoder.", "backbone.", ...).
Produces `--out`, a checkpoint with method "imported" that linear_probe.py, badencoder.py and compress_defense.py
(as teacher) accept unchanged; "imported" records the file name, its SHA-256, the prefix and every key dropped.
The file is loaded with torch.load(weights_only=True) only: a file that pickles a class or function is refused, naming
it. An existing --out is replaced only with --overwrite, and never when it is --weights itself; it is written to a
temporary file beside it, then renamed.
The prefix is the one under which every backbone tensor of --arch appears with its exact shape (or --prefix); where
several fit, the query/online network wins over the key/target/momentum one. Classifier and heads are dropped.
ResNets: any torchvision depth; a 3x3 conv1 means the small-image stem (3x3 stride-1 conv1, no max-pool).
ViTs: torchvision's VisionTransformer only (arch "vit"); its arguments are read from the tensor shapes, except the
number of heads (torchvision's table for hidden 768/1024/1280, else --num-heads). Not importable, refused with one
line: positional nn.Sequential keys (lightly's backbone.4.0...), timm-named ViTs (MoCo v3 ViT, MAE, DINO), CLIP.
"""
import argparse
import hashlib
import math
import os
import re
import sys
import warnings

import torch
import torch.nn as nn
import torchvision

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PREFER = ("encoder_q", "online", "base_encoder")  # the query / online network of a two-network method ...
AVOID = ("encoder_k", "target", "momentum")  # ... over its key / target / momentum copy
KNOWN_PREFIXES = ("", "module.", "module.encoder_q.", "module.base_encoder.", "backbone.", "encoder.")
VIT_HEADS = {768: 12, 1024: 16, 1280: 16}  # torchvision's vit_b, vit_l, vit_h
TIMM_VIT = re.compile(r"(^|\.)(blocks\.\d+\.attn\.qkv\.weight|patch_embed\.proj\.weight)$")
POSITIONAL = re.compile(r"(^|\.)\d+\.\d+\.conv1\.weight$")  # nn.Sequential(*resnet.children()): backbone.4.0.conv1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", required=True, help="published weights file (.pth, .pth.tar, .ckpt)")
    p.add_argument("--arch", required=True, help="a torchvision ResNet constructor name (resnet18, resnet50, "
                   "wide_resnet50_2, ...) or 'vit' (torchvision VisionTransformer, arguments read from the weights)")
    p.add_argument("--out", required=True, help="checkpoint file to write (e.g. encoder.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (never --weights itself)")
    p.add_argument("--prefix", default=None, help="force this key prefix (e.g. 'module.encoder_q.', '' for none); "
                   "None = detect it")
    p.add_argument("--image-size", type=int, default=None, help="encoder input size; None = 224 for ResNets, the size "
                   "of the ViT's position embedding")
    p.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, help="normalisation mean (RGB)")
    p.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, help="normalisation std (RGB)")
    p.add_argument("--num-heads", type=int, default=None, help="ViT attention heads; None = torchvision's table "
                   "(hidden 768: 12, 1024: 16, 1280: 16)")
    return p.parse_args(argv)


class Refused(Exception):
    """Weights that cannot be imported; printed as one line."""


def main(argv=None):
    args = parse_args(argv)
    problem = check_out(args)
    if problem:  # a usage error, as argparse's: exit status 2
        print(f"import_encoder.py: error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        run(args)
    except Refused as e:
        sys.exit(f"import_encoder.py: error: {e}")


def check_out(args):
    """Why --out cannot be written, before any work (None: it can)."""
    out, folder = args.out, os.path.dirname(os.path.abspath(args.out))
    if os.path.realpath(out) == os.path.realpath(args.weights) or (
            os.path.exists(out) and os.path.exists(args.weights) and os.path.samefile(out, args.weights)):
        return f"--out {out} is --weights {args.weights}: the source weights would be replaced; choose another --out"
    if os.path.isdir(out):
        return f"--out {out} is a folder: give the checkpoint file to write (e.g. {os.path.join(out, 'encoder.pt')})"
    if os.path.exists(out) and not args.overwrite:
        return f"--out {out} exists: pass --overwrite to replace it"
    while not os.path.exists(folder):  # the nearest folder that exists must let us create the rest
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        return f"--out {out}: cannot write in {folder} ({'not a folder' if not os.path.isdir(folder) else 'no permission'})"
    return None


def run(args):
    vit = args.arch == "vit" or args.arch.startswith("vit_")
    arch = "vit" if vit else args.arch
    if not vit:
        expected_shapes(arch, {"small_stem": False})  # a bad --arch fails here, before the file is read
    obj = load_weights(args.weights)
    state, container = find_state_dict(obj, args.weights)
    if vit:  # torchvision < 0.14 named the MLP layers linear_1/linear_2 (its own loader renames them the same way)
        state = {re.sub(r"\.mlp\.linear_([12])\.", lambda m: f".mlp.{3 * int(m.group(1)) - 3}.", k): v
                 for k, v in state.items()}
    anchor = "conv_proj.weight" if vit else "layer1.0.conv1.weight"  # appears once per backbone
    if args.prefix is not None:
        prefixes = [args.prefix]
    else:
        prefixes = [k[:-len(anchor)] for k in state if k == anchor or k.endswith("." + anchor)]
        prefixes = prefixes or [p for p in KNOWN_PREFIXES if any(k.startswith(p) for k in state)]
    tried = [fit(state, prefix, arch) for prefix in prefixes]
    fits = [t for t in tried if "problem" not in t]
    if not fits:
        raise Refused(diagnose(state, tried, args))
    fits.sort(key=rank)
    if len(fits) > 1:
        names = ", ".join(repr(f["prefix"]) for f in fits)
        if rank(fits[0]) == rank(fits[1]):
            raise Refused(f"{args.weights}: several prefixes fit ({names}): choose one with --prefix")
        print(f"import_encoder.py: {len(fits)} prefixes fit ({names}): using {fits[0]['prefix']!r} "
              "(the query/online network, not the key/target/momentum copy)")
    chosen = fits[0]
    prefix, kwargs = chosen["prefix"], chosen["kwargs"]
    if vit:
        kwargs["num_heads"] = args.num_heads or VIT_HEADS.get(kwargs["hidden_dim"])
        if not kwargs["num_heads"]:
            raise Refused(f"{args.weights}: ViT hidden_dim {kwargs['hidden_dim']}: the number of heads cannot be read "
                          "from the weights; pass --num-heads")
        if kwargs["hidden_dim"] % kwargs["num_heads"]:
            raise Refused(f"--num-heads {kwargs['num_heads']} does not divide hidden_dim {kwargs['hidden_dim']}")
        if args.image_size not in (None, kwargs["image_size"]):
            raise Refused(f"--image-size {args.image_size}: the ViT's position embedding is for "
                          f"{kwargs['image_size']} px (torchvision's VisionTransformer takes only that size)")
    image_size = args.image_size or (kwargs["image_size"] if vit else 224)

    encoder, used = {}, set()
    for k in chosen["shapes"]:
        if prefix + k in state:
            v = state[prefix + k]
            encoder[k] = (v.float() if v.is_floating_point() else v).detach().clone()  # own storage: no big views saved
            used.add(prefix + k)
        else:  # only num_batches_tracked may be missing (files saved before PyTorch 0.4.1)
            encoder[k] = torch.tensor(0)
    dropped = sorted(k for k in state if k not in used)
    with open(args.weights, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    checkpoint = {
        "method": "imported", "arch": arch, "arch_kwargs": kwargs, "feature_dim": chosen["dim"], "image_size": image_size,
        "mean": list(args.mean), "std": list(args.std), "encoder": encoder, "epoch": 0, "args": vars(args),
        "imported": {"file": os.path.basename(args.weights), "sha256": sha256, "container": container,
                     "prefix": prefix, "dropped": dropped, "filled": chosen["filled"]}}
    save(checkpoint, args.out)
    print(f"import_encoder.py: {os.path.basename(args.weights)} (sha256 {sha256[:12]}) -> {args.out}: {arch} {kwargs}, "
          f"prefix {prefix!r}, {len(used)} tensors, feature_dim {chosen['dim']}, image_size {image_size}; "
          f"dropped {len(dropped)} keys{summary(dropped, prefix)}"
          + (f"; {len(chosen['filled'])} missing num_batches_tracked set to 0" if chosen["filled"] else ""))


def save(checkpoint, out):
    """Atomic: a temporary file in --out's folder, then a rename; on any failure the temporary file is removed."""
    tmp = f"{out}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        torch.save(checkpoint, tmp)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write (a full disk) as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200]
        raise Refused(f"--out {out}: cannot write it ({reason})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_weights(path):
    """torch.load with weights_only=True: tensors and plain containers only, nothing in the file is executed."""
    if not os.path.isfile(path):
        raise Refused(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols and TorchScript on stderr
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = " ".join(str(e).split())
        if "TorchScript" in msg:
            raise Refused(f"{path}: a TorchScript archive (code, not a state dict; e.g. OpenAI CLIP's .pt files): "
                          "not importable") from None
        raise Refused(f"{path}: {file_kind(path, msg)}") from None


def file_kind(path, error):
    """What a file that torch.load(weights_only=True) refused holds, in a few words (as the top-level scripts' file_kind)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"\x80")):  # PyTorch's zip format, or a bare pickle
        kind = "a zip" if head[:1] == b"P" else "a pickle"
        found = re.search(r"GLOBAL (\S+)", error)  # weights_only's refusal names what it would have had to import
        if found:
            return (f"refused: {kind} file holding a pickled {found.group(1)}, which is not loaded (loading it would run "
                    "code from the file); this script loads weights with torch.load(weights_only=True) only")
        found = re.search(r"WeightsUnpickler error: (.+?)(?: Check the|$)", error)
        detail = found.group(1) if found else error.split(". ")[0]  # torch's own reason, without its advice
        return f"{kind} file that torch.load(weights_only=True) cannot read (damaged?): {detail}"
    text = b"\0" not in head and head.decode("utf-8", "replace").count("\ufffd") <= 1
    looks = "it is empty" if not head else "it looks like text" if text else "it is some other binary file"
    return f"not a PyTorch weights file (a zip or pickle file); {looks}"


def find_state_dict(obj, path):
    """The dict of tensors: the file itself, or its "state_dict" or "model" entry -> (state, container key)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return {k: v for k, v in obj[key].items() if isinstance(v, torch.Tensor)}, key
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, None
        raise Refused(f"{path}: no state dict in it (no tensors at the top level, under 'state_dict' or under 'model'; "
                      f"keys: {', '.join(map(str, list(obj)[:8]))})")
    raise Refused(f"{path}: no state dict in it (a {type(obj).__name__}, not a dict)")


def fit(state, prefix, arch):
    """Does every backbone tensor of arch appear under prefix with its exact shape? -> a fit, or the first problem."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if arch == "vit":
        kwargs = vit_kwargs(sub)
        if isinstance(kwargs, str):
            return {"prefix": prefix, "problem": prefix + kwargs, "matched": 0}
    else:
        conv1 = sub.get("conv1.weight")
        kwargs = {"small_stem": conv1 is not None and tuple(conv1.shape[2:]) == (3, 3)}
    shapes, dim = expected_shapes(arch, {**kwargs, "num_heads": 1} if arch == "vit" else kwargs)  # heads: no shape
    matched, filled = 0, []
    for k, shape in shapes.items():
        if k not in sub and k.endswith("num_batches_tracked"):
            filled.append(k)
        elif k not in sub:
            return {"prefix": prefix, "problem": f"{prefix}{k} missing", "matched": matched}
        elif tuple(sub[k].shape) != shape:
            return {"prefix": prefix, "matched": matched, "problem": f"{prefix}{k} has shape {tuple(sub[k].shape)}, "
                    f"{arch} {kwargs} expects {shape}"}
        else:
            matched += 1
    return {"prefix": prefix, "kwargs": kwargs, "shapes": shapes, "dim": dim, "filled": filled}


def vit_kwargs(sub):
    """torchvision VisionTransformer arguments from tensor shapes (num_heads is set later), or the first problem."""
    for k in ("conv_proj.weight", "encoder.pos_embedding", "encoder.layers.encoder_layer_0.mlp.0.weight"):
        if k not in sub:
            return f"{k} missing"
    hidden_dim, _, patch_size, _ = sub["conv_proj.weight"].shape
    tokens = sub["encoder.pos_embedding"].shape[1] - 1  # patches + the class token
    side = math.isqrt(tokens)
    if side * side != tokens:
        return f"encoder.pos_embedding has {tokens} patch positions, not a square grid"
    num_layers = len({k.split(".")[2] for k in sub if k.startswith("encoder.layers.encoder_layer_")})
    return {"image_size": side * patch_size, "patch_size": patch_size, "num_layers": num_layers,
            "hidden_dim": hidden_dim, "mlp_dim": sub["encoder.layers.encoder_layer_0.mlp.0.weight"].shape[0]}


def rank(f):
    return not any(t in f["prefix"] for t in PREFER), any(t in f["prefix"] for t in AVOID)


def diagnose(state, tried, args):
    """One line on why nothing fits: a layout this script cannot map, or the closest prefix's first problem."""
    keys = list(state)
    timm = next((k for k in keys if TIMM_VIT.search(k)), None)
    if timm and not any(k.endswith("conv_proj.weight") or k.endswith("layer1.0.conv1.weight") for k in keys):
        return (f"{args.weights}: a timm-named ViT ({timm}; MoCo v3 ViT, MAE, DINO): not torchvision's VisionTransformer, "
                "the only ViT this project builds")
    positional = next((k for k in keys if POSITIONAL.search(k)), None)
    if positional and not any(k.endswith("layer1.0.conv1.weight") for k in keys):
        return (f"{args.weights}: positional nn.Sequential keys ({positional}, e.g. lightly's backbone): not "
                "torchvision's names (conv1, bn1, layer1, ...)")
    best = max(tried, key=lambda t: t["matched"]) if tried else None
    where = ", ".join(repr(t["prefix"]) for t in tried) or "none"
    first = best["problem"] if best else f"no key ends with a {args.arch} backbone key"
    return f"{args.weights} does not fit --arch {args.arch}: {first} (prefixes tried: {where})"


def summary(dropped, prefix):
    """The dropped keys grouped by their first name under the prefix (or their first two names), largest first."""
    groups = {}
    for k in dropped:
        g = prefix + k[len(prefix):].split(".")[0] if k.startswith(prefix) else ".".join(k.split(".")[:2])
        groups[g] = groups.get(g, 0) + 1
    top = sorted(groups.items(), key=lambda kv: -kv[1])[:6]
    return f" ({', '.join(f'{g}: {n}' for g, n in top)}{', ...' if len(groups) > 6 else ''})" if top else ""


def expected_shapes(arch, arch_kwargs):
    """The backbone's tensor shapes by key (built on the meta device: no memory, no init cost) -> (shapes, feature_dim)."""
    with torch.device("meta"):
        model, dim = build_backbone(arch, arch_kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, dim


# the top-level scripts' encoder builder, cut to what this script builds (tests/test_import_encoder.py compares them)
def build_backbone(arch, arch_kwargs):
    """A torchvision backbone without its classifier -> (model, feature_dim): a ResNet, {"small_stem": bool} (3x3
    stride-1 conv1, no max-pool), or "vit", the VisionTransformer arguments (cls-token feature)."""
    if arch == "vit":
        model = torchvision.models.VisionTransformer(**arch_kwargs)
        model.heads = nn.Identity()
        return model, arch_kwargs["hidden_dim"]
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except (ValueError, TypeError) as e:
        raise Refused(f"--arch {arch}: not a torchvision model this script can build ({e})") from None
    if not hasattr(model, "fc") or not hasattr(model, "conv1"):
        raise Refused(f"--arch {arch}: only torchvision ResNets (and 'vit') are supported")
    if arch_kwargs["small_stem"]:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, dim


if __name__ == "__main__":
    main()
