"""Markdown tables from the runs' JSON outputs (metrics.json of linear_probe.py, log.jsonl of the trainers).

Standard library only. Nothing here is typed by hand: every number is read from a run folder.
  python scripts/tables.py pair RUN            one run: clean vs backdoored model on clean vs patched val
  python scripts/tables.py runs DIR            one method's runs DIR/run<r>, dev and test runs apart: mean ± std, per run
                                               the patched FP over the probe seeds and the verdict, "shown in k of N
                                               test runs", details
  python scripts/tables.py main ROOT           Saha et al. Table: ROOT/<method>/run<r> (or ROOT/<method>[_<any>]) runs
  python scripts/tables.py details ROOT        every run of ROOT/<method>/: its target, trigger seed and cells
  python scripts/tables.py defense ROOT        CompReSS defense: ROOT[/run<r>]/teacher, .../student_<p>pct
  python scripts/tables.py badencoder ROOT     BadEncoder: ROOT[/run<r>]/clean, .../backdoored
  python scripts/tables.py patchsearch ROOT    PatchSearch: ROOT[/run<r>]/<method>/summary.json
  python scripts/tables.py triggers ROOT       trigger families: ROOT/triggers/<trigger>/<method>/run<r> beside the HTBA
                                               patch's runs of the same r (ROOT/main/<method>/run<r>)
  python scripts/tables.py knobs ROOT         knob search: ROOT/knobs/<name>/run<r> (quickstart.sh RUNS=N with other flags)
                                               beside the main table's runs of the same r (ROOT/main/<method>/run<r>)
  python scripts/tables.py glance ROOT         results at a glance: per method the paper's effect and the test runs' verdict
  python scripts/tables.py test ROOT           the reported verdicts: the test runs (8 and up) of ROOT/test/<method>
                                               (FIRST=8 RUNS=N quickstart.sh) and ROOT/main/<method> (reproduce.sh)
  python scripts/tables.py readme FILE ROOT    rewrite FILE's generated sections (between BEGIN/END markers)
  python scripts/tables.py probes DIR          the runs DIR/run<r> probed at several seeds (scripts/probe_seeds.sh):
                                               per run the patched FP and the verdict at each probe seed
  python scripts/tables.py seeds DIR OTHER     the runs DIR/run<r> with their clean model beside another clean seed's
                                               (OTHER/probe_run<r>, quickstart.sh PRETRAIN_LIST mode)
A run folder RUN holds clean/ and poisoned/ (trainer outputs: checkpoint.pt, log.jsonl; clean/ may link them to the
method's one clean model) with probe/metrics.json inside, data/poison.json, and feature_space.json if drawn. Over
several runs a cell is mean ± sample standard deviation.

Dev and test runs (scripts/runs.py): runs 0-7 are dev runs, on which settings are chosen; runs 8 and up are test runs,
which report them. The runs table counts each block on its own: "BYOL (demo preset): shown in 6 of 8 test runs".
The verdict of a run (the runs table): a run is shown only if it is shown at 4 or more of 5 probe seeds and its control
stays below it. Shown at a probe seed k (0-4: run<r>/probe_seeds/{clean,poisoned}/s<k>, made by quickstart.sh RUNS=N):
the per-probe rule shown(), the backdoored model's patched-val FP at least 3x the clean model's and at least 5% of the
non-target val images more, both models' clean-val Acc at least twice chance. Its control stays below it: the control
(another run's backdoored model, run<r>/control/probe, probed on run r's lists at probe seed r) sends fewer patched
images to the target than run r's backdoored model at probe seed r. A run without its 5 probe seeds or its control gets
no verdict and is not counted. The other tables (main, glance, details, knobs, triggers, pair) give the per-probe rule
at the run's own probe seed r.
Time columns give one model's training time, with how many models were trained at once where the trainer folder's done
file says (jobs=<n>, quickstart.sh); under each table, the machines of its runs (the "machine" record of each trainer's
log.jsonl; "unknown" where a log has none).
"""
import glob
import json
import os
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
# Epochs of the recipe each paper row stands for (the scripts' --epochs defaults): SSL-Backdoor's MoCo v2 and BYOL 200,
# Jigsaw and RotNet 105; MSF 200 (MSF's own recipe); MAE 800 (MAE's official recipe: SSL-Backdoor ships no MAE code).
PAPER_EPOCHS = {"moco": 200, "byol": 200, "msf": 200, "jigsaw": 105, "rotnet": 105, "mae": 800}


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


def trainer_folder(folder):
    """The folder the trainer wrote (run<r>/clean links the files of the method's one clean model)."""
    return os.path.dirname(os.path.realpath(os.path.join(folder, "log.jsonl")))


def at_once(folder):
    """How many models were trained at once with this one: jobs=<n> in its done file (quickstart.sh), or None."""
    path = os.path.join(trainer_folder(folder), "done")
    m = re.search(r"^jobs=(\d+)$", open(path).read(), flags=re.M) if os.path.isfile(path) else None
    return int(m.group(1)) if m else None


def train_time(folders, count=False):
    """One model's training time over FOLDERS (each trainer folder once: one clean model linked into every run counts
    once), mean per load: '5.4 min (1 at once)'; the time alone where no done file says the load. count: ' (x2)' for a
    mean over several models."""
    groups = {}
    for t in {trainer_folder(f) for f in folders}:
        log = train_log(t)
        if log:
            groups.setdefault(at_once(t), []).append(log[1])
    return ", ".join(f"{minutes(statistics.mean(s))}{f' ({j} at once)' if j else ''}"
                     f"{f' (x{len(s)})' if count and len(s) > 1 else ''}"
                     for j, s in sorted(groups.items(), key=lambda g: g[0] or 0)) or "-"


def machine(folder):
    """The machine a trainer ran on: the first "machine" record of its log.jsonl, in words, or 'unknown'."""
    path = os.path.join(folder, "log.jsonl")
    for r in map(json.loads, open(path)) if os.path.isfile(path) else []:
        if isinstance(r.get("machine"), dict):
            m = r["machine"]
            threads = f"{m.get('threads')} thread{'' if m.get('threads') == 1 else 's'} per model"
            return (f"{m.get('cpu') or 'unknown CPU'}, {m.get('cores')} cores, {threads}, {m.get('gpu') or 'no GPU'}, "
                    f"torch {m.get('torch')}, Python {m.get('python')}")
    return "unknown"


