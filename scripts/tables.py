"""Markdown tables from the runs' JSON outputs (metrics.json of linear_probe.py, log.jsonl of the trainers).

Standard library only. Nothing here is typed by hand: every number is read from a run folder.
  python scripts/tables.py pair RUN            one method: clean vs backdoored model on clean vs patched val
  python scripts/tables.py main ROOT           Saha et al. Table: every ROOT/<method>[_seed<k>] run folder
  python scripts/tables.py defense ROOT        CompReSS defense: ROOT/teacher, ROOT/student_<p>pct
  python scripts/tables.py badencoder ROOT     BadEncoder: ROOT/clean, ROOT/backdoored
  python scripts/tables.py readme README ROOT  rewrite README's generated sections (between BEGIN/END markers)
A run folder RUN holds clean/ and poisoned/ (trainer outputs: checkpoint.pt, log.jsonl) with probe/metrics.json inside.
"""
import glob
import json
import os
import platform
import re
import statistics
import sys

# Saha et al. CVPR 2022, ImageNet-100, 0.5% poisoned, 1% labels, mean of 10 runs:
# (clean model: clean Acc, FP, patched Acc, FP; backdoored model: clean Acc, FP, patched Acc, FP)
PAPER = {
    "moco": (49.9, 23.0, 47.0, 22.8, 50.1, 27.6, 42.5, 461.1),
    "byol": (60.0, 19.2, 53.2, 15.4, 61.6, 32.6, 38.9, 1442.3),
    "msf": (59.0, 20.8, 54.6, 13.0, 60.1, 22.9, 39.6, 830.2),
    "jigsaw": (19.2, 59.6, 17.0, 47.4, 20.2, 54.1, 17.8, 57.6),
    "rotnet": (20.3, 47.6, 17.4, 48.8, 20.3, 48.5, 13.7, 62.8),
    "mae": (64.2, 25.2, 54.9, 13.0, 64.6, 22.0, 55.0, 81.8),
}
METHOD_NAMES = {"moco": "MoCo v2", "byol": "BYOL", "msf": "MSF", "jigsaw": "Jigsaw", "rotnet": "RotNet", "mae": "MAE"}
PAPER_DEFENSE = {"teacher": (50.1, 26.2, 31.8, 1683.2), "25": (44.6, 34.5, 42.0, 37.9), "10": (38.3, 40.5, 35.7, 44.8),
                 "5": (32.1, 41.0, 29.4, 53.7)}
METHODS = ["moco", "byol", "msf", "jigsaw", "rotnet", "mae"]


def load(path):
    return json.load(open(path)) if os.path.isfile(path) else None


def train_log(folder):
    """(epochs, seconds, mean images/s) of a trainer's log.jsonl, or None."""
    path = os.path.join(folder, "log.jsonl")
    if not os.path.isfile(path):
        return None
    epochs = [r for r in map(json.loads, open(path)) if "epoch" in r]
    if not epochs:
        return None
    return epochs[-1]["epoch"], sum(r["seconds"] for r in epochs), statistics.mean(r["images_per_s"] for r in epochs)


def image_size(folder):
    """--image-size of a trainer run, from the first record of its log.jsonl (None if unknown)."""
    path = os.path.join(folder, "log.jsonl")
    first = json.loads(open(path).readline()) if os.path.isfile(path) else {}
    return first.get("args", {}).get("image_size")


