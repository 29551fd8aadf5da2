"""The shell pipeline (scripts/quickstart.sh) end to end on tiny data, and the table generator on known metrics."""
import importlib.util
import json
import os
import signal
import subprocess
import time

from conftest import ROOT

spec = importlib.util.spec_from_file_location("tables", os.path.join(ROOT, "scripts", "tables.py"))
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)


def test_quickstart_runs_every_step_and_skips_finished_ones(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2",
           "POISON_EXTRA": "--demo-classes 3 --demo-train-per-class 16 --demo-val-per-class 4 --demo-size 32 "
                           "--val-crop 16 --trigger-size 4 --workers 1",
           "EXTRA": "--image-size 16 --epochs 1 --batch-size 16 --queue-size 32"}
    cmd = ["bash", os.path.join(ROOT, "scripts", "quickstart.sh"), "moco", str(tmp_path / "q")]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    for kind in ("clean", "poisoned"):
        metrics = json.load(open(tmp_path / "q" / kind / "probe" / "metrics.json"))
        assert metrics["method"] == "moco" and metrics["num_classes"] == 3 and metrics["n_patched_nontarget"] == 8
    table = open(tmp_path / "q" / "table.md").read()
    assert "| clean model | " in table and "| backdoored model | " in table and "(no metrics.json)" not in table
    poisoned = json.load(open(tmp_path / "q" / "poisoned" / "probe" / "metrics.json"))
    assert f"| {poisoned['acc_clean']:.1f} | {poisoned['fp_clean']} | {poisoned['acc_patched']:.1f} |" in table
    mtime = os.path.getmtime(tmp_path / "q" / "poisoned" / "checkpoint.pt")
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "epoch 1/1" not in again.stdout  # nothing is trained twice
    assert os.path.getmtime(tmp_path / "q" / "poisoned" / "checkpoint.pt") == mtime


def without_times(table):
    """table.md without its wall-clock columns (train time, img/s): the rest must not depend on an interruption."""
    return [ln.rsplit("|", 3)[0] if ln.startswith("| ") else ln for ln in table.splitlines()]


