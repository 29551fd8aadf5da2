"""MoCo v2 training-step throughput on one GPU with the data already on the device (no loading, no augmentation):
the speed of moco.py's model and optimizer step alone, with and without bf16 autocast, and the peak GPU memory.
    python3 scripts/gpu_step_bench.py [--arch resnet18] [--image-size 224] [--batch-size 256] [--steps 30]
scripts/benchmark.sh measures the whole script, data loading included; the gap between the two is the loader's cost."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import moco  # noqa: E402


def bench(args, amp):
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = moco.MoCo(args.arch, {"small_stem": False}, 128, 65536, 0.999, 0.2, 2).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.06, momentum=0.9, weight_decay=1e-4)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    im_q = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    im_k = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    torch.cuda.reset_peak_memory_stats(device)

    def step():
        with torch.autocast("cuda", torch.bfloat16, enabled=amp):
            loss = model(im_q, im_k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = time.time() - t0
    return args.steps * args.batch_size / seconds, torch.cuda.max_memory_allocated(device) / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_step_bench.py: error: no GPU")
    torch.backends.cudnn.benchmark = True
    print(f"| model step only | amp | input | batch | images/s | peak GPU MiB |\n|---|---|---|---|---|---|")
    for amp in (True, False):
        ips, mib = bench(args, amp)
        print(f"| moco {args.arch} ({torch.cuda.get_device_name()}) | {'bf16' if amp else 'fp32'} | "
              f"{args.image_size} px | {args.batch_size} | {ips:.0f} | {mib:.0f} |", flush=True)


if __name__ == "__main__":
    main()
