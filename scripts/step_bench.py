"""The model step alone of a trainer, on CPU or GPU: the trainer runs as usual, except that its loader replays one
real batch (loaded once) and the colour ops are skipped, so the images/s it logs is the model's and optimizer's
speed without the data path. Compare it with the same command's whole run (log.jsonl) to see the data path's cost.
    python3 scripts/step_bench.py METHOD TRAINER_FLAGS...    e.g. moco --train-list L --out O --image-size 32 ...
METHOD: moco, byol, msf, jigsaw, rotnet, mae, badencoder, compress_defense. Prints and writes O/step_bench.json."""
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


class Replay:
    """A loader that yields its first batch len(loader) times."""

    def __init__(self, loader):
        self.loader, self.batch = loader, None

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.batch is None:
            self.batch = next(iter(self.loader))
        return iter([self.batch] * len(self.loader))


def main():
    method, argv = sys.argv[1], sys.argv[2:]
    trainer = importlib.import_module(method)
    make_loader, to_device = trainer.make_loader, trainer.to_device

    def replay_loader(*a, **k):
        loader, sampler = make_loader(*a, **k)
        return Replay(loader), sampler

    trainer.make_loader = replay_loader
    trainer.to_device = lambda x, device, memory_format, mean, std, augment=None, params=None: \
        to_device(x, device, memory_format, mean, std)  # uint8 -> normalised float only: no colour ops
    trainer.main(argv)
    args = trainer.parse_args(argv)
    records = [json.loads(line) for line in open(os.path.join(args.out, "log.jsonl")) if '"images_per_s"' in line]
    rates = sorted(r["images_per_s"] for r in records[1:] or records)  # the first epoch warms up
    result = {"method": method, "model_step_images_per_s": rates[len(rates) // 2], "epochs": len(records),
              "argv": argv}
    with open(os.path.join(args.out, "step_bench.json"), "w") as f:
        json.dump(result, f)
    print(f"step_bench.py: {method} model step {result['model_step_images_per_s']:.0f} images/s (median of epochs 2+)")


if __name__ == "__main__":
    main()
