"""Shared fixtures: a tiny demo data set, random-init checkpoints, and helpers that run scripts as the shell does and
check what they wrote."""
import json
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


@pytest.fixture
def one_thread():
    """One torch thread for the test (tests opt in with pytest.mark.usefixtures): tiny models gain nothing from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines()
             if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]  # tqdm lines, fast or slow
    assert len(lines) == 1, "expected one error line, got:\n" + proc.stderr[-3000:]
    return lines[0]


def read_log(folder):
    """The records of folder/log.jsonl, one dict per line."""
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def torchrun2(script, *args):
    """torchrun, 2 CPU processes of 1 thread -> (log records, checkpoint, stdout); --out holds only those two files."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cmd[cmd.index("--out") + 1]
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.jsonl"]
    return read_log(out), torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True), proc.stdout


def assert_same_state(a, b, where="state"):
    """a and b have the same keys all the way down, and every tensor (and any other value) is exactly equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    else:
        assert a == b, where


def assert_resume_is_exact(train, folder, *extra_a):
    """train(out, *args): 2 epochs in a/ (+ extra_a) == 1 then 2 --resume in b/, tensor for tensor -> (a, b)."""
    a_out, b_out = folder / "a", folder / "b"
    train(a_out, "--epochs", "2", *extra_a)
    train(b_out, "--epochs", "1")
    train(b_out, "--epochs", "2", "--resume", b_out / "checkpoint.pt")
    a, b = (torch.load(out / "checkpoint.pt", weights_only=True) for out in (a_out, b_out))
    assert a["epoch"] == b["epoch"] == 2
    assert_same_state(a["train_state"]["model"], b["train_state"]["model"], "model")
    assert_same_state(a["train_state"]["optimizer"]["state"], b["train_state"]["optimizer"]["state"], "optimizer")
    return a, b


def probe(demo, checkpoint, out, *extra):
    """linear_probe.py in this process on the demo's 50% split (1 epoch, no workers; extra flags win) -> its metrics."""
    linear_probe.main([str(a) for a in ("--encoder", checkpoint, "--train-list", demo / "train_labeled_50pct.txt",
                                        "--val-list", demo / "val_clean.txt", "--val-patched-list",
                                        demo / "val_patched.txt", "--out", out, "--epochs", 1, "--workers", 0, *extra)])
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def assert_missing_image_refused(script, demo, tmp_path, *args):
    """A train list with one image that does not exist: the script stops with one line naming the list and the problem,
    and leaves no --out folder behind."""
    lst = tmp_path / "missing.txt"
    lst.write_text(open(demo / "train_poisoned.txt").read().replace("train_poisoned/", "nowhere/", 1))
    line = error_of(run(script, "--train-list", lst, "--out", tmp_path / "missing", *args, check=False))
    assert line.startswith(f"{script}: error: ") and "missing.txt:" in line and "image not found" in line
    assert not (tmp_path / "missing").exists()  # inputs are checked before --out is made


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """poison.py's output folder on the tiny demo data (targeted, rate 0.5, target 1)."""
    out = tmp_path_factory.mktemp("demo") / "poison"
    poison.main(["--out", str(out), "--target", "1", "--rate", "0.5", *TINY])
    return out


def write_checkpoint(path, arch="resnet18", arch_kwargs=None, image_size=16, method="random", seed=0):
    """A randomly initialised encoder in the checkpoint format of docs/formats.md."""
    torch.manual_seed(seed)
    arch_kwargs = arch_kwargs if arch_kwargs is not None else {"small_stem": False}
    model, dim = linear_probe.build_backbone(arch, arch_kwargs)
    torch.save({
        "method": method, "arch": arch, "arch_kwargs": arch_kwargs, "feature_dim": dim, "image_size": image_size,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "encoder": model.state_dict(), "epoch": 0,
        "args": {}}, path)
    return path


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt")