def machines(runs):
    """'Machines (trainers' log.jsonl): <machine>: 8 runs; unknown: 2 runs.': the machines of the runs' clean and
    backdoored models, each with how many runs used it."""
    count = {}
    for r in runs:
        for m in {machine(os.path.join(r, kind)) for kind in ("clean", "poisoned")}:
            count[m] = count.get(m, 0) + 1
    return "Machines (trainers' log.jsonl): " + "; ".join(
        f"{m}: {n} run{'s' if n > 1 else ''}" for m, n in sorted(count.items(), key=lambda x: (-x[1], x[0]))) + "."


def cell(values, digits=1):
    """One run: the value as the probe wrote it (counts stay integers); several: mean ± std."""
    values = [v for v in values if v is not None]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}" if isinstance(values[0], float) else str(values[0])
    return fmt(values, digits)


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
        ep, _, ips = t if t else (None, None, None)
        rows.append(f"| {label} | {m['acc_clean']:.1f} | {m['fp_clean']} | {m['acc_patched']:.1f} | {m['fp_patched']} | "
                    f"{m['asr']:.1f} | {ep if ep else '-'} | {train_time([os.path.join(run, kind)])} | {f'{ips:.0f}' if ips else '-'} |")
    m = load(os.path.join(run, "poisoned", "probe", "metrics.json"))
    if m:
        seed = trigger_seed(run)
        rows.append(f"\nTarget class {m['target']} '{m['target_name']}'{f', trigger seed {seed}' if seed is not None else ''}"
                    f"; FP = val images of the other {m['num_classes'] - 1} classes predicted as the target (of "
                    f"{m['n_patched_nontarget']}).")
        c = load(os.path.join(run, "clean", "probe", "metrics.json"))
        if c:
            rows.append(verdict(c, m))
        fs = load(os.path.join(run, "feature_space.json"))
        if fs:
            rows.append(f"Feature space (feature_space.png): patched non-target val images whose nearest class centroid is "
                        f"the target: {fs['clean']['patched_to_target_centroid']:.1f}% (clean model), "
                        f"{fs['backdoored']['patched_to_target_centroid']:.1f}% (backdoored)." +
                        (f" Trigger pull, cosine similarity patched minus clean: to each other "
                         f"{fs['clean']['trigger_cohesion']:+.3f} (clean model), {fs['backdoored']['trigger_cohesion']:+.3f} "
                         f"(backdoored); to the target's centroid {fs['clean']['trigger_to_target']:+.3f}, "
                         f"{fs['backdoored']['trigger_to_target']:+.3f}." if "trigger_cohesion" in fs["clean"] else "") +
                        (f" Feature norm, patched over clean: {fs['clean']['trigger_norm_ratio']:.2f} (clean model), "
                         f"{fs['backdoored']['trigger_norm_ratio']:.2f} (backdoored)." if "trigger_norm_ratio" in fs["clean"]
                         else ""))
    rows.append(machines([run]))
    return "\n".join(rows)


def shown(clean, backdoored):
    """The paper's effect: the backdoored model's patched-val FP is at least 3x the clean model's and at least 5% of
    the non-target images more (paper, MoCo v2: 461.1 vs 22.8 of 4,950 = 20x and 8.9% more), and both models are well
    above chance (at least twice chance accuracy on clean val)."""
    ratio = backdoored["fp_patched"] / max(clean["fp_patched"], 1)
    extra = 100 * (backdoored["fp_patched"] - clean["fp_patched"]) / clean["n_patched_nontarget"]
    return ratio >= 3 and extra >= 5 and min(clean["acc_clean"], backdoored["acc_clean"]) >= 2 * 100 / clean["num_classes"]


def verdict(clean, backdoored):
    ratio = backdoored["fp_patched"] / max(clean["fp_patched"], 1)
    extra = 100 * (backdoored["fp_patched"] - clean["fp_patched"]) / clean["n_patched_nontarget"]
    method = backdoored.get("method") if backdoored.get("method") in PAPER else "moco"
    p = PAPER[method]  # the paper's patched FP of 4,950 non-target val images: clean model p[3], backdoored p[7]
    return (f"Backdoor effect: patched-val FP {backdoored['fp_patched']} (backdoored) vs {clean['fp_patched']} (clean "
            f"model) = {ratio:.1f}x, {extra:+.1f}% of the non-target images (paper, {METHOD_NAMES[method]} on "
            f"ImageNet-100: {p[7] / p[3]:.1f}x, {100 * (p[7] - p[3]) / 4950:+.1f}%). " +
            ("Shown (at least 3x and +5%, both models well above chance)." if shown(clean, backdoored) else
             "NOT shown (needs at least 3x and +5%, both models well above chance): at this budget the numbers do not "
             "reproduce the paper."))


def run_number(folder):
    m = re.fullmatch(r"run(\d+)", os.path.basename(folder))
    return int(m.group(1)) if m else None


def numbered_runs(folder):
    """folder/run<r> subfolders, in the order of r."""
    return sorted((d for d in glob.glob(os.path.join(folder, "run*")) if run_number(d) is not None), key=run_number)


def runs_of(root, method):
    """Run folders of one method: ROOT/<method>/run<r> (RUNS=N), then ROOT/<method>[_<anything>] holding one run."""
    one = sorted(d for d in glob.glob(os.path.join(root, method + "*"))
                 if re.fullmatch(rf"{method}(_.*)?", os.path.basename(d)) and os.path.isdir(os.path.join(d, "poisoned")))
    return numbered_runs(os.path.join(root, method)) + one


def trigger_seed(run):
    """The run's trigger seed, from the poison.json of the data its backdoored model was probed on."""
    meta = load(os.path.join(run, "data", "poison.json"))
    if meta is None:
        m = load(os.path.join(run, "poisoned", "probe", "metrics.json")) or {}
        patched = m.get("args", {}).get("val_patched_list")
        meta = load(os.path.join(os.path.dirname(patched), "poison.json")) if patched else None
    return meta["trigger"].get("seed") if meta and isinstance(meta.get("trigger"), dict) else None


