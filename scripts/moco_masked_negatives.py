"""Diagnostic: does MoCo v2 miss the trigger at demo scale because a poisoned query's negatives carry the same trigger?

Trains moco.py's model with moco.py's recipe and flags, except that the keys of poisoned images are masked out of every
poisoned query's negatives (logit -inf). If the masked model then ties the trigger to the target (cohesion and pull in
scripts/feature_space.py, patched FP in linear_probe.py) where the plain model does not, the same-trigger negatives are
the cause; if not, the cause lies elsewhere. Writes OUT/checkpoint.pt (moco.py's format) and OUT/log.jsonl.
  python scripts/moco_masked_negatives.py DATA OUT [moco.py flags, e.g. the quickstart's demo preset]
DATA: a poison.py folder; the lines of train_poisoned.txt that differ from train_clean.txt are the poisons.
One process (no torchrun); imports moco.py from the repository root.
"""
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import moco  # noqa: E402


def masked_info_nce(q, k, queue, tau, q_poison, queue_poison):
    """moco.info_nce with the negatives of a poisoned query that are poisoned keys removed (logit -inf)."""
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = (q @ queue.T).masked_fill(q_poison[:, None] & queue_poison[None, :], float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=1).float() / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def poisons(data):
    """A bool per train image: its line in train_poisoned.txt differs from train_clean.txt."""
    clean, poisoned = (open(os.path.join(data, f)).read().splitlines() for f in ("train_clean.txt", "train_poisoned.txt"))
    return torch.tensor([a != b for a, b in zip(clean, poisoned) if a.strip()])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        sys.exit(__doc__)
    data, out, flags = argv[0], argv[1], argv[2:]
    args = moco.parse_args(["--train-list", os.path.join(data, "train_poisoned.txt"), "--out", out, *flags])
    rank, world, device = moco.setup(args, ("dim", "queue_size", "tau", "bn_splits", "bn_batch"), (), ("m",))
    samples, poison = moco.read_list(args.train_list), poisons(data).to(device)
    arch_kwargs = {"small_stem": args.small_stem}
    model = moco.MoCo(args.arch, arch_kwargs, args.dim, args.queue_size, args.m, args.tau, args.bn_splits, args.bn_batch)
    model = model.to(device).to(memory_format=torch.channels_last)
    queue_poison = torch.zeros(args.queue_size, dtype=torch.bool, device=device)  # the random initial keys: none
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    geometry, color = moco.aug_plus(args.image_size)
    dataset = moco.FileList(samples, moco.TwoViews(geometry, color), args.seed)
    cache = dataset.load(args.cache_images, args.cache_mib)
    loader, sampler = moco.make_loader(dataset, args, rank, world, device)
    moco.log(args, rank, {"diagnostic": "same-trigger negatives masked", "poisons": int(poison.sum()),
                          "machine": moco.machine(device), "cache": cache, "args": vars(args)}, new=True)
    for epoch in range(args.epochs):
        lr = args.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler.epoch = epoch
        model.train()
        t0, total, masked = time.time(), 0.0, 0
        for ((q, pq), (k, pk)), _, idx in loader:
            im_q = moco.to_device(q, device, torch.channels_last, moco.MEAN, moco.STD, color, pq)
            im_k = moco.to_device(k, device, torch.channels_last, moco.MEAN, moco.STD, color, pk)
            zq = F.normalize(torch.cat([model.encoder_q(c) for c in im_q.split(model.bn_batch)]), dim=1)
            with torch.no_grad():
                model.momentum_update()
                zk = model.keys(im_k)
            q_poison = poison[idx.to(device)]
            masked += int((q_poison[:, None] & queue_poison[None, :]).sum())
            loss = masked_info_nce(zq, zk, model.queue.clone(), model.tau, q_poison, queue_poison.clone())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ptr = int(model.queue_ptr)
            model.enqueue(zk)
            queue_poison[(ptr + torch.arange(len(zk), device=device)) % args.queue_size] = q_poison
            total += loss.item()
        per_query = masked / max(1.0, len(loader) * args.batch_size * float(poison.float().mean()))
        seconds = time.time() - t0
        record = {"epoch": epoch + 1, "loss": total / len(loader), "lr": lr, "seconds": seconds,
                  "images_per_s": len(loader) * args.batch_size / seconds, "masked_negatives_per_poisoned_query": per_query}
        print(f"epoch {epoch + 1}/{args.epochs}  loss {record['loss']:.4f}  {per_query:.1f} negatives masked per "
              "poisoned query", flush=True)
        moco.save_checkpoint(os.path.join(out, "checkpoint.pt"), {
            "method": "moco", "arch": args.arch, "arch_kwargs": arch_kwargs,
            "feature_dim": model.encoder_q[1].in_features, "image_size": args.image_size, "mean": moco.MEAN,
            "std": moco.STD, "encoder": model.encoder_q[0].state_dict(), "epoch": epoch + 1, "args": vars(args)})
        moco.log(args, rank, record)


if __name__ == "__main__":
    try:
        main()
    except moco.InputError as e:
        sys.exit(f"moco_masked_negatives.py: error: {moco.error_line(e)}")