def fmt(values, digits=1):
    """mean (or mean ± std over several runs)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def minutes(seconds):
    return f"{seconds / 60:.1f} min"


def pair(run):
    """Paper-style table for one run folder (clean/ and poisoned/ models)."""
    rows = ["| model | clean val Acc | clean val FP | patched val Acc | patched val FP | ASR % | epochs | train time | img/s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for kind, label in (("clean", "clean model"), ("poisoned", "backdoored model")):
        m = load(os.path.join(run, kind, "probe", "metrics.json"))
        t = train_log(os.path.join(run, kind))
        if m is None:
            rows.append(f"| {label} | (no metrics.json) |||||||")
            continue
        ep, sec, ips = t if t else (None, None, None)
        rows.append(f"| {label} | {m['acc_clean']:.1f} | {m['fp_clean']} | {m['acc_patched']:.1f} | {m['fp_patched']} | "
                    f"{m['asr']:.1f} | {ep if ep else '-'} | {minutes(sec) if sec else '-'} | {f'{ips:.0f}' if ips else '-'} |")
    m = load(os.path.join(run, "poisoned", "probe", "metrics.json"))
    if m:
        rows.append(f"\nTarget class {m['target']} '{m['target_name']}'; FP = val images of the other "
                    f"{m['num_classes'] - 1} classes predicted as the target (of {m['n_patched_nontarget']}).")
        c = load(os.path.join(run, "clean", "probe", "metrics.json"))
        if c:
            rows.append(verdict(c, m))
    return "\n".join(rows)


def verdict(clean, backdoored):
    """Does the run show the paper's effect? The backdoored model's patched-val FP is at least 3x the clean model's
    and at least 5% of the non-target images more (paper, MoCo v2: 461.1 vs 22.8 of 4,950 = 20x and 8.9% more), and
    both models are well above chance (at least twice chance accuracy on clean val)."""
    ratio = backdoored["fp_patched"] / max(clean["fp_patched"], 1)
    extra = 100 * (backdoored["fp_patched"] - clean["fp_patched"]) / clean["n_patched_nontarget"]
    shown = (ratio >= 3 and extra >= 5 and
             min(clean["acc_clean"], backdoored["acc_clean"]) >= 2 * 100 / clean["num_classes"])
    return (f"Backdoor effect: patched-val FP {backdoored['fp_patched']} (backdoored) vs {clean['fp_patched']} (clean "
            f"model) = {ratio:.1f}x, {extra:+.1f}% of the non-target images (paper, MoCo v2 on ImageNet-100: 20x, "
            f"+8.9%). " + ("Shown (at least 3x and +5%, both models well above chance)." if shown else
                          "NOT shown (needs at least 3x and +5%, both models well above chance): at this budget the "
                          "numbers do not reproduce the paper."))


def runs_of(root, method):
    """Run folders of one method: ROOT/<method> or ROOT/<method>_seed<k> / _<anything>."""
    return sorted(d for d in glob.glob(os.path.join(root, method + "*")) if re.fullmatch(rf"{method}(_.*)?", os.path.basename(d)))


def main_table(root):
    rows = ["| method | | clean model: clean Acc / FP | clean model: patched Acc / FP | backdoored: clean Acc / FP | "
            "backdoored: patched Acc / FP | backdoored ASR % | runs | epochs | image size | wall time (both models) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        runs = [r for r in runs_of(root, method) if load(os.path.join(r, "poisoned", "probe", "metrics.json"))]
        p = PAPER[method]
        rows.append(f"| {method} | paper | {p[0]} / {p[1]} | {p[2]} / {p[3]} | {p[4]} / {p[5]} | {p[6]} / {p[7]} | "
                    f"{100 * p[7] / 4950:.1f} | 10 | 200 | 224 | |")
        if not runs:
            rows.append(f"| {method} | ours | (not run) ||||||||")
            continue
        c = [load(os.path.join(r, "clean", "probe", "metrics.json")) for r in runs]
        b = [load(os.path.join(r, "poisoned", "probe", "metrics.json")) for r in runs]
        c = [m for m in c if m]

        def cell(ms, acc, fp):
            return f"{fmt([m[acc] for m in ms])} / {fmt([m[fp] for m in ms])}"

        logs = [train_log(os.path.join(r, k)) for r in runs for k in ("clean", "poisoned")]
        sec = sum(t[1] for t in logs if t) / len(runs)
        ep = max((t[0] for t in logs if t), default=0)
        rows.append(f"| {method} | ours | {cell(c, 'acc_clean', 'fp_clean')} | {cell(c, 'acc_patched', 'fp_patched')} | "
                    f"{cell(b, 'acc_clean', 'fp_clean')} | {cell(b, 'acc_patched', 'fp_patched')} | "
                    f"{fmt([m['asr'] for m in b])} | {len(runs)} | {ep} | {image_size(os.path.join(runs[0], 'clean'))} | "
                    f"{minutes(sec)} |")
    m = next((load(f) for f in sorted(glob.glob(os.path.join(root, "*", "poisoned", "probe", "metrics.json")))), None)
    if m:
        rows.append(f"\nOurs: demo data, {m['num_classes']} classes, FP out of {m['n_patched_nontarget']} non-target "
                    f"val images; paper: ImageNet-100, FP out of 4,950. {hardware()}.")
    return "\n".join(rows)


def defense_table(root):
    rows = ["| model | clean Acc | clean FP | patched Acc | patched FP | ASR % | train time |", "|---|---|---|---|---|---|---|"]
    for name in ["teacher"] + [os.path.basename(d)[8:-3] for d in sorted(glob.glob(os.path.join(root, "student_*pct")),
                                                                          key=lambda d: -float(d.split("_")[-1][:-3]))]:
        folder = os.path.join(root, "teacher" if name == "teacher" else f"student_{name}pct")
        m = load(os.path.join(folder, "probe", "metrics.json"))
        p = PAPER_DEFENSE.get(name)
        label = "poisoned MoCo v2 teacher" if name == "teacher" else f"CompReSS student, {name}% clean data"
        if p:
            rows.append(f"| {label} (paper) | {p[0]} | {p[1]} | {p[2]} | {p[3]} | {100 * p[3] / 4950:.1f} | |")
        if m:
            if name == "teacher" and m.get("method"):  # ours may be another method's model (reproduce.sh: DEFENSE_TEACHER)
                label = f"poisoned {METHOD_NAMES.get(m['method'], m['method'])} teacher"
            t = train_log(folder)
            rows.append(f"| {label} (ours) | {m['acc_clean']:.1f} | {m['fp_clean']} | {m['acc_patched']:.1f} | "
                        f"{m['fp_patched']} | {m['asr']:.1f} | {minutes(t[1]) if t else '-'} |")
    return "\n".join(rows)


def badencoder_table(root):
    rows = ["| encoder | clean Acc (CA / BA) | ASR % (all triggered images) | ASR % (non-target images) | target FP "
            "clean / patched | train time |", "|---|---|---|---|---|---|"]
    for kind, label in (("clean", "clean encoder (CA, ASR-B)"), ("backdoored", "BadEncoder (BA, ASR)")):
        m = load(os.path.join(root, kind, "probe", "metrics.json"))
        t = train_log(os.path.join(root, kind))
        if m:
            rows.append(f"| {label} | {m['acc_clean']:.1f} | {m['asr_all']:.1f} | {m['asr']:.1f} | {m['fp_clean']} / "
                        f"{m['fp_patched']} | {minutes(t[1]) if t else '-'} |")
    return "\n".join(rows)


def hardware():
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def readme(path, root):
    """Replace the text between '<!-- BEGIN <name> -->' and '<!-- END <name> -->' with freshly generated tables."""
    text = open(path).read()
    makers = {"main": lambda: main_table(os.path.join(root, "main")),
              "defense": lambda: defense_table(os.path.join(root, "defense")),
              "badencoder": lambda: badencoder_table(os.path.join(root, "badencoder"))}
    for name, make in makers.items():
        text = re.sub(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", lambda m: m.group(1) + make() + "\n" + m.group(2),
                      text, flags=re.S)
    open(path, "w").write(text)


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:] or ["help"]
    if cmd == "pair" and len(rest) == 1:
        print(pair(rest[0]))
    elif cmd == "main" and len(rest) == 1:
        print(main_table(rest[0]))
    elif cmd == "defense" and len(rest) == 1:
        print(defense_table(rest[0]))
    elif cmd == "badencoder" and len(rest) == 1:
        print(badencoder_table(rest[0]))
    elif cmd == "readme" and len(rest) == 2:
        readme(*rest)
    else:
        sys.exit(__doc__)
