"""Shared fixtures: a tiny demo data set, random-init checkpoints, and a helper that runs a script as the shell does."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

import linear_probe  # noqa: E402
import poison  # noqa: E402

# 3 classes x 16 train / 4 val images of 32 px; evaluation crop 16 px, trigger 4 px (= round(50 * 16 / 224)).
TINY = ["--demo-classes", "3", "--demo-train-per-class", "16", "--demo-val-per-class", "4", "--demo-size", "32",
        "--val-crop", "16", "--workers", "1", "--labeled-fractions", "0.25,0.5"]


def run(script, *args, env=None, check=True):
    """Run a top-level script in a fresh interpreter; return the CompletedProcess (stdout and stderr as text)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def error_of(proc):
    """The one-line error a script printed on a bad input (and that it printed exactly one line to stderr)."""
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln]
    assert len(lines) == 1, "expected one error line, got:\n" + proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """poison.py's output folder on the tiny demo data (targeted, rate 0.5, target 1)."""
    out = tmp_path_factory.mktemp("demo") / "poison"
    poison.main(["--out", str(out), "--target", "1", "--rate", "0.5", *TINY])
    return out


def write_checkpoint(path, arch="resnet18", arch_kwargs=None, image_size=16, method="random", seed=0):
    """A randomly initialised encoder in the checkpoint format of DESIGN.md 3.3."""
    torch.manual_seed(seed)
    arch_kwargs = arch_kwargs if arch_kwargs is not None else {"small_stem": False}
    model, dim = linear_probe.build_backbone(arch, arch_kwargs)
    linear_probe.save_checkpoint(str(path), {
        "method": method, "arch": arch, "arch_kwargs": arch_kwargs, "feature_dim": dim, "image_size": image_size,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "encoder": model.state_dict(), "epoch": 0,
        "args": {}})
    return path


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt")
