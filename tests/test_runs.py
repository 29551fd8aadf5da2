"""The paper's protocol of runs: run r's target and trigger (scripts/runs.py), the tables over runs (mean ± std, "k of
N", per-run details), and RUNS=N of scripts/quickstart.sh end to end on tiny data (one clean model, runs added later)."""
import importlib.util
import json
import os
import subprocess
import sys

from conftest import ROOT


def module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


runs, tables = module("runs"), module("tables")


def test_target_and_trigger_of_a_run_depend_on_r_alone(tmp_path):
    assert [runs.trigger_seed(r) for r in range(3)] == [10, 11, 12]
    for c in (3, 8, 100):
        first = [runs.target(r, c) for r in range(c)]
        assert sorted(first) == list(range(c))  # runs 0..C-1: every class once, so two runs never share a target
        assert first != list(range(c)) and first == [runs.target(r, c) for r in range(c)]
        assert [runs.target(r, c) for r in range(c, 2 * c)] != first  # the next block: another order
    meta = tmp_path / "poison.json"
    meta.write_text(json.dumps({"classes": [f"c{i}" for i in range(8)]}))
    names = [subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "runs.py"), "target", str(r), str(meta)],
                            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": str(r)}
                            ).stdout.strip() for r in (0, 1, 0)]
    assert names[0] == names[2] == f"c{runs.target(0, 8)}" and names[1] == f"c{runs.target(1, 8)}" != names[0]
    index = [subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "runs.py"), "target", str(r), "8"],
                            capture_output=True, text=True, check=True).stdout.strip() for r in (0, 1)]
    assert [f"c{i}" for i in index] == names[:2]  # quickstart.sh's one run: run SEED's target as an index


def metrics(acc_clean, fp_clean, acc_patched, fp_patched, target=2, method="moco"):
    return {"acc_clean": acc_clean, "fp_clean": fp_clean, "acc_patched": acc_patched, "fp_patched": fp_patched,
            "asr": 100 * fp_patched / 350, "asr_all": 100 * (fp_patched + 50) / 400, "target": target,
            "target_name": f"class{target}", "num_classes": 8, "n_patched_nontarget": 350, "method": method}


def write(folder, name, obj):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        f.write(json.dumps(obj) if not isinstance(obj, str) else obj)


def log(seconds):
    return "".join(json.dumps(r) + "\n" for r in [{"args": {"image_size": 32}}, {"epoch": 1, "seconds": seconds,
                                                                                   "images_per_s": 100.0}])


def test_tables_over_runs(tmp_path):
    """Three MoCo runs sharing one clean model: patched FP clean 10, 0, 20 and backdoored 60, 10, 50."""
    method = tmp_path / "main" / "moco"
    write(method / "clean", "log.jsonl", log(120.0))
    for r, (cfp, bfp, target) in enumerate(((10, 60, 2), (0, 10, 5), (20, 50, 1))):
        run = method / f"run{r}"
        os.makedirs(run / "clean")
        os.symlink(method / "clean" / "log.jsonl", run / "clean" / "log.jsonl")
        write(run / "clean" / "probe", "metrics.json", metrics(60.0 + r, 5, 50.0, cfp, target))
        write(run / "poisoned" / "probe", "metrics.json", metrics(62.0, 6, 40.0 + r, bfp, target))
        write(run / "poisoned", "log.jsonl", log(60.0 * (r + 1)))
        write(run / "data", "poison.json", {"trigger": {"kind": "htba", "seed": 10 + r}})
        if r == 1:  # run 1's control: run 0's backdoored model on run 1's lists
            write(run / "control" / "probe", "metrics.json", {**metrics(55.0, 4, 45.0, 33, target),
                                                              "encoder": str(method / "run0" / "poisoned" / "checkpoint.pt")})
        write(run, "feature_space.json", {"clean": {"patched_to_target_centroid": 2.0 * r},
                                          "backdoored": {"patched_to_target_centroid": 40.0 + 10 * r}})
    main = tables.main_table(tmp_path / "main")
    # shown: run 0 (6x, +14.3%) and run 2 (2.5x: no) and run 1 (10x, +2.9%: no) -> 1 of 3; FP difference 50, 10, 30
    assert ("| moco | ours | 61.0 ± 1.0 / 5.0 ± 0.0 | 50.0 ± 0.0 / 10.0 ± 10.0 | 62.0 ± 0.0 / 6.0 ± 0.0 | "
            "41.0 ± 1.0 / 40.0 ± 26.5 | 11.4 ± 7.6 | 30.0 ± 20.0 | 1 of 3 | 2.0 ± 2.0 / 50.0 ± 10.0 | 3 | 1 | 32 | "
            "2.0 min, 2.0 min |") in main
    assert "| moco | paper | 49.9 / 23.0 | 47.0 / 22.8 | 50.1 / 27.6 | 42.5 / 461.1 | 9.3 | 438.3 |" in main
    assert "MoCo v2: backdoor effect shown in 1 of 3 runs" in main and "backdoored minus clean: 30.0 ± 20.0 of 350" in main
    details = tables.details_table(tmp_path / "main")
    assert "| moco | 0 | 2 'class2' | 10 | 60.0 / 5 | 50.0 / 10 | 62.0 / 6 | 40.0 / 60 | 17.1 | 50 | yes | 0.0 / 40.0 | - |" in details
    assert "| moco | 1 | 5 'class5' | 11 | 61.0 / 5 | 50.0 / 0 | 62.0 / 6 | 41.0 / 10 | 2.9 | 10 | no | 2.0 / 50.0 | 33 (run 0) |" in details
    summary = tables.runs_table(method)
    assert "| moco | ours | 61.0 ± 1.0" in summary and "| moco | 2 | 1 'class1' | 12 |" in summary

    for r, fp in enumerate((70, 10)):  # defense and BadEncoder per run
        write(tmp_path / "defense" / f"run{r}" / "teacher" / "probe", "metrics.json", metrics(58.0, 11, 40.0, fp, method="byol"))
        write(tmp_path / "defense" / f"run{r}" / "student_5pct" / "probe", "metrics.json", metrics(30.0 + r, 9, 28.0, 5 * r))
        for kind, asr in (("clean", 0), ("backdoored", 100.0 - 50 * r)):
            write(tmp_path / "badencoder" / f"run{r}" / kind / "probe", "metrics.json",
                  {**metrics(68.0, 3, 50.0, int(3.5 * asr)), "asr_all": asr, "asr": asr})
    defense = tables.defense_table(tmp_path / "defense")
    assert "| poisoned BYOL teacher (ours) | 58.0 ± 0.0 | 11.0 ± 0.0 | 40.0 ± 0.0 | 40.0 ± 42.4 | 11.4 ± 12.1 | - | 2 |" in defense
    assert "| CompReSS student, 5% clean data (ours) | 30.5 ± 0.7 | 9.0 ± 0.0 | 28.0 ± 0.0 | 2.5 ± 3.5 |" in defense
    assert "| 1 | 2 'class2' | 10 (2.9) | 5 (1.4) |" in defense  # per run: teacher, then each student
    badencoder = tables.badencoder_table(tmp_path / "badencoder")
    assert "| BadEncoder (BA, ASR) | 68.0 ± 0.0 | 75.0 ± 35.4 | 75.0 ± 35.4 | 3.0 ± 0.0 / 262.5 ± 123.7 | - | 2 |" in badencoder
    assert "| 1 | 2 'class2' | 68.0 / 68.0 | 0.0 / 50.0 | 0 / 175 |" in badencoder
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- BEGIN details -->\nold\n<!-- END details -->\nb\n"
                      "<!-- BEGIN patchsearch -->\nkept\n<!-- END patchsearch -->\n")
    tables.readme(str(readme), str(tmp_path))
    assert "old" not in readme.read_text() and "| moco | 2 | 1 'class1' | 12 |" in readme.read_text()
    assert not os.path.exists(tmp_path / "patchsearch") and "\nkept\n" in readme.read_text()  # runs of another ROOT