def test_quickstart_killed_mid_model_and_rerun_gives_the_same_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2",
           "POISON_EXTRA": "--demo-classes 2 --demo-train-per-class 8 --demo-val-per-class 4 --demo-size 32 "
                           "--val-crop 16 --trigger-size 4 --workers 1",
           "EXTRA": "--image-size 16 --epochs 2 --batch-size 8 --queue-size 16 --dim 16 --save-every 1"}
    cmd = ["bash", os.path.join(ROOT, "scripts", "quickstart.sh"), "moco"]
    whole = subprocess.run([*cmd, str(tmp_path / "a")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "b"
    proc = subprocess.Popen([*cmd, str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: the kill reaches moco.py too
    deadline = time.time() + 300
    while not (out / "clean" / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the clean model has its epoch-1 checkpoint, not yet its "done" mark
    proc.wait()
    assert not (out / "clean" / "done").exists() and not (out / "table.md").exists()
    again = subprocess.run([*cmd, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert without_times(open(out / "table.md").read()) == without_times(open(tmp_path / "a" / "table.md").read())
    for kind in ("clean", "poisoned"):
        a, b = (json.load(open(tmp_path / run / kind / "probe" / "metrics.json")) for run in ("a", "b"))
        assert {k: v for k, v in a.items() if "time" not in k and "second" not in k and k not in ("args", "encoder")} == \
            {k: v for k, v in b.items() if "time" not in k and "second" not in k and k not in ("args", "encoder")}


def test_quickstart_refuses_an_unknown_method(tmp_path):
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "quickstart.sh"), "simclr", str(tmp_path / "x")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown method 'simclr'" in proc.stderr and not os.path.exists(tmp_path / "x")


def write_run(folder, acc_clean, fp_clean, acc_patched, fp_patched, seconds=60.0, method=None):
    """A fake run folder: probe/metrics.json and a two-epoch log.jsonl."""
    os.makedirs(folder / "probe")
    metrics = {"acc_clean": acc_clean, "fp_clean": fp_clean, "acc_patched": acc_patched, "fp_patched": fp_patched,
               "asr": 100 * fp_patched / 350, "asr_all": 100 * (fp_patched + 40) / 400, "target": 0,
               "target_name": "checkerboard", "num_classes": 8, "n_patched_nontarget": 350}
    if method:
        metrics["method"] = method
    json.dump(metrics, open(folder / "probe" / "metrics.json", "w"))
    with open(folder / "log.jsonl", "w") as f:
        f.write(json.dumps({"start_epoch": 0, "args": {"image_size": 32}}) + "\n")
        for epoch in (1, 2):
            f.write(json.dumps({"epoch": epoch, "seconds": seconds / 2, "images_per_s": 100.0 * epoch}) + "\n")


def test_tables_from_known_metrics(tmp_path):
    for seed, fp in ((0, 70), (1, 140)):
        write_run(tmp_path / "main" / f"moco_seed{seed}" / "clean", 60.0, 10, 55.0, 12)
        write_run(tmp_path / "main" / f"moco_seed{seed}" / "poisoned", 58.0, 11, 40.0, fp)
    pair = tables.pair(tmp_path / "main" / "moco_seed0")
    assert "| backdoored model | 58.0 | 11 | 40.0 | 70 | 20.0 | 2 | 1.0 min | 150 |" in pair
    assert "patched-val FP 70 (backdoored) vs 12 (clean model) = 5.8x, +16.6%" in pair and "Shown (at least 3x" in pair
    clean = {"fp_patched": 12, "acc_clean": 60.0, "num_classes": 8, "n_patched_nontarget": 350}
    assert "Shown" in tables.verdict(clean, {"fp_patched": 36, "acc_clean": 60.0})  # 3x and +6.9%
    assert "NOT shown" in tables.verdict({**clean, "acc_clean": 20.0}, {"fp_patched": 36, "acc_clean": 60.0})  # chance 12.5
    assert "NOT shown" in tables.verdict(clean, {"fp_patched": 35, "acc_clean": 60.0})  # 2.9x
    assert "NOT shown" in tables.verdict({**clean, "fp_patched": 0}, {"fp_patched": 4, "acc_clean": 60.0})  # 4x, +1.1%
    assert "(paper, MoCo v2 on ImageNet-100: 20.2x, +8.9%)" in tables.verdict(clean, {"fp_patched": 36, "acc_clean": 60.0})
    byol = tables.verdict(clean, {"fp_patched": 36, "acc_clean": 60.0, "method": "byol"})  # the run's method's paper row
    assert "(paper, BYOL on ImageNet-100: 93.7x, +28.8%)" in byol  # 1442.3 vs 15.4 of 4,950
    main = tables.main_table(tmp_path / "main")
    assert "| moco | paper | 49.9 / 23.0 | 47.0 / 22.8 | 50.1 / 27.6 | 42.5 / 461.1 | 9.3 |" in main
    # two seeds: mean ± sample standard deviation (FP 70 and 140 -> 105.0 ± 49.5; ASR 20 and 40 -> 30.0 ± 14.1)
    # FP difference 58 and 128 -> 93.0 ± 49.5; both runs show the effect; each run has its own clean model here (x2)
    assert ("| moco | ours | 60.0 ± 0.0 / 10.0 ± 0.0 | 55.0 ± 0.0 / 12.0 ± 0.0 | 58.0 ± 0.0 / 11.0 ± 0.0 | "
            "40.0 ± 0.0 / 105.0 ± 49.5 | 30.0 ± 14.1 | 93.0 ± 49.5 | 2 of 2 | - | 2 | 2 | 32 | 1.0 min (x2), 1.0 min |") in main
    assert "| byol | ours | (not run) |" in main
    write_run(tmp_path / "defense" / "teacher", 58.0, 11, 40.0, 70, method="byol")
    write_run(tmp_path / "defense" / "student_5pct", 30.0, 9, 28.0, 15)
    defense = tables.defense_table(tmp_path / "defense")
    assert "| poisoned MoCo v2 teacher (paper) | 50.1 |" in defense  # the paper's teacher, and ours by its method
    assert "| poisoned BYOL teacher (ours) | 58.0 | 11 | 40.0 | 70 | 20.0 | 1.0 min |" in defense
    assert "| CompReSS student, 5% clean data (ours) | 30.0 | 9 | 28.0 | 15 | 4.3 | 1.0 min |" in defense
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- BEGIN defense -->\nold\n<!-- END defense -->\noutro\n")
    tables.readme(str(readme), str(tmp_path))
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n<!-- BEGIN defense -->\n| model |") and text.endswith("outro\n")
