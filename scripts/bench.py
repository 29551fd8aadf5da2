"""Training throughput per trainer: the whole run's images/s against its model step's, and their ratio.

The whole run is the trainer itself (a subprocess, data loading and augmentation included); images/s is the mean of
its log.jsonl's `images_per_s` over the epochs after the first (one epoch: that one). The model step is the same
trainer and flags in this process with its loader replaced: one batch, loaded once and kept on the device, replayed
--steps times per epoch, the colour ops skipped; images/s is its last epoch's (the first warms up). A ratio near 1
means the data path keeps up with the model; well below 1, the loader or the augmentation is the bound.
    python3 scripts/bench.py [--train-list LIST] [--out runs/bench] [--trainers moco byol ...] [--device auto]
        [--image-size 32] [--batch-size 64] [--epochs 3] [--steps N] [--workers 0] [--threads N] [--no-amp]
        [--set TRAINER=FLAGS ...] [--encoder CKPT] [--demo-per-class N]
Without --train-list, poison.py's demo images (8 classes, 8 batches) are made in OUT/data. badencoder and
compress_defense start from --encoder, or else from this bench's moco run. images/s counts source images (RotNet
turns each into 4 samples, Jigsaw into 9 tiles). Prints a markdown table and writes it to OUT/bench.md."""
import argparse
import contextlib
import importlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINERS = ["moco", "byol", "msf", "jigsaw", "rotnet", "mae", "badencoder", "compress_defense"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train-list", default=None, help="file list to train on; None = poison.py demo images in OUT/data")
    p.add_argument("--out", default="runs/bench", help="output folder: one folder per run, bench.md")
    p.add_argument("--trainers", nargs="+", default=TRAINERS, choices=TRAINERS, help="trainers to measure")
    p.add_argument("--demo-per-class", type=int, default=None, help="without --train-list: demo images per class "
                   "(8 classes); None = the batch size, 8 batches")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    p.add_argument("--image-size", type=int, default=32, help="training crop size")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of every trainer")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the whole run (the first is left out of its rate)")
    p.add_argument("--steps", type=int, default=None, help="model step: replayed steps per epoch (2 epochs); None = "
                   "the whole run's steps per epoch")
    p.add_argument("--workers", type=int, default=0, help="loader processes of the whole run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (OMP_NUM_THREADS) of every run; None = torch's")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on GPU")
    p.add_argument("--set", action="append", default=[], metavar="TRAINER=FLAGS",
                   help="more flags for one trainer, after the bench's own (they win), e.g. 'moco=--queue-size 128'")
    p.add_argument("--encoder", default=None, help="checkpoint that badencoder and compress_defense start from; "
                   "None = this bench's moco run (made first if moco is not measured)")
    return p.parse_args(argv)


def trainer_flags(method, size, batch, n, encoder, reference):
    """Each trainer's flags beside the shared ones: the paper's K and ViT-B/16 at 128 px and above, the quickstart's
    demo values below (a queue or bank of one epoch, the 4-block ViT with 4 px patches)."""
    large = size >= 128
    k = 65536 // batch * batch if large else batch * max(1, n // batch)
    vit = ["--patch-size", "16"] if large else ("--patch-size 4 --width 128 --depth 4 --heads 4 --decoder-width 64 "
                                                 "--decoder-depth 2 --decoder-heads 4").split()
    return {"moco": ["--queue-size", str(k)], "byol": ["--warmup-iters", "1"], "msf": ["--bank-size", str(k)],
            "jigsaw": [], "rotnet": [], "mae": vit + ["--warmup-epochs", "1"],
            "badencoder": ["--encoder", encoder, "--reference-list", reference],  # its default trigger: white
            "compress_defense": ["--teacher", encoder]}[method]


def epoch_rates(log):
    """The images_per_s of each epoch a log.jsonl records, and its largest peak_gpu_mib (0 on CPU)."""
    with open(log) as f:
        records = [r for r in map(json.loads, f) if "images_per_s" in r]
    if not records:
        raise ValueError(f"{log}: no epoch logged")
    return [r["images_per_s"] for r in records], max(r.get("peak_gpu_mib") or 0 for r in records)


class Replay:
    """A loader that yields one batch `steps` times; the batch's images (uint8 tensors) already on the device."""

    def __init__(self, batch, steps):
        self.batch, self.steps = batch, steps

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter([self.batch] * self.steps)


def on_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device) if batch.dtype == torch.uint8 and batch.dim() >= 3 else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(on_device(b, device) for b in batch)
    return batch