def test_quickstart_runs_share_one_clean_model_and_grow(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PROBE_SEEDS": "0 1",  # the verdict's seeds, two of them here
           "POISON_EXTRA": "--demo-classes 3 --demo-train-per-class 16 --demo-val-per-class 4 --demo-size 32 "
                           "--val-crop 16 --trigger-size 4 --workers 1",
           "EXTRA": "--image-size 16 --epochs 1 --batch-size 16 --queue-size 32"}
    out = tmp_path / "q"
    cmd = ["bash", os.path.join(ROOT, "scripts", "quickstart.sh"), "moco", str(out)]
    first = subprocess.run(cmd, cwd=ROOT, env={**env, "RUNS": "1"}, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not os.path.exists(out / "run0" / "control")  # one run has no other run's model to control with
    clean_mtime = os.path.getmtime(out / "clean" / "checkpoint.pt")
    wrapper = tmp_path / "python"  # logs each command's thread count: JOBS=N jobs share the cores
    wrapper.write_text(f'#!/bin/sh\necho "${{OMP_NUM_THREADS:-unset}} $1" >> {tmp_path}/threads.log\nexec python3 "$@"\n')
    wrapper.chmod(0o755)
    jobs_env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
    second = subprocess.run(cmd, cwd=ROOT, env={**jobs_env, "RUNS": "2", "JOBS": "2", "PYTHON": str(wrapper)},
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("epoch 1/1") == 1  # only run 1's backdoored model is trained
    threads = (tmp_path / "threads.log").read_text().splitlines()
    assert f"{max(1, len(os.sched_getaffinity(0)) // 2)} moco.py" in threads
    assert "unset linear_probe.py" in threads  # the probes run one at a time, on every core
    assert os.path.getmtime(out / "clean" / "checkpoint.pt") == clean_mtime
    # done records the models trained at once: the first call one at a time, the second only run 1's model to train
    assert [open(out / d / "done").read() for d in ("clean", "run0/poisoned", "run1/poisoned")] == ["jobs=1\n"] * 3
    other = subprocess.run(cmd, cwd=ROOT, env={**env, "RUNS": "2", "POISON_EXTRA": env["POISON_EXTRA"] + " --rate 0.5"},
                           capture_output=True, text=True, timeout=600)  # the same OUT/data with another poison rate
    assert other.returncode != 0 and "--rate 1.0, not 0.5" in other.stderr and "epoch" not in other.stdout
    metas = [json.load(open(out / "data" / f"run{r}" / "poison.json")) for r in (0, 1)]
    assert [m["target"]["index"] for m in metas] == [runs.target(0, 3), runs.target(1, 3)]
    assert [m["trigger"]["seed"] for m in metas] == [10, 11] and [m["seed"] for m in metas] == [0, 1]
    clean_lists = [open(out / "data" / d / "train_clean.txt").read() for d in ("clean", "run0", "run1")]
    assert clean_lists[0] == clean_lists[1] == clean_lists[2]  # relative paths: the same images in every folder
    image = clean_lists[0].split()[0]
    assert len({open(out / "data" / d / image, "rb").read() for d in ("clean", "run0", "run1")}) == 1
    for r in (0, 1):
        assert os.path.realpath(out / f"run{r}" / "clean" / "checkpoint.pt") == os.path.realpath(out / "clean" / "checkpoint.pt")
        probe = json.load(open(out / f"run{r}" / "clean" / "probe" / "metrics.json"))
        assert probe["target"] == metas[r]["target"]["index"]  # the clean model probed against run r's target
        assert os.path.isfile(out / f"run{r}" / "feature_space.png")
    for r, other in ((0, 1), (1, 0)):  # the controls: run 1's backdoored model on run 0's lists, run 0's on run 1's
        control = json.load(open(out / f"run{r}" / "control" / "probe" / "metrics.json"))
        assert control["target"] == metas[r]["target"]["index"] and control["args"]["val_patched_list"].startswith(
            str(out / "data" / f"run{r}"))
        assert os.path.realpath(control["encoder"]) == os.path.realpath(out / f"run{other}" / "poisoned" / "checkpoint.pt")
    table = open(out / "table.md").read()
    assert "| moco | ours |" in table and "| moco | 1 |" in table and "| 1 | dev |" in table
    assert "MoCo v2 (demo preset): shown in 0 of 0 dev runs" in table  # 2 probe seeds of the 5 the verdict needs
    assert "Not counted: runs 0, 1 (verdict needs 5 probe seeds)." in table
    for r in (0, 1):  # quickstart.sh probed both models at PROBE_SEEDS, without features.pt
        for kind in ("clean", "poisoned"):
            assert sorted(os.listdir(out / f"run{r}" / "probe_seeds" / kind)) == ["s0", "s1"]
            assert not os.path.exists(out / f"run{r}" / "probe_seeds" / kind / "s0" / "features.pt")
    # scripts/probe_seeds.sh: each run's two models probed again at seeds 0 and 1; run r's own probe is the one at seed r
    probes = subprocess.run(["bash", os.path.join(ROOT, "scripts", "probe_seeds.sh"), str(out), "0 1"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert probes.returncode == 0, probes.stderr[-3000:]
    for r in (0, 1):
        for kind in ("clean", "poisoned"):
            a, b = (json.load(open(p)) for p in (out / f"run{r}" / kind / "probe" / "metrics.json",
                                                 out / f"run{r}" / "probe_seeds" / kind / f"s{r}" / "metrics.json"))
            assert [a[k] for k in ("acc_clean", "fp_clean", "acc_patched", "fp_patched")] == \
                   [b[k] for k in ("acc_clean", "fp_clean", "acc_patched", "fp_patched")], (r, kind)
    assert [ln.split(" | ")[0] for ln in probes.stdout.splitlines() if ln[:3] in ("| 0", "| 1")] == ["| 0", "| 1"]
    # FIRST=8: a test run, its own data, seed and trigger, the same clean model; its control (run 9) is not trained
    test = subprocess.run(cmd, cwd=ROOT, env={**env, "FIRST": "8", "RUNS": "1"}, capture_output=True, text=True, timeout=600)
    assert test.returncode == 0, test.stderr[-3000:]
    assert test.stdout.count("epoch 1/1") == 1 and os.path.getmtime(out / "clean" / "checkpoint.pt") == clean_mtime
    meta = json.load(open(out / "data" / "run8" / "poison.json"))
    assert (meta["target"]["index"], meta["trigger"]["seed"], meta["seed"]) == (runs.target(8, 3), 18, 8)
    assert json.loads(open(out / "run8" / "poisoned" / "log.jsonl").readline())["args"]["seed"] == 8
    assert not os.path.exists(out / "run7") and not os.path.exists(out / "run8" / "control")
    table = open(out / "table.md").read()
    assert "MoCo v2 (demo preset): shown in 0 of 0 dev runs" in table and "MoCo v2 (demo preset): shown in 0 of 0 test runs" in table
    assert "Not counted: run 8 (verdict needs 5 probe seeds)." in table and "| 8 | test |" in table
    empty = subprocess.run(["bash", os.path.join(ROOT, "scripts", "probe_seeds.sh"), str(tmp_path / "none")], cwd=ROOT,
                           capture_output=True, text=True)
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1 and "none: no run<r>" in empty.stderr
    # scripts/trigger_sizes.sh: the clean model against run 0's trigger at other sides; at run 0's own side (4 px) it
    # rebuilds run 0's patched val from poison.json's flags and gives the clean model's probe of run 0
    sizes_cmd = ["bash", os.path.join(ROOT, "scripts", "trigger_sizes.sh"), str(out / "clean"), str(out / "data" / "run0"),
                 str(tmp_path / "sizes"), "4 8"]
    sizes = subprocess.run(sizes_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert sizes.returncode == 0, sizes.stderr[-3000:]
    a, b = (json.load(open(p)) for p in (out / "run0" / "clean" / "probe" / "metrics.json",
                                         tmp_path / "sizes" / "t4" / "probe" / "metrics.json"))
    assert [a[k] for k in ("acc_clean", "fp_clean", "acc_patched", "fp_patched")] == \
           [b[k] for k in ("acc_clean", "fp_clean", "acc_patched", "fp_patched")]
    assert json.load(open(tmp_path / "sizes" / "t8" / "data" / "poison.json"))["trigger"]["size"] == 8
    assert [ln.split(" | ")[0] for ln in sizes.stdout.splitlines() if ln[:3] in ("| 4", "| 8")] == ["| 4", "| 8"]
    bad = subprocess.run(sizes_cmd[:2] + [str(tmp_path / "none")] + sizes_cmd[3:], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "none/checkpoint.pt" in bad.stderr
    # PRETRAIN_LIST mode (reproduce.sh's PatchSearch re-training): one model on a given list, probed per data folder
    lone = tmp_path / "lone"
    third = subprocess.run(cmd[:-1] + [str(lone)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**env, "PRETRAIN_LIST": str(out / "data" / "run1" / "train_clean.txt"),
                                "PROBE_DATA": f"{out / 'data' / 'run0'} {out / 'data' / 'run1'}", "SEED": "3"})
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads(open(lone / "log.jsonl").readline())["args"]["seed"] == 3
    for r in (0, 1):
        assert json.load(open(lone / f"probe_run{r}" / "metrics.json"))["target"] == metas[r]["target"]["index"]
    assert not os.path.exists(lone / "probe") and not os.path.exists(lone / "table.md")


def test_patchsearch_table_over_runs(tmp_path):
    for r, (recall, precision) in enumerate(((50.0, 10.0), (70.0, 30.0))):
        folder, model = tmp_path / f"run{r}" / "byol", tmp_path / "main" / f"run{r}" / "poisoned"
        os.makedirs(folder)
        os.makedirs(model / "probe")
        (model / "probe" / "metrics.json").write_text(json.dumps({"acc_clean": 60.0 + r, "fp_patched": 80 + 20 * r}))
        (folder / "summary.json").write_text(json.dumps({"n_flagged": 100 + 100 * r, "n_train": 2400, "recall": recall,
                                                         "precision": precision, "encoder": str(model / "checkpoint.pt"),
                                                         "poisons_in_top_ranked_pct": {"100": 60.0}}))
    row = [ln for ln in tables.patchsearch_table(str(tmp_path)).splitlines()
           if ln.startswith("| BYOL")]
    assert row == ["| BYOL (ours) | 150 ± 71 of 2400 | 60.0 ± 14.1 | 20.0 ± 14.1 | 60.0 ± 0.0 | | | 2 |"]
    # run 0 re-trained on its filtered list: only that run's pair of probes, backdoored beside re-trained
    os.makedirs(tmp_path / "run0" / "byol" / "retrained" / "probe")
    (tmp_path / "run0" / "byol" / "retrained" / "probe" / "metrics.json").write_text(
        json.dumps({"acc_clean": 65.0, "fp_patched": 12}))
    row = [ln for ln in tables.patchsearch_table(str(tmp_path)).splitlines() if ln.startswith("| BYOL")]
    assert row == ["| BYOL (ours) | 150 ± 71 of 2400 | 60.0 ± 14.1 | 20.0 ± 14.1 | 60.0 ± 0.0 | 60.0 / 80 | 65.0 / 12 | "
                   "2 (re-trained: 1) |"]
    per_run = tables.patchsearch_table(str(tmp_path)).split("BYOL, per run:")[1]
    assert "| 0 | 100 of 2400 | 50.0 | 10.0 | - | 60.0 / 80 | 65.0 / 12 |" in per_run
    assert "| 1 | 200 of 2400 | 70.0 | 30.0 | - | 61.0 / 100 | - |" in per_run


def test_seeds_table_puts_a_second_clean_seed_beside_the_first(tmp_path):
    def write(path, acc, fp):
        os.makedirs(path)
        (path / "metrics.json").write_text(json.dumps({"acc_clean": acc, "fp_patched": fp, "n_patched_nontarget": 350,
                                                       "num_classes": 8, "target": 2, "target_name": "rings"}))
    other = tmp_path / "seed1"
    for r, (a, b, p) in enumerate((((60.0, 10), (55.0, 40), (62.0, 60)), ((64.0, 0), (57.0, 2), (66.0, 30)))):
        write(tmp_path / "moco" / f"run{r}" / "clean" / "probe", *a)
        write(tmp_path / "moco" / f"run{r}" / "poisoned" / "probe", *p)
        write(other / f"probe_run{r}", *b)
    rows = tables.seeds_table(str(tmp_path / "moco"), str(other)).splitlines()[2:]
    assert rows == ["| 0 | 2 'rings' | 60.0 / 10 | 55.0 / 40 | 60 | yes / no |",  # 60 vs 40 is only 1.5x
                    "| 1 | 2 'rings' | 64.0 / 0 | 57.0 / 2 | 30 | yes / yes |",
                    "| mean ± std | | 62.0 ± 2.8 / 5.0 ± 7.1 | 56.0 ± 1.4 / 21.0 ± 26.9 | 45.0 ± 21.2 | |"]


def test_probes_table_gives_each_runs_verdict_at_each_probe_seed(tmp_path):
    def write(path, fp, target=2):
        os.makedirs(path)
        (path / "metrics.json").write_text(json.dumps({"acc_clean": 60.0, "fp_patched": fp, "n_patched_nontarget": 350,
                                                       "num_classes": 8, "target": target, "target_name": "rings"}))
    run = tmp_path / "byol" / "run1"
    for k, (c, b) in enumerate(((10, 60), (20, 50), (0, 30))):  # shown: 6x +14%; 2.5x; 30x +8.6%
        write(run / "probe_seeds" / "clean" / f"s{k}", c)
        write(run / "probe_seeds" / "poisoned" / f"s{k}", b)
    write(run / "clean" / "probe", 20)
    write(run / "poisoned" / "probe", 50)
    (run / "feature_space.json").write_text(json.dumps({"backdoored": {"trigger_norm_ratio": 2.704}}))
    rows = tables.probes_table(str(tmp_path / "byol")).splitlines()[2:]
    assert rows == ["| 1 | 2 'rings' | 0: 10 -> 60*, 1: 20 -> 50, 2: 0 -> 30* | 2 of 3 | no | 2.70 |"]


def test_triggers_table_puts_each_trigger_beside_the_htba_runs_of_the_same_r(tmp_path):
    """HTBA runs 0-2, blend runs 0-1, CTRL run 0 and a 7 px HTBA run 1 of BYOL: the HTBA row keeps only runs 0 and 1 (those
    another trigger has), and the two HTBA sizes stay apart."""
    triggers = {"main": {"kind": "htba", "family": "patch", "size": 14},
                "triggers/blend": {"kind": "blend", "family": "blend", "opacity": 0.2},
                "triggers/ctrl": {"kind": "ctrl", "family": "ctrl", "magnitude": 100.0},
                "triggers/htba_7px": {"kind": "htba", "family": "patch", "size": 7}}
    fps = {"main": [(10, 60), (0, 5), (20, 200)], "triggers/blend": [(10, 110), (0, 40)], "triggers/ctrl": [(10, 12)],
           "triggers/htba_7px": [None, (4, 40)]}
    for folder, pairs in fps.items():
        for r, (cfp, bfp) in ((r, p) for r, p in enumerate(pairs) if p):
            run = tmp_path / folder / "byol" / f"run{r}"
            write(run / "clean" / "probe", "metrics.json", metrics(60.0, 5, 50.0, cfp, method="byol"))
            write(run / "poisoned" / "probe", "metrics.json", metrics(62.0, 6, 40.0 + r, bfp, method="byol"))
            write(run / "data", "poison.json", {"trigger": triggers[folder]})
    table, details = tables.triggers_table(str(tmp_path)).split("\n\nEvery run:\n\n")
    rows = table.splitlines()[2:]
    assert rows == [  # run 0 of HTBA: 6x, +14.3%: shown; run 1: 5 vs 0 is +1.4% only; blend: 11x and 40x, +28.6, +11.4
        "| BYOL | HTBA patch, 14 px | 0, 1 | 50.0 ± 0.0 / 5.0 ± 7.1 | 62.0 ± 0.0 / 6.0 ± 0.0 | 40.5 ± 0.7 / 32.5 ± 38.9 | "
        "9.3 ± 11.1 | 27.5 ± 31.8 | 1 of 2 | - |",
        "| BYOL | blend, opacity 0.2 | 0, 1 | 50.0 ± 0.0 / 5.0 ± 7.1 | 62.0 ± 0.0 / 6.0 ± 0.0 | 40.5 ± 0.7 / 75.0 ± 49.5 | "
        "21.4 ± 14.1 | 70.0 ± 42.4 | 2 of 2 | - |",
        "| BYOL | CTRL, magnitude 100 | 0 | 50.0 / 10 | 62.0 / 6 | 40.0 / 12 | 3.4 | 2 | 0 of 1 | - |",
        "| BYOL | HTBA patch, 7 px | 1 | 50.0 / 4 | 62.0 / 6 | 41.0 / 40 | 11.4 | 36 | 1 of 1 | - |"]  # 10x, +10.3%
    details, footer = details.split("\n\n")
    assert footer == "Machines (trainers' log.jsonl): unknown: 6 runs."  # no log.jsonl: no machine record
    assert [r.split(" | ")[:2] for r in details.splitlines()[2:]] == [
        ["| byol, HTBA patch, 14 px", "0"], ["| byol, HTBA patch, 14 px", "1"], ["| byol, blend, opacity 0.2", "0"],
        ["| byol, blend, opacity 0.2", "1"], ["| byol, CTRL, magnitude 100", "0"], ["| byol, HTBA patch, 7 px", "1"]]
    readme = tmp_path / "README.md"
    readme.write_text("<!-- BEGIN triggers -->\nold\n<!-- END triggers -->\n")
    tables.readme(str(readme), str(tmp_path))
    assert "| BYOL | CTRL, magnitude 100 | 0 |" in readme.read_text() and "old" not in readme.read_text()


def test_another_trigger_family_reuses_the_clean_model(tmp_path):
    """reproduce.sh TRIGGERS: run r of --trigger blend in its own data folder, with table 1's clean model linked in (the
    clean lists are the same images), is probed against that run's target; the clean model is not trained again."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "RUNS": "1", "PROBE_SEEDS": "0",
           "POISON_EXTRA": "--demo-classes 3 --demo-train-per-class 16 --demo-val-per-class 4 --demo-size 32 "
                           "--val-crop 16 --trigger-size 4 --workers 1",
           "EXTRA": "--image-size 16 --epochs 1 --batch-size 16 --queue-size 32"}
    cmd = ["bash", os.path.join(ROOT, "scripts", "quickstart.sh"), "moco"]
    first = subprocess.run(cmd + [str(tmp_path / "main" / "moco")], cwd=ROOT, env={**env, "DATA_DIR": str(tmp_path / "data")},
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    out, clean = tmp_path / "triggers" / "blend" / "moco", tmp_path / "main" / "moco" / "clean"
    os.makedirs(out / "clean")
    for f in ("checkpoint.pt", "log.jsonl", "done"):
        os.symlink(clean / f, out / "clean" / f)
    mtime = os.path.getmtime(clean / "checkpoint.pt")
    second = subprocess.run(cmd + [str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**env, "DATA_DIR": str(tmp_path / "triggers" / "blend" / "data"),
                                 "POISON_EXTRA": env["POISON_EXTRA"] + " --trigger blend"})
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("epoch 1/1") == 1 and os.path.getmtime(clean / "checkpoint.pt") == mtime
    lists = [open(tmp_path / d / "clean" / "train_clean.txt").read() for d in ("data", "triggers/blend/data")]
    image = lists[0].split()[0]
    assert lists[0] == lists[1] and open(tmp_path / "data" / "clean" / image, "rb").read() == open(
        tmp_path / "triggers" / "blend" / "data" / "clean" / image, "rb").read()
    meta = json.load(open(tmp_path / "triggers" / "blend" / "data" / "run0" / "poison.json"))
    assert meta["trigger"]["family"] == "blend" and meta["target"]["index"] == runs.target(0, 3)
    probe = json.load(open(out / "run0" / "clean" / "probe" / "metrics.json"))
    assert probe["target"] == meta["target"]["index"] and "blend" in probe["args"]["val_patched_list"]
    rows = tables.triggers_table(str(tmp_path)).split("\n\n")[0].splitlines()[2:]
    assert [r.split(" | ")[1:3] for r in rows] == [["HTBA patch, 4 px", "0"], ["blend, opacity 0.2", "0"]]


def test_another_trigger_family_without_the_clean_model_is_one_clear_line(tmp_path):
    """reproduce.sh TRIGGERS refuses, before training anything, when table 1's clean model of the method is missing."""
    root = tmp_path / "root"
    for entry, folder in (("blend", "blend"), ("htba:7", "htba_7px")):  # FAMILY:SIZE has a folder of its own
        env = {**os.environ, "METHODS": " ", "RUNS": "1", "TRIGGERS": entry, "TRIGGER_METHODS": "moco"}
        got = subprocess.run(["bash", os.path.join(ROOT, "scripts", "reproduce.sh"), str(root)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
        assert got.returncode == 2 and got.stdout == ""
        assert got.stderr.strip() == (f"reproduce.sh: TRIGGERS {entry} ({root}/triggers/{folder}/moco) needs "
                                      f"{root}/main/moco/clean (METHODS=moco)")
        assert not (root / "triggers").exists()


def test_knobs_table_puts_each_setting_below_the_presets_runs_of_the_same_r(tmp_path):
    """MoCo runs 0-2 at the preset (20 epochs), knob folders with runs 0-1 at 40 epochs and at 60 epochs with a queue of
    256, with their own clean models: the preset's row keeps runs 0 and 1 and comes once, each knob's row is labelled by
    every flag that differs (in words: queue_size -> 'queue size'), not by how poison.py wrote its data (--reuse)."""
    def trainer_log(epochs, seconds):
        return "".join(json.dumps(r) + "\n" for r in [
            {"args": {"image_size": 32, "epochs": epochs, "queue_size": 256 if epochs == 60 else 128, "out": "x", "seed": 0}},
            {"epoch": epochs, "seconds": seconds, "images_per_s": 90.0}])

    for folder, epochs, pairs in (("main/moco", 20, [(10, 60), (0, 5), (20, 200)]), ("knobs/moco_e40", 40, [(4, 8), (2, 90)]),
                                  ("knobs/moco_e60", 60, [(4, 8), (2, 90)])):
        write(tmp_path / folder / "clean", "log.jsonl", trainer_log(epochs, 600.0 * epochs / 20))
        for r, (cfp, bfp) in enumerate(pairs):
            run = tmp_path / folder / f"run{r}"
            os.makedirs(run / "clean", exist_ok=True)
            os.symlink(tmp_path / folder / "clean" / "log.jsonl", run / "clean" / "log.jsonl")
            write(run / "clean" / "probe", "metrics.json", metrics(60.0, 5, 50.0, cfp))
            write(run / "poisoned" / "probe", "metrics.json", metrics(62.0, 6, 40.0 + r, bfp))
            write(run / "poisoned", "log.jsonl", trainer_log(epochs, 300.0 * (r + 1) * epochs / 20))
            write(run / "data", "poison.json", {"args": {"rate": 1.0, "target": r, "trigger_seed": 10 + r, "out": "y",
                                                         "reuse": folder != "main/moco"},  # not a setting
                                                "trigger": {"kind": "htba", "seed": 10 + r}})
    table, details = tables.knobs_table(str(tmp_path)).split("\n\nEvery run:\n\n")
    assert table.splitlines()[2:] == [  # preset: 6x, +14.3% (shown), then 5 vs 0 (+1.4%); knob: 2x, then 45x, +25.1%
        "| MoCo v2 | demo preset | 0, 1 | 60.0 ± 0.0 / 5.0 ± 0.0 | 50.0 ± 0.0 / 5.0 ± 7.1 | 62.0 ± 0.0 / 6.0 ± 0.0 | "
        "40.5 ± 0.7 / 32.5 ± 38.9 | 9.3 ± 11.1 | 27.5 ± 31.8 | 1 of 2 | - | 10.0 min, 7.5 min |",
        "| MoCo v2 | epochs 40 | 0, 1 | 60.0 ± 0.0 / 5.0 ± 0.0 | 50.0 ± 0.0 / 3.0 ± 1.4 | 62.0 ± 0.0 / 6.0 ± 0.0 | "
        "40.5 ± 0.7 / 49.0 ± 58.0 | 14.0 ± 16.6 | 46.0 ± 59.4 | 1 of 2 | - | 20.0 min, 15.0 min |",
        "| MoCo v2 | epochs 60, queue size 256 | 0, 1 | 60.0 ± 0.0 / 5.0 ± 0.0 | 50.0 ± 0.0 / 3.0 ± 1.4 | 62.0 ± 0.0 / 6.0 ± 0.0 | "
        "40.5 ± 0.7 / 49.0 ± 58.0 | 14.0 ± 16.6 | 46.0 ± 59.4 | 1 of 2 | - | 30.0 min, 22.5 min |"]  # the preset once
    details, footer = details.split("\n\n")
    assert footer == "Machines (trainers' log.jsonl): unknown: 6 runs."  # their logs have no machine record
    assert [r.split(" | ")[:2] for r in details.splitlines()[2:]] == [
        ["| moco, demo preset", "0"], ["| moco, demo preset", "1"], ["| moco, epochs 40", "0"], ["| moco, epochs 40", "1"],
        ["| moco, epochs 60, queue size 256", "0"], ["| moco, epochs 60, queue size 256", "1"]]
    readme = tmp_path / "README.md"
    readme.write_text("<!-- BEGIN knobs -->\nold\n<!-- END knobs -->\n")
    tables.readme(str(readme), str(tmp_path))
    assert "| MoCo v2 | epochs 40 | 0, 1 |" in readme.read_text() and "old" not in readme.read_text()


def test_dev_and_test_blocks_and_each_runs_control():
    assert [runs.block(r) for r in range(16)] == ["dev"] * 8 + ["test"] * 8
    assert [tables.block(r) for r in range(16)] == [runs.block(r) for r in range(16)]  # tables.py's copy agrees
    assert [runs.control(r) for r in (0, 1, 7, 8, 9, 15)] == [1, 0, 6, 9, 8, 14]  # within the block: 8 never uses 7
    script = os.path.join(ROOT, "scripts", "runs.py")
    got = [subprocess.run([sys.executable, script, "block", b], capture_output=True, text=True, check=True).stdout
           for b in ("dev", "test", "8", "7")]
    assert got == ["0 1 2 3 4 5 6 7\n", "8 9 10 11 12 13 14 15\n", "test\n", "dev\n"]
    assert [runs.target(r, 8) for r in range(8, 16)] != [runs.target(r, 8) for r in range(8)]  # another order, and
    assert sorted(runs.target(r, 8) for r in range(8, 16)) == list(range(8))  # every demo class once in the test runs


def probed_run(run, clean_fps, backdoored_fps, own=(10, 60), control_fp=None, target=2):
    """A run folder with its two probes at probe seed r (own), at each seed k of the lists, and a control."""
    for kind, fp in zip(("clean", "poisoned"), own):
        write(run / kind / "probe", "metrics.json", {**metrics(60.0, 5, 50.0, fp, target, "byol"), "args": {"protocol": "demo"}})
    for k, (c, b) in enumerate(zip(clean_fps, backdoored_fps)):
        write(run / "probe_seeds" / "clean" / f"s{k}", "metrics.json", metrics(60.0, 5, 50.0, c, target, "byol"))
        write(run / "probe_seeds" / "poisoned" / f"s{k}", "metrics.json", metrics(60.0, 5, 50.0, b, target, "byol"))
    if control_fp is not None:
        write(run / "control" / "probe", "metrics.json", {**metrics(60.0, 5, 50.0, control_fp, target, "byol"),
                                                          "encoder": str(run.parent / "run9" / "poisoned" / "checkpoint.pt")})


def test_verdict_needs_four_of_five_probe_seeds_and_a_control_below(tmp_path):
    """Shown at a probe seed: 3x the clean model's patched FP and +5% of 350 (18 images); a run: at 4 of 5 seeds, its
    control below its own backdoored FP (60 at probe seed r). Runs 8-12 are test runs, run 3 a dev run."""
    method = tmp_path / "byol"
    four = ([10, 10, 10, 10, 30], [60, 70, 50, 40, 60])  # seed 4: 2x only -> 4 of 5
    probed_run(method / "run3", *four, control_fp=5)
    probed_run(method / "run8", *four, control_fp=20)
    probed_run(method / "run9", [10, 10, 30, 30, 10], [60, 70, 50, 40, 60], control_fp=20)  # 3 of 5
    probed_run(method / "run10", [10] * 5, [60] * 5, control_fp=60)  # 5 of 5, the control as high as the run
    probed_run(method / "run11", [10] * 4, [60] * 4, control_fp=20)  # seed 4 missing
    probed_run(method / "run12", [10] * 5, [60] * 5)  # no control
    assert [tables.run_verdict(method / f"run{r}") for r in (8, 9, 10, 11, 12)] == [
        (True, "shown"), (False, "not shown (at 3 of 5 probe seeds)"), (False, "not shown (the control is not below)"),
        (None, "verdict needs 5 probe seeds"), (None, "verdict needs a control")]
    table = tables.runs_table(str(method))
    lines = table.splitlines()
    assert "BYOL (demo preset): shown in 1 of 1 dev runs" in lines
    assert "BYOL (demo preset): shown in 1 of 3 test runs" in lines  # run 3 is not counted with the test runs
    assert "Not counted: run 11 (verdict needs 5 probe seeds)." in lines and "Not counted: run 12 (verdict needs a control)." in lines
    assert "| 8 | test | 2 'class2' | - | 60 (40-70) | 10 (10-30) | 20 (run 9) | 60 | 4 of 5 | shown |" in lines
    assert "| 11 | test | 2 'class2' | - | 60 (60-60) | 10 (10-10) | 20 (run 9) | 60 | 4 of 4 | verdict needs 5 probe seeds |" in lines
    assert "| 3 | dev | 2 'class2' | - | 60 (40-70) | 10 (10-30) | 5 (run 9) | 60 | 4 of 5 | shown |" in lines
    ours = [ln for ln in lines if ln.startswith("| byol | ours |")]
    assert [ln.split(" | ")[8] for ln in ours] == ["1 of 1", "1 of 3 (+2 without a verdict)"]  # dev, then test
    rule = "a run is shown only if it is shown at 4 or more of 5 probe seeds{} and its control stays below it"
    assert tables.RULE in lines and rule.format(" (0-4)") in tables.RULE  # the footnote, and the docstring:
    assert rule.format("") in " ".join(tables.__doc__.split())


def machine_log(seconds, cpu=None):
    first = {"start_epoch": 0, "args": {"image_size": 32}}
    if cpu:
        first["machine"] = {"cpu": cpu, "cores": 7, "threads": 1, "gpu": None, "torch": "2.3.0", "python": "3.11.2"}
    return json.dumps(first) + "\n" + json.dumps({"epoch": 1, "seconds": seconds, "images_per_s": 100.0}) + "\n"


def test_tables_name_the_machines_of_their_runs_and_the_load(tmp_path):
    """The machine footer comes from the runs' log.jsonl ("unknown" without a machine record), not from the machine
    that runs tables.py; the time column states how many models were trained at once (the done file's jobs=<n>)."""
    method = tmp_path / "main" / "byol"
    write(method / "clean", "log.jsonl", machine_log(120.0, "Xeon A"))
    write(method / "clean", "done", "jobs=2\n")
    for r, cpu in enumerate(("Xeon A", "Xeon A", None)):
        run = method / f"run{r}"
        os.makedirs(run / "clean")
        os.symlink(method / "clean" / "log.jsonl", run / "clean" / "log.jsonl")
        write(run / "clean" / "probe", "metrics.json", metrics(60.0, 5, 50.0, 10, method="byol"))
        write(run / "poisoned" / "probe", "metrics.json", metrics(62.0, 6, 40.0, 60, method="byol"))
        write(run / "poisoned", "log.jsonl", machine_log(60.0 * (r + 1), cpu))
        write(run / "poisoned", "done", "jobs=2\n" if r < 2 else "")  # run 2: a done file that names no load
    footer = "Machines (trainers' log.jsonl): Xeon A, 7 cores, 1 thread per model, no GPU, torch 2.3.0, Python 3.11.2: 3 runs; unknown: 1 run."
    table = tables.runs_table(str(method))
    assert table.splitlines()[-1] == footer  # run 2's backdoored model has no record, its clean model has
    assert "| 1 | 32 | 2.0 min (2 at once), 3.0 min, 1.5 min (2 at once) |" in table  # clean; run 2; runs 0 and 1
    main = tables.main_table(str(tmp_path / "main"))
    assert footer in main and f"{os.cpu_count()} cores" not in main  # not the machine that runs tables.py
    pair = tables.pair(str(method / "run0"))
    assert pair.splitlines()[-1] == footer.replace("3 runs; unknown: 1 run.", "1 run.")
    assert "| backdoored model | 62.0 | 6 | 40.0 | 60 | 17.1 | 1 | 1.0 min (2 at once) | 100 |" in pair


def test_quickstart_refuses_bad_settings_in_one_line_before_any_work(tmp_path):
    script = os.path.join(ROOT, "scripts", "quickstart.sh")
    for bad in ({"RUNS": "abc"}, {"RUNS": "0"}, {"RUNS": "-3"}, {"RUNS": "2", "FIRST": "x"}, {"RUNS": "2", "FIRST": "-1"},
                {"JOBS": "0"}, {"JOBS": "two"}, {"DATA_ROOT": str(tmp_path / "no such folder")}):
        out = tmp_path / "out"
        got = subprocess.run(["bash", script, "byol", str(out)], cwd=ROOT, env={**os.environ, **bad},
                             capture_output=True, text=True, timeout=60)
        assert got.returncode == 2 and got.stdout == "" and got.stderr.count("\n") == 1, (bad, got.stderr)
        assert got.stderr.startswith("quickstart.sh: " + next(iter(bad if len(bad) == 1 else {"FIRST": 0})))
        assert not out.exists()
    # a DATA_ROOT with a space reaches poison.py as one argument (the wrapper stops there: nothing is trained)
    root = tmp_path / "my photos"
    os.makedirs(root)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = poison.py ]; then printf "%s\\n" "$@" > {tmp_path}/args; exit 3; fi\n'
                       'exec python3 "$@"\n')
    wrapper.chmod(0o755)
    got = subprocess.run(["bash", script, "byol", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "DATA_ROOT": str(root), "PYTHON": str(wrapper), "JOBS": "1"}, timeout=60)
    args = (tmp_path / "args").read_text().splitlines()
    assert got.returncode == 3 and args[args.index("--data-root") + 1] == str(root)


def test_glance_marks_msf_run_with_byols_recipe(tmp_path):
    run = tmp_path / "run0"
    (run / "poisoned").mkdir(parents=True)
    (run / "poisoned" / "log.jsonl").write_text(json.dumps({"args": {"optimizer": "adam", "topk": 3}}) + "\n")
    assert tables.recipe_name("msf", str(run)) == "MSF (BYOL's recipe, k = 3)"
    (run / "poisoned" / "log.jsonl").write_text(json.dumps({"args": {"optimizer": "sgd", "topk": 5}}) + "\n")
    assert tables.recipe_name("msf", str(run)) == "MSF" and tables.recipe_name("byol", str(run)) == "BYOL"
