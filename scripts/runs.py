"""The paper's protocol: "average over 10 runs with random target category and trigger" (Saha et al., Table 2).

Run r of a measurement (scripts/quickstart.sh and scripts/reproduce.sh with RUNS=N) uses
  - the target class target(r, C), a function of r alone (and of the number of classes C): runs 0..C-1 visit every
    class once in a seeded random order, runs C..2C-1 again in another order, and so on (or TARGETS: its r-th word);
  - the HTBA trigger with --trigger-seed trigger_seed(r) = 10 + r (the reference's trigger_10.png ... trigger_19.png);
  - --seed r for the poisoned subset, the trigger positions, the poisoned model and the probes.
The data (the demo images, val and the labeled subsets: poison.py --data-seed) are the same in every run.
Standard library only.
  python scripts/runs.py target R POISON_JSON    the name of run r's target class (classes from a poison.json)
  python scripts/runs.py target R C              its index among C classes in sorted order (poison.py --target)
  python scripts/runs.py trigger-seed R          10 + r
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


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:] or ["help"]
    if cmd == "target" and len(rest) == 2 and rest[1].isdigit():
        print(target(int(rest[0]), int(rest[1])))
    elif cmd == "target" and len(rest) == 2:
        classes = json.load(open(rest[1]))["classes"]
        print(classes[target(int(rest[0]), len(classes))])
    elif cmd == "trigger-seed" and len(rest) == 1:
        print(trigger_seed(int(rest[0])))
    else:
        sys.exit(__doc__)
