"""Runs that survive faults: resume under torchrun (every rank's random state), on another number of processes
(a logged reseed), and after a SIGKILL in the middle of an epoch."""
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT, assert_same_state, read_log, run, torchrun2

MAE = ["--image-size", "16", "--patch-size", "4", "--width", "16", "--depth", "2", "--heads", "2", "--decoder-width",
       "16", "--decoder-depth", "1", "--decoder-heads", "2", "--batch-size", "8", "--workers", "0", "--warmup-epochs", "1"]
MOCO = ["--image-size", "16", "--batch-size", "8", "--queue-size", "16", "--workers", "0", "--dim", "16"]


def test_mae_torchrun_resume_is_exact_and_keeps_every_rank(demo, tmp_path):
    args = ["--train-list", demo / "train_poisoned.txt", *MAE]
    _, a, _ = torchrun2("mae.py", *args, "--out", tmp_path / "a", "--epochs", "2")
    torchrun2("mae.py", *args, "--out", tmp_path / "b", "--epochs", "1")
    _, b, _ = torchrun2("mae.py", *args, "--out", tmp_path / "b", "--epochs", "2", "--resume", tmp_path / "b" / "checkpoint.pt")
    assert len(a["train_state"]["rng"]) == 2  # one random state per rank
    assert_same_state(a["train_state"]["model"], b["train_state"]["model"], "model")
    assert_same_state(a["train_state"]["rng"], b["train_state"]["rng"], "rng")

    proc = run("mae.py", *args, "--out", tmp_path / "b", "--epochs", "3", "--resume", tmp_path / "b" / "checkpoint.pt")
    assert "resuming 2 process(es)' checkpoint on 1: random streams reseeded" in proc.stdout
    log = read_log(tmp_path / "b")
    assert any("rng_reseeded" in r for r in log) and log[-1]["epoch"] == 3
    assert len(torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["train_state"]["rng"]) == 1


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(demo, tmp_path):
    args = [sys.executable, os.path.join(ROOT, "moco.py"), "--train-list", str(demo / "train_poisoned.txt"), *MOCO,
            "--save-every", "1", "--epochs", "3"]
    run("moco.py", *args[2:], "--out", tmp_path / "a")
    out = tmp_path / "b"
    proc = subprocess.Popen([*args, "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:  # epoch 1 is saved (atomically)
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # somewhere in epoch 2
    proc.wait()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert saved in (1, 2)  # the last complete checkpoint, never a half-written one
    run("moco.py", *args[2:], "--out", out, "--resume", out / "checkpoint.pt")
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (tmp_path / "a", out))
    assert a["epoch"] == b["epoch"] == 3
    assert_same_state(a["train_state"]["model"], b["train_state"]["model"], "model")
    assert_same_state(a["train_state"]["optimizer"]["state"], b["train_state"]["optimizer"]["state"], "optimizer")