def finished(runs):
    """(run, clean metrics, backdoored metrics, feature_space.json or None) of every run with both probes done."""
    out = []
    for r in runs:
        c, b = (load(os.path.join(r, k, "probe", "metrics.json")) for k in ("clean", "poisoned"))
        if c and b:
            out.append((r, c, b, load(os.path.join(r, "feature_space.json"))))
    return out


def pair_cells(c, b, fs):
    """The cells of one run (or, given lists, of several): the four Acc / FP pairs, ASR, FP difference, centroid %."""
    c, b, fs = (x if isinstance(x, list) else [x] for x in (c, b, fs))

    def acc_fp(ms, acc, fp):
        return f"{cell([m[acc] for m in ms])} / {cell([m[fp] for m in ms])}"

    fs = [f for f in fs if f]
    centroid = (f"{cell([f['clean']['patched_to_target_centroid'] for f in fs])} / "
                f"{cell([f['backdoored']['patched_to_target_centroid'] for f in fs])}") if fs else "-"
    return [acc_fp(c, "acc_clean", "fp_clean"), acc_fp(c, "acc_patched", "fp_patched"), acc_fp(b, "acc_clean", "fp_clean"),
            acc_fp(b, "acc_patched", "fp_patched"), cell([m["asr"] for m in b]),
            cell([y["fp_patched"] - x["fp_patched"] for x, y in zip(c, b)]), centroid]