def model_step(method, argv, steps, epochs=2):
    """The trainer's main(argv) with its loader replaced by Replay and its colour ops skipped -> images/s of the last
    epoch (--epochs and --workers are set here; the trainer's output goes to its --out + '.log')."""
    sys.path.insert(0, ROOT)
    trainer = importlib.import_module(method)
    make_loader, to_device = trainer.make_loader, trainer.to_device

    def replay_loader(dataset, args, rank, world, device):
        loader, sampler = make_loader(dataset, args, rank, world, device)
        return Replay(on_device(next(iter(loader)), device), steps), sampler

    trainer.make_loader = replay_loader
    trainer.to_device = lambda x, device, memory_format, mean, std, augment=None, params=None: \
        to_device(x, device, memory_format, mean, std)  # uint8 -> normalised float only: no colour ops
    argv = [*argv, "--epochs", str(epochs), "--workers", "0"]
    out = trainer.parse_args(argv).out
    shutil.rmtree(out, ignore_errors=True)  # log.jsonl is appended to: start afresh
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
        with open(out + ".log", "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            trainer.main(argv)
        return epoch_rates(os.path.join(out, "log.jsonl"))[0][-1]
    finally:
        trainer.make_loader, trainer.to_device = make_loader, to_device
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def whole_run(method, argv, out, env):
    """The trainer as a subprocess -> (images/s, peak GPU MiB); its output in out + '.log'."""
    shutil.rmtree(out, ignore_errors=True)
    with open(out + ".log", "w") as f:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, method + ".py"), *argv, "--out", out], cwd=ROOT,
                              env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{method}.py failed ({proc.returncode}), see {out}.log")
    rates, mib = epoch_rates(os.path.join(out, "log.jsonl"))
    return statistics.mean(rates[1:] or rates), mib  # the first epoch includes start-up


def table(rows, header):
    lines = [header, "", "| trainer | model step images/s | whole run images/s | whole run / model step | peak GPU MiB |",
             "|---|---|---|---|---|"]
    for name, step, run, mib in rows:
        if isinstance(step, str):
            lines.append(f"| {name} | {step} | | | |")
        else:
            lines.append(f"| {name} | {step:.0f} | {run:.0f} | {run / step:.2f} | {f'{mib:.0f}' if mib else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    extra = {}
    for item in args.set:
        name, _, flags = item.partition("=")
        if name not in TRAINERS:
            sys.exit(f"bench.py: error: --set {item}: unknown trainer '{name}' ({', '.join(TRAINERS)})")
        extra[name] = extra.get(name, []) + shlex.split(flags)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)
    lst = args.train_list
    if lst is None:  # demo images a little larger than the crop
        lst = os.path.join(out, "data", "train_clean.txt")
        per_class = args.demo_per_class or args.batch_size
        subprocess.run([sys.executable, os.path.join(ROOT, "poison.py"), "--out", os.path.join(out, "data"), "--reuse",
                        "--demo-classes", "8", "--demo-train-per-class", str(per_class), "--demo-val-per-class", "2",
                        "--demo-size", str(args.image_size * 8 // 7), "--val-crop", str(args.image_size)],
                       cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    lst = os.path.abspath(lst)
    with open(lst) as f:
        lines = [ln for ln in f if ln.strip()]
    reference = os.path.join(out, "reference.txt")  # badencoder's reference: the list's first image
    with open(reference, "w") as f:
        first = lines[0].split()[0]
        f.write(f"{os.path.join(os.path.dirname(lst), first)} 0\n")
    common = ["--train-list", lst, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
              "--device", args.device, "--save-every", "1000", "--amp" if args.amp else "--no-amp"]
    encoder = args.encoder or os.path.join(out, "moco-run", "checkpoint.pt")
    flags = lambda m: common + trainer_flags(m, args.image_size, args.batch_size, len(lines), encoder, reference) + \
        extra.get(m, [])  # later flags win
    needs = {"badencoder", "compress_defense"} & set(args.trainers)
    if needs and not args.encoder and "moco" not in args.trainers:
        whole_run("moco", flags("moco") + ["--epochs", "1", "--workers", str(args.workers)], os.path.join(out, "moco-run"), env)
    steps = args.steps or max(1, len(lines) // args.batch_size)
    rows = []
    for m in sorted(set(args.trainers), key=TRAINERS.index):  # moco first: badencoder and compress_defense may need it
        try:  # one after the other: the model step, then the whole run
            step = model_step(m, flags(m) + ["--out", os.path.join(out, f"{m}-step")], steps)
            run, mib = whole_run(m, flags(m) + ["--epochs", str(args.epochs), "--workers", str(args.workers)],
                                 os.path.join(out, f"{m}-run"), env)
            rows.append((m, step, run, mib))
        except (Exception, SystemExit) as e:
            rows.append((m, f"failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}", 0, 0))
        print(table(rows[-1:], "").splitlines()[-1], flush=True)
    device = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else "CPU"
    header = (f"{device}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads; {args.image_size} px, "
              f"batch {args.batch_size}, {len(lines)} images, {'bf16' if args.amp and device != 'CPU' else 'fp32'}; "
              f"whole run: epochs 2-{args.epochs}, {args.workers} workers; model step: {steps} steps per epoch")
    text = table(rows, header)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
