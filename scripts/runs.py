"""The paper's protocol: "average over 10 runs with random target category and trigger" (Saha et al., Table 2).

Run r of a measurement (scripts/quickstart.sh and scripts/reproduce.sh with RUNS=N) uses
  - the target class target(r, C), a function of r alone (and of the number of classes C): runs 0..C-1 visit every
    class once in a seeded random order, runs C..2C-1 again in another order, and so on (or TARGETS: its r-th word);
  - the HTBA trigger with --trigger-seed trigger_seed(r) = 10 + r (the reference's trigger_10.png ... trigger_19.png);
  - --seed r for the poisoned subset, the trigger positions, the poisoned model and the probes;
  - its block: runs 0-7 are dev runs (settings and presets are chosen on them), runs 8 and up are test runs (runs 8-15
    on the 8-class demo: every class once, each with its own trigger), reported and never used to choose;
  - its control control(r): another run's backdoored model of the same block (run r-1; the block's first run: run r+1).
The data (the demo images, val and the labeled subsets: poison.py --data-seed) are the same in every run.
Standard library only.
  python scripts/runs.py target R POISON_JSON    the name of run r's target class (classes from a poison.json)
  python scripts/runs.py target R C              its index among C classes in sorted order (poison.py --target)
  python scripts/runs.py trigger-seed R          10 + r
  python scripts/runs.py block dev|test          the block's run indices (dev: 0-7, test: 8-15)
  python scripts/runs.py block R                 run r's block: dev or test
  python scripts/runs.py control R               the run whose backdoored model is run r's control
"""
import json
import random
import sys


def target(r, num_classes):
    """Run r's target class index: a seeded permutation of the classes per block of C runs (no repeats within one)."""
    order = list(range(num_classes))
    random.Random(f"ssl-backdoor target order {r // num_classes}").shuffle(order)  # str seeds are stable across Pythons
    return order[r % num_classes]


def trigger_seed(r):
    return 10 + r


BLOCKS = {"dev": range(0, 8), "test": range(8, 16)}  # test: every class of the 8-class demo once, after the dev runs


def block(r):
    """'dev' for runs 0-7 (for choosing settings), 'test' for runs 8 and up (for reporting)."""
    if r < 0:
        raise ValueError(f"run index {r} < 0")
    return "dev" if r < BLOCKS["test"].start else "test"


def control(r):
    """The run whose backdoored model is run r's control: run r-1 if it is in r's block, else (the block's first run)
    run r+1."""
    return r - 1 if r > 0 and block(r - 1) == block(r) else r + 1


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:] or ["help"]
    if cmd == "target" and len(rest) == 2 and rest[1].isdigit():
        print(target(int(rest[0]), int(rest[1])))
    elif cmd == "target" and len(rest) == 2:
        classes = json.load(open(rest[1]))["classes"]
        print(classes[target(int(rest[0]), len(classes))])
    elif cmd == "trigger-seed" and len(rest) == 1:
        print(trigger_seed(int(rest[0])))
    elif cmd == "block" and len(rest) == 1 and rest[0] in BLOCKS:
        print(*BLOCKS[rest[0]])
    elif cmd == "block" and len(rest) == 1 and rest[0].isdigit():
        print(block(int(rest[0])))
    elif cmd == "control" and len(rest) == 1 and rest[0].isdigit():
        print(control(int(rest[0])))
    else:
        sys.exit(__doc__)