MAIN_HEADER = ("| method | | clean model: clean Acc / FP | clean model: patched Acc / FP | backdoored: clean Acc / FP | "
               "backdoored: patched Acc / FP | backdoored ASR % | patched FP, backdoored - clean | effect shown | "
               "patched -> target centroid %, clean / backdoored | runs | epochs | image size | train time: clean model, "
               "backdoored per run |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def method_rows(method, runs, rule=None):
    """The paper's row and ours (mean ± std over the finished runs), and the verdict line over the runs. rule(run):
    the run's verdict (True, False, or None: not counted) for the "effect shown" cell; default shown() at probe seed r."""
    p = PAPER[method]
    rows = [f"| {method} | paper | {p[0]} / {p[1]} | {p[2]} / {p[3]} | {p[4]} / {p[5]} | {p[6]} / {p[7]} | "
            f"{100 * p[7] / 4950:.1f} | {p[7] - p[3]:.1f} | | | 10 | {PAPER_EPOCHS[method]} | 224 | |"]
    done = finished(runs)
    if not done:
        return rows + [f"| {method} | ours | (not run) |||||||||||"], None
    _, c, b, fs = map(list, zip(*done))
    k, n = sum(shown(x, y) for x, y in zip(c, b)), len(done)
    verdicts = [v for r, *_ in done for v in [rule(r)] if v is not None] if rule else None
    effect = f"{k} of {n}" if rule is None else f"{sum(verdicts)} of {len(verdicts)}" + (
        f" (+{n - len(verdicts)} without a verdict)" if len(verdicts) < n else "")
    logs = [train_log(os.path.join(r, kind)) for r, *_ in done for kind in ("clean", "poisoned")]
    ep = max((t[0] for t in logs if t), default=0)
    time = (f"{train_time([os.path.join(r, 'clean') for r, *_ in done], count=True)}, "
            f"{train_time([os.path.join(r, 'poisoned') for r, *_ in done])}")
    rows.append(f"| {method} | ours | " + " | ".join(pair_cells(c, b, fs)[:6]) + f" | {effect} | {pair_cells(c, b, fs)[6]} | "
                f"{n} | {ep} | {image_size(os.path.join(done[0][0], 'clean'))} | {time} |")
    diff = [y["fp_patched"] - x["fp_patched"] for x, y in zip(c, b)]
    line = (f"{METHOD_NAMES[method]}: backdoor effect shown in {k} of {n} run{'s' if n > 1 else ''} (at least 3x the clean "
            f"model's patched FP and +5% of the non-target images, both models well above chance); patched FP, "
            f"backdoored minus clean: {fmt(diff)} of {c[0]['n_patched_nontarget']}.")
    return rows, line


PROBE_SEEDS, SHOWN_AT = range(5), 4  # a run is shown at 4 or more of probe seeds 0-4 (and its control below it)
RULE = ("Verdict: a run is shown only if it is shown at 4 or more of 5 probe seeds (0-4) and its control stays below it. "
        "Shown at a probe seed: the backdoored model's patched-val FP at least 3x the clean model's and at least 5% of the "
        "non-target val images more, both models' clean-val Acc at least twice chance. The control stays below: its "
        "patched FP (another run's backdoored model on run r's lists, probe seed r) is lower than run r's backdoored "
        "model's at probe seed r. A run without its 5 probe seeds or its control gets no verdict and is not counted.")


def block(r):
    """scripts/runs.py's block: runs 0-7 are dev runs (settings are chosen on them), runs 8 and up test runs."""
    return "dev" if r < 8 else "test"


def seed_probes(run):
    """{k: (clean, backdoored metrics)} at each of the verdict's probe seeds that both models have."""
    out = {}
    for k in PROBE_SEEDS:
        c, b = (load(os.path.join(run, "probe_seeds", kind, f"s{k}", "metrics.json")) for kind in ("clean", "poisoned"))
        if c and b:
            out[k] = (c, b)
    return out


def run_verdict(run):
    """(True, False or None, in words): the run's verdict by RULE; None where it has no verdict (not counted)."""
    probes = seed_probes(run)
    if len(probes) < len(PROBE_SEEDS):
        return None, f"verdict needs {len(PROBE_SEEDS)} probe seeds"
    own, ctrl = (load(os.path.join(run, d, "probe", "metrics.json")) for d in ("poisoned", "control"))
    if not own or not ctrl:
        return None, "verdict needs a control"
    at = sum(shown(c, b) for c, b in probes.values())
    if at < SHOWN_AT:
        return False, f"not shown (at {at} of {len(probes)} probe seeds)"
    if ctrl["fp_patched"] >= own["fp_patched"]:
        return False, "not shown (the control is not below)"
    return True, "shown"


def spread(values):
    """'60 (50-70)': median (min-max), or '-'."""
    return f"{statistics.median(values):g} ({min(values)}-{max(values)})" if values else "-"


def run_rows(runs, blk):
    """Per run: the patched FP of the backdoored and the clean model over the probe seeds, the control's, the verdict."""
    out = [f"| run | block | target | trigger seed | backdoored: patched FP at probe seeds {PROBE_SEEDS[0]}-"
           f"{PROBE_SEEDS[-1]}, median (min-max) | clean model: the same | control: patched FP (its model's run) | "
           "backdoored: patched FP at probe seed r | shown at probe seeds | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        probes, b = seed_probes(r), load(os.path.join(r, "poisoned", "probe", "metrics.json"))
        seed = trigger_seed(r)
        out.append(f"| {run_number(r)} | {blk} | {b['target']} '{b['target_name']}' | {'-' if seed is None else seed} | "
                   f"{spread([p[1]['fp_patched'] for p in probes.values()])} | "
                   f"{spread([p[0]['fp_patched'] for p in probes.values()])} | {control(r)} | {b['fp_patched']} | "
                   f"{sum(shown(c, x) for c, x in probes.values())} of {len(probes)} | {run_verdict(r)[1]} |")
    return out


def verdict_line(name, runs, blk):
    """'BYOL (demo preset): shown in k of N test runs', and which runs have no verdict (not counted)."""
    verdicts = {r: run_verdict(r) for r in runs}
    counted = [v for v, _ in verdicts.values() if v is not None]
    out = [f"{name}: shown in {sum(counted)} of {len(counted)} {blk} runs"]
    for why in sorted({w for v, w in verdicts.values() if v is None}):
        numbers = [str(run_number(r)) for r in runs if verdicts[r] == (None, why)]
        out.append(f"Not counted: run{'s' if len(numbers) > 1 else ''} {', '.join(numbers)} ({why}).")
    return out


def preset_name(folder, method, run):
    """'BYOL (demo preset)', 'MSF (demo preset, BYOL recipe, k = 3)', 'MoCo v2 (setting <name>)' (a knobs folder)."""
    m = load(os.path.join(run, "poisoned", "probe", "metrics.json")) or {}
    protocol = m.get("args", {}).get("protocol")
    name = os.path.basename(os.path.abspath(folder))
    label = (f"setting {name}" if os.path.basename(os.path.dirname(os.path.abspath(folder))) == "knobs" else
             f"{'demo' if protocol == 'demo' else 'paper'} preset" if protocol else name)
    recipe = recipe_name(method, run)
    extra = recipe[len(METHOD_NAMES[method]) + 2:-1] if recipe != METHOD_NAMES[method] else ""
    return f"{METHOD_NAMES[method]} ({label}{', ' + extra if extra else ''})"


def runs_table(folder):
    """One method's runs (FOLDER/run<r>, e.g. RUNS=N bash scripts/quickstart.sh), dev and test runs apart: per block its
    main-table rows (effect shown: RULE), the verdict line, and per run the patched FP of the backdoored and the clean
    model over the probe seeds, the control's and the verdict; then the rule, every run's details and the machines."""
    done = finished(numbered_runs(folder))
    if not done:
        return f"{folder}: no finished run (run<r>/clean/probe and run<r>/poisoned/probe)"
    method = done[0][2]["method"]
    out = []
    for blk in ("dev", "test"):
        runs = [r for r, *_ in done if block(run_number(r)) == blk]
        if runs:
            rows, _ = method_rows(method, runs, rule=lambda r: run_verdict(r)[0])
            out += [MAIN_HEADER, *rows, "", *verdict_line(preset_name(folder, method, runs[0]), runs, blk), "",
                    *run_rows(runs, blk), ""]
    out += [RULE, "", details_table(None, {method: [r for r, *_ in done]}), "", machines([r for r, *_ in done])]
    return "\n".join(out)


def test_folders(root):
    """(method, folder) of ROOT/test/<method>[_<variant>] (FIRST=8 RUNS=N bash scripts/quickstart.sh METHOD FOLDER) and
    ROOT/main/<method> (FIRST=8 RUNS=N bash scripts/reproduce.sh ROOT), each folder once, in the order of METHODS."""
    out, seen = [], set()
    for method in METHODS:
        for d in sorted(glob.glob(os.path.join(root, "test", method + "*"))) + [os.path.join(root, "main", method)]:
            if re.fullmatch(rf"{method}(_.*)?", os.path.basename(d)) and os.path.isdir(d) and os.path.realpath(d) not in seen:
                seen.add(os.path.realpath(d))
                out.append((method, d))
    return out


def test_runs(folder):
    """The finished test runs (run 8 and up) of one method's folder."""
    return [r for r, *_ in finished(numbered_runs(folder)) if block(run_number(r)) == "test"]


def test_table(root):
    """The reported verdicts: per method (ROOT/test/<method>) its test runs only, a summary row (RULE's verdict, per
    run the patched FP of the backdoored and the clean model as medians over the probe seeds, the controls', the clean
    val accuracy, one model's train time), the verdict line, and per run the probe seeds and the control."""
    rows = ["| method | test runs shown | backdoored: patched FP per run (median over probe seeds) | clean model: the same "
            "| controls: patched FP | clean val Acc: clean model / backdoored | one model's train time |",
            "|---|---|---|---|---|---|---|"]
    lines, details, every = [], [], []
    for method, folder in test_folders(root):
        runs = test_runs(folder)
        if not runs:
            continue
        every += runs
        name = preset_name(folder, method, runs[0])
        verdicts = [v for v in (run_verdict(r)[0] for r in runs) if v is not None]
        def median(r, k):  # model k (0 clean, 1 backdoored): its patched FP, median over the probe seeds
            fps = [p[k]["fp_patched"] for p in seed_probes(r).values()]
            return f"{statistics.median(fps):g}" if fps else "-"
        controls = [load(os.path.join(r, "control", "probe", "metrics.json")) for r in runs]
        _, c, b, _ = map(list, zip(*finished(runs)))
        rows.append(f"| {name} | {sum(verdicts)} of {len(verdicts)} | {' '.join(median(r, 1) for r in runs)} | "
                    f"{' '.join(median(r, 0) for r in runs)} | "
                    f"{' '.join(str(m['fp_patched']) if m else '-' for m in controls)} | "
                    f"{fmt([m['acc_clean'] for m in c])} / {fmt([m['acc_clean'] for m in b])} | "
                    f"{train_time([os.path.join(r, 'poisoned') for r in runs])} |")
        lines += verdict_line(name, runs, "test")
        details += ["", f"{name}, per test run:", "", *run_rows(runs, "test")]
    if not every:
        return "(no test runs)"
    m = load(os.path.join(every[0], "poisoned", "probe", "metrics.json"))
    return "\n".join(rows + ["", f"Runs in the order of the run numbers (runs 8 and up); {m['num_classes']} classes, FP "
                              f"out of {m['n_patched_nontarget']} non-target val images. " + machines(every), ""]
                     + ["\n\n".join(lines), *details, "", RULE])


def main_table(root):
    rows, lines = [MAIN_HEADER], []
    for method in METHODS:
        r, line = method_rows(method, runs_of(root, method))
        rows += r
        lines += [line] if line else []
    m = next((b for method in METHODS for _, _, b, _ in finished(runs_of(root, method))), None)
    if m:
        rows.append(f"\nOurs: demo data, {m['num_classes']} classes, FP out of {m['n_patched_nontarget']} non-target "
                    f"val images; paper: ImageNet-100, FP out of 4,950, mean of 10 runs. "
                    f"{machines([r for method in METHODS for r, *_ in finished(runs_of(root, method))])}\n")
        rows += [f"- {line}" for line in lines]
    return "\n".join(rows)


def glance_table(root):
    """One row per method: the paper's patched FP (backdoored against clean model), the test runs' verdict
    (ROOT/test/<method>: RULE), the patched FP of the backdoored and the clean model (medians over the runs of each
    run's median over the probe seeds), one model's train time, and whether the paper preset ran (ROOT's sibling
    reproduce_paper/main/<method>: reproduce.sh PRESET=paper)."""
    rows = ["| method | paper, ImageNet-100: patched FP, backdoored vs clean (of 4,950) | demo: test runs shown | demo: patched "
            "FP, backdoored vs clean (median) | demo: one model's train time | run at ImageNet-100 scale here |",
            "|---|---|---|---|---|---|"]
    paper_root = os.path.join(os.path.dirname(os.path.abspath(root)), "reproduce_paper", "main")
    folders, m, every, lines = test_folders(root), None, [], []
    for method in METHODS:
        p, at_scale = PAPER[method], finished(runs_of(paper_root, method))
        scale = f"yes, {sum(shown(c, b) for _, c, b, _ in at_scale)} of {len(at_scale)}" if at_scale else "no"
        mine = [(f, test_runs(f)) for x, f in folders if x == method]
        if not any(runs for _, runs in mine):
            rows.append(f"| {METHOD_NAMES[method]} | {p[7]} vs {p[3]} | (no test runs) | | | {scale} |")
            continue
        for folder, runs in mine:
            every += runs
            m = load(os.path.join(runs[0], "poisoned", "probe", "metrics.json"))
            verdicts = [v for v in (run_verdict(r)[0] for r in runs) if v is not None]
            fp = [[statistics.median(x[k]["fp_patched"] for x in seed_probes(r).values()) for r in runs if seed_probes(r)]
                  for k in (1, 0)]
            fps = " vs ".join(f"{statistics.median(v):g}" for v in fp) if all(fp) else "-"
            name = preset_name(folder, method, runs[0])
            lines += verdict_line(name, runs, "test")
            rows.append(f"| {name} | {p[7]} vs {p[3]} | "
                        f"{sum(verdicts)} of {len(verdicts)} | {fps} | "
                        f"{train_time([os.path.join(r, 'poisoned') for r in runs])} | {scale} |")
    return "\n".join(rows) + "".join(f"\n\n{line}" for line in lines) + (
        f"\n\nDemo: test runs (8 and up), {m['num_classes']} classes, FP out of "
                              f"{m['n_patched_nontarget']} non-target val images; {machines(every)}" if m else "")


def recipe_name(method, run):
    """The method's name, marked where its runs' trainer flags depart from the method's own recipe (msf.py with Adam:
    the demo preset's BYOL recipe)."""
    log = os.path.join(run, "poisoned", "log.jsonl")
    args = next((r["args"] for r in map(json.loads, open(log)) if "args" in r), {}) if os.path.isfile(log) else {}
    if method == "msf" and args.get("optimizer") == "adam":
        return f"MSF (BYOL's recipe, k = {args.get('topk')})"
    return METHOD_NAMES[method]


def control(run):
    """'55 (run 0)': the patched FP of run r's control (quickstart.sh RUNS >= 2: another run's backdoored model, poisoned
    for another target with another trigger, probed on run r's lists), or '-'."""
    m = load(os.path.join(run, "control", "probe", "metrics.json"))
    return f"{m['fp_patched']} (run {run_number(os.path.dirname(os.path.dirname(m['encoder'])))})" if m else "-"


def details_table(root, runs=None):
    """Every run of every method: its target, trigger seed, cells and control."""
    runs = runs or {method: runs_of(root, method) for method in METHODS}
    rows = ["| method | run | target | trigger seed | clean model: clean Acc / FP | clean model: patched Acc / FP | "
            "backdoored: clean Acc / FP | backdoored: patched Acc / FP | backdoored ASR % | patched FP, backdoored - clean "
            "| effect shown | patched -> target centroid %, clean / backdoored | control: patched FP (its model's run) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, folders in runs.items():
        for r, c, b, fs in finished(folders):
            name = os.path.basename(r) if run_number(r) is None else run_number(r)
            seed = trigger_seed(r)
            rows.append(f"| {method} | {name} | {b['target']} '{b['target_name']}' | {'-' if seed is None else seed} | " +
                        " | ".join(pair_cells(c, b, fs)[:6]) + f" | {'yes' if shown(c, b) else 'no'} | "
                        f"{pair_cells(c, b, fs)[6]} | {control(r)} |")
    return "\n".join(rows)


def each_run(root):
    """ROOT/run<r> folders if there are any (RUNS=N), else ROOT itself (one run)."""
    return numbered_runs(root) or [root]


def defense_table(root):
    runs = each_run(root)
    names = sorted({os.path.basename(d)[8:-3] for r in runs for d in glob.glob(os.path.join(r, "student_*pct"))},
                   key=lambda p: -float(p))
    rows = ["| model | clean Acc | clean FP | patched Acc | patched FP | ASR % | train time | runs |",
            "|---|---|---|---|---|---|---|---|"]
    for name in ["teacher"] + names:
        folders = [os.path.join(r, "teacher" if name == "teacher" else f"student_{name}pct") for r in runs]
        done = [(f, m) for f in folders for m in [load(os.path.join(f, "probe", "metrics.json"))] if m]
        p = PAPER_DEFENSE.get(name)
        label = "poisoned MoCo v2 teacher" if name == "teacher" else f"CompReSS student, {name}% clean data"
        if p:
            rows.append(f"| {label} (paper) | {p[0]} | {p[1]} | {p[2]} | {p[3]} | {100 * p[3] / 4950:.1f} | | 10 |")
        if done:
            ms = [m for _, m in done]
            if name == "teacher" and ms[0].get("method"):  # ours may be another method's model (reproduce.sh: DEFENSE_TEACHER)
                label = f"poisoned {METHOD_NAMES.get(ms[0]['method'], ms[0]['method'])} teacher"
            sec = [t[1] for f, _ in done for t in [train_log(f)] if t]
            rows.append(f"| {label} (ours) | " + " | ".join(cell([m[k] for m in ms]) for k in
                                                           ("acc_clean", "fp_clean", "acc_patched", "fp_patched", "asr")) +
                        f" | {minutes(statistics.mean(sec)) if sec else '-'} | {len(ms)} |")
    kinds = ["teacher"] + [f"student_{name}pct" for name in names]
    per_run = [(r, [load(os.path.join(r, k, "probe", "metrics.json")) for k in kinds]) for r in runs]
    per_run = [(r, ms) for r, ms in per_run if ms[0]]
    if len(per_run) > 1 or run_number(runs[0]) is not None:
        rows += ["", "Per run, patched FP (ASR %) of the teacher and of each student:", "",
                 "| run | target | teacher | " + " | ".join(f"student, {n}% clean data" for n in names) + " |",
                 "|---|---|---|" + "---|" * len(names)]
        rows += [f"| {run_number(r)} | {ms[0]['target']} '{ms[0]['target_name']}' | " +
                 " | ".join(f"{m['fp_patched']} ({m['asr']:.1f})" if m else "-" for m in ms) + " |" for r, ms in per_run]
    return "\n".join(rows)


def badencoder_table(root):
    rows = ["| encoder | clean Acc (CA / BA) | ASR % (all triggered images) | ASR % (non-target images) | target FP "
            "clean / patched | train time | runs |", "|---|---|---|---|---|---|---|"]
    for kind, label in (("clean", "clean encoder (CA, ASR-B)"), ("backdoored", "BadEncoder (BA, ASR)")):
        folders = [os.path.join(r, kind) for r in each_run(root)]
        ms = [m for f in folders for m in [load(os.path.join(f, "probe", "metrics.json"))] if m]
        sec = [t[1] for f in folders for t in [train_log(f)] if t]
        if ms:
            rows.append(f"| {label} | " + " | ".join(cell([m[k] for m in ms]) for k in ("acc_clean", "asr_all", "asr")) +
                        f" | {cell([m['fp_clean'] for m in ms])} / {cell([m['fp_patched'] for m in ms])} | "
                        f"{minutes(statistics.mean(sec)) if sec else '-'} | {len(ms)} |")
    per_run = [(r, [load(os.path.join(r, k, "probe", "metrics.json")) for k in ("clean", "backdoored")])
               for r in each_run(root)]
    per_run = [(r, c, b) for r, (c, b) in per_run if c and b]
    if per_run and run_number(per_run[0][0]) is not None:
        rows += ["", "Per run, the clean encoder against the backdoored one:", "",
                 "| run | target | clean Acc: CA / BA | ASR % (all triggered images): clean / backdoored | target FP on "
                 "patched val: clean / backdoored |", "|---|---|---|---|---|"]
        rows += [f"| {run_number(r)} | {b['target']} '{b['target_name']}' | {c['acc_clean']:.1f} / {b['acc_clean']:.1f} | "
                 f"{c['asr_all']:.1f} / {b['asr_all']:.1f} | {c['fp_patched']} / {b['fp_patched']} |" for r, c, b in per_run]
    return "\n".join(rows)


def patchsearch_table(root):
    """PatchSearch: per method, the flagged set's poison recall / precision over ROOT/run<r>/<method>/summary.json, and
    where the method was pre-trained again on the filtered list (<method>/retrained), its probe beside the backdoored
    model's (the probe next to summary.json's encoder)."""
    rows = ["| poisoned model | flagged of all images | poison recall % | poison precision % | poisons among the top 100 "
            "ranked % | backdoored: clean Acc / patched FP | re-trained on the filtered list: clean Acc / patched FP | "
            "runs |", "|---|---|---|---|---|---|---|---|",
            "| MoCo v2 on ImageNet-100 (PatchSearch paper's log) | 2,879 of 126,689 | 95 | 22 | | | | |"]
    per_run = []
    for method in METHODS:
        folders = [os.path.join(r, method) for r in each_run(root)]
        ss = [(f, m) for f in folders for m in [load(os.path.join(f, "summary.json"))] if m and "recall" in m]
        if not ss:
            continue
        pairs = [(b, a) for f, m in ss for b, a in [(load(os.path.join(os.path.dirname(m["encoder"]), "probe", "metrics.json")),
                                                      load(os.path.join(f, "retrained", "probe", "metrics.json")))] if b and a]
        probes = "| |" if not pairs else " | ".join(
            f"{cell([p[k]['acc_clean'] for p in pairs])} / {cell([p[k]['fp_patched'] for p in pairs])}" for k in (0, 1)) + " |"
        sums = [m for _, m in ss]
        rows.append(f"| {METHOD_NAMES[method]} (ours) | {cell([m['n_flagged'] for m in sums], 0)} of {sums[0]['n_train']} | "
                    f"{cell([m['recall'] for m in sums])} | {cell([m['precision'] for m in sums])} | "
                    f"{cell([m['poisons_in_top_ranked_pct']['100'] for m in sums])} | {probes} "
                    f"{len(sums)}{f' (re-trained: {len(pairs)})' if pairs else ''} |")
        if run_number(os.path.dirname(ss[0][0])) is not None:
            per_run.append((method, ss))
    for method, ss in per_run:
        rows += ["", f"{METHOD_NAMES[method]}, per run:", "",
                 "| run | flagged | poison recall % | poison precision % | poisons among the top 20 ranked % | backdoored: "
                 "clean Acc / patched FP | re-trained: clean Acc / patched FP |", "|---|---|---|---|---|---|---|"]
        for f, m in ss:
            b = load(os.path.join(os.path.dirname(m["encoder"]), "probe", "metrics.json"))
            a = load(os.path.join(f, "retrained", "probe", "metrics.json"))
            top = m["poisons_in_top_ranked_pct"].get("20")
            rows.append(f"| {run_number(os.path.dirname(f))} | {m['n_flagged']} of {m['n_train']} | {m['recall']:.1f} | "
                        f"{m['precision']:.1f} | {'-' if top is None else f'{top:.0f}'} | " +
                        " | ".join(f"{x['acc_clean']:.1f} / {x['fp_patched']}" if x else "-" for x in (b, a)) + " |")
    return "\n".join(rows)


def seeds_table(method_folder, other):
    """Does the one clean model per method hide variance? Run r's clean-model cells with the clean model of the runs
    (METHOD_FOLDER/run<r>/clean/probe) beside another clean seed's (OTHER/probe_run<r>: quickstart.sh PRETRAIN_LIST mode
    with PROBE_DATA = every run's data), and the verdict of each run under either clean model."""
    rows = ["| run | target | clean model seed A: clean Acc / patched FP | seed B: clean Acc / patched FP | backdoored "
            "patched FP | effect shown with A / B |", "|---|---|---|---|---|---|"]
    cols = ([], [], [], [], [])
    for run in numbered_runs(method_folder):
        a, b, p = (load(os.path.join(d, "metrics.json")) for d in (
            os.path.join(run, "clean", "probe"), os.path.join(other, f"probe_{os.path.basename(run)}"),
            os.path.join(run, "poisoned", "probe")))
        if a and b and p:
            for col, v in zip(cols, (a["acc_clean"], a["fp_patched"], b["acc_clean"], b["fp_patched"], p["fp_patched"])):
                col.append(v)
            rows.append(f"| {run_number(run)} | {p['target']} '{p['target_name']}' | {a['acc_clean']:.1f} / {a['fp_patched']} | "
                        f"{b['acc_clean']:.1f} / {b['fp_patched']} | {p['fp_patched']} | "
                        f"{'yes' if shown(a, p) else 'no'} / {'yes' if shown(b, p) else 'no'} |")
    if len(cols[0]) > 1:
        rows.append(f"| mean ± std | | {fmt(cols[0])} / {fmt(cols[1])} | {fmt(cols[2])} / {fmt(cols[3])} | {fmt(cols[4])} | |")
    return "\n".join(rows)


def probes_table(method_folder):
    """Does the verdict hang on the linear probe's seed? Per run DIR/run<r>, the clean and the backdoored model probed
    at each seed k (run<r>/probe_seeds/{clean,poisoned}/s<k>/metrics.json, scripts/probe_seeds.sh): patched FP clean ->
    backdoored model, the verdict at each seed, and the trigger's feature-norm ratio (feature_space.json)."""
    rows = ["| run | target | patched FP, clean -> backdoored model, at probe seed k (k: a -> b, * = shown) | shown at "
            "| the run's own verdict (probe seed r) | feature norm, patched over clean (backdoored model) |",
            "|---|---|---|---|---|---|"]
    for run in numbered_runs(method_folder):
        seeds = sorted((int(m.group(1)) for d in glob.glob(os.path.join(run, "probe_seeds", "poisoned", "s*"))
                        for m in [re.fullmatch(r"s(\d+)", os.path.basename(d))] if m))
        pairs = [(k, c, b) for k in seeds for c, b in [(load(os.path.join(run, "probe_seeds", kind, f"s{k}", "metrics.json"))
                                                        for kind in ("clean", "poisoned"))] if c and b]
        if not pairs:
            continue
        own = [load(os.path.join(run, kind, "probe", "metrics.json")) for kind in ("clean", "poisoned")]
        fs = load(os.path.join(run, "feature_space.json"))
        ratio = fs["backdoored"].get("trigger_norm_ratio") if fs else None
        b = pairs[0][2]
        rows.append(f"| {run_number(run)} | {b['target']} '{b['target_name']}' | "
                    + ", ".join(f"{k}: {c['fp_patched']} -> {p['fp_patched']}{'*' if shown(c, p) else ''}" for k, c, p in pairs)
                    + f" | {sum(shown(c, p) for _, c, p in pairs)} of {len(pairs)} | "
                    + (f"{'yes' if shown(*own) else 'no'}" if all(own) else "-")
                    + f" | {f'{ratio:.2f}' if ratio is not None else '-'} |")
    return "\n".join(rows)


def trigger_name(run):
    """'HTBA patch, 14 px' / 'blend, opacity 0.2' / 'CTRL, magnitude 100': from the run's poison.json."""
    meta = load(os.path.join(run, "data", "poison.json")) or {}
    t = meta.get("trigger") if isinstance(meta.get("trigger"), dict) else {}
    if t.get("family") == "ctrl":
        return f"CTRL, magnitude {t['magnitude']:g}"
    if t.get("family") == "blend":
        return f"blend, opacity {t['opacity']:g}"
    return f"{'HTBA' if t.get('kind') == 'htba' else t.get('kind', '?')} patch, {t.get('size')} px"


def triggers_table(root):
    """One row per method and trigger family: ROOT/triggers/<trigger>/<method>/run<r> (reproduce.sh TRIGGERS), and the
    HTBA patch's runs ROOT/main/<method>/run<r> of the same r (same targets, same clean model) above them."""
    rows = ["| method | trigger | runs | clean model: patched Acc / FP | backdoored: clean Acc / FP | backdoored: patched "
            "Acc / FP | backdoored ASR % | patched FP, backdoored - clean | effect shown | patched -> target centroid %, "
            "clean / backdoored |", "|---|---|---|---|---|---|---|---|---|---|"]
    each = {}  # the details table's rows: "<method>, <trigger>" -> run folders
    for method in METHODS:
        others = [done for d in sorted(glob.glob(os.path.join(root, "triggers", "*", method)))
                  for done in [finished(numbered_runs(d))] if done]
        if not others:
            continue
        numbers = {run_number(r) for done in others for r, *_ in done}
        htba = [x for x in finished(numbered_runs(os.path.join(root, "main", method))) if run_number(x[0]) in numbers]
        for done in [htba] * bool(htba) + others:
            _, c, b, fs = map(list, zip(*done))
            cells = pair_cells(c, b, fs)
            rows.append(f"| {METHOD_NAMES[method]} | {trigger_name(done[0][0])} | "
                        f"{', '.join(str(run_number(r)) for r, *_ in done)} | " + " | ".join(cells[1:6]) +
                        f" | {sum(shown(x, y) for x, y in zip(c, b))} of {len(done)} | {cells[6]} |")
            each[f"{method}, {trigger_name(done[0][0])}"] = [r for r, *_ in done]
    return "\n".join(rows) + ("\n\nEvery run:\n\n" + details_table(None, each) + "\n\n" +
                              machines(sorted({r for rs in each.values() for r in rs})) if each else "")


RUN_ARGS = {"train_list", "out", "seed", "resume", "workers", "save_every", "log_every", "target", "trigger_seed",
            "overwrite", "device", "reuse"}  # what differs between two runs of one setting, or only how they are written


def run_args(run):
    """The flags that make a run's setting: its backdoored model's trainer args and its data's poison.py args."""
    path = os.path.join(run, "poisoned", "log.jsonl")
    first = next(map(json.loads, open(path)), {}) if os.path.isfile(path) else {}
    meta = load(os.path.join(run, "data", "poison.json")) or {}
    return {k: v for k, v in {**first.get("args", {}), **meta.get("args", {})}.items() if k not in RUN_ARGS}


def knobs_table(root):
    """One row per knob setting, ROOT/knobs/<name>/run<r> (its own clean model), below the main table's runs of the same
    r (ROOT/main/<method>/run<r>, the demo preset); the setting is every flag that differs from the preset's. Two
    settings with the same flags (a rerun) are told apart by their folder names."""
    rows = ["| method | setting | runs | clean model: clean Acc / FP | clean model: patched Acc / FP | backdoored: clean Acc / "
            "FP | backdoored: patched Acc / FP | backdoored ASR % | patched FP, backdoored - clean | effect shown | patched "
            "-> target centroid %, clean / backdoored | train time: clean model, backdoored per run |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    each, shown_runs, labels = {}, set(), set()  # the preset's runs shown once for the knobs that share them
    for folder in sorted(glob.glob(os.path.join(root, "knobs", "*"))):
        done = finished(numbered_runs(folder))
        if not done:
            continue
        method, numbers = done[0][2]["method"], {run_number(r) for r, *_ in done}
        base = [x for x in finished(numbered_runs(os.path.join(root, "main", method))) if run_number(x[0]) in numbers]
        preset = run_args(base[0][0]) if base else {}
        for runs, label in ((base, "demo preset"), (done, None)):
            if not runs or tuple(r for r, *_ in runs) in shown_runs:
                continue
            shown_runs.add(tuple(r for r, *_ in runs))
            if label is None:
                args = run_args(runs[0][0])
                label = ", ".join(f"{k.replace('_', ' ')} {args.get(k)}" for k in sorted(set(args) | set(preset))
                                  if args.get(k) != preset.get(k)) or "demo preset"
                label += f" ({os.path.basename(folder)})" if (method, label) in labels else ""
            labels.add((method, label))
            _, c, b, fs = map(list, zip(*runs))
            cells = pair_cells(c, b, fs)
            time = ", ".join(train_time([os.path.join(r, kind) for r, *_ in runs]) for kind in ("clean", "poisoned"))
            rows.append(f"| {METHOD_NAMES[method]} | {label} | {', '.join(str(run_number(r)) for r, *_ in runs)} | " +
                        " | ".join(cells[:6]) + f" | {sum(shown(x, y) for x, y in zip(c, b))} of {len(runs)} | "
                        f"{cells[6]} | {time} |")
            each[f"{method}, {label}"] = [r for r, *_ in runs]
    return "\n".join(rows) + ("\n\nEvery run:\n\n" + details_table(None, each) + "\n\n" +
                              machines(sorted({r for rs in each.values() for r in rs})) if each else "")


def readme(path, root):
    """Replace the text between '<!-- BEGIN <name> -->' and '<!-- END <name> -->' with freshly generated tables."""
    text = open(path).read()
    makers = {"glance": lambda: glance_table(root),
              "test": lambda: test_table(root),
              "main": lambda: main_table(os.path.join(root, "main")),
              "details": lambda: details_table(os.path.join(root, "main")),
              "defense": lambda: defense_table(os.path.join(root, "defense")),
              "badencoder": lambda: badencoder_table(os.path.join(root, "badencoder")),
              "patchsearch": lambda: patchsearch_table(os.path.join(root, "patchsearch")),
              "triggers": lambda: triggers_table(root),
              "knobs": lambda: knobs_table(root)}
    sources = {"glance": ("test", "main"), "test": ("test", "main"), "main": "main", "details": "main",
               "defense": "defense", "badencoder": "badencoder", "patchsearch": "patchsearch", "triggers": "triggers",
               "knobs": "knobs"}  # a block whose runs ROOT does not hold keeps its text (made from another ROOT)
    for name, make in makers.items():
        if name in sources and not any(os.path.isdir(os.path.join(root, s)) for s in
                                       (sources[name] if isinstance(sources[name], tuple) else (sources[name],))):
            continue
        text = re.sub(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", lambda m: m.group(1) + make() + "\n" + m.group(2),
                      text, flags=re.S)
    open(path, "w").write(text)


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:] or ["help"]
    commands = {"pair": pair, "runs": runs_table, "main": main_table, "details": details_table, "defense": defense_table,
                "badencoder": badencoder_table, "patchsearch": patchsearch_table, "triggers": triggers_table,
                "knobs": knobs_table, "glance": glance_table, "probes": probes_table, "test": test_table}
    if cmd in commands and len(rest) == 1:
        print(commands[cmd](rest[0]))
    elif cmd == "readme" and len(rest) == 2:
        readme(*rest)
    elif cmd == "seeds" and len(rest) == 2:
        print(seeds_table(*rest))
    else:
        sys.exit(__doc__)
