"""Nothing lost: a run is never overwritten unasked, outputs are written atomically, --resume checks what it resumes,
numbers are range-checked before any data is read, and every bad input is one line (docs/formats.md, "Bad input")."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import linear_probe
import moco
from conftest import error_of, read_log, run

MOCO = ["--image-size", "16", "--batch-size", "8", "--queue-size", "16", "--workers", "0", "--dim", "16"]


def moco_run(demo, out, *extra, check=True):
    return run("moco.py", "--train-list", demo / "train_poisoned.txt", "--out", out, *MOCO, *extra, check=check)


@pytest.fixture(scope="module")
def finished(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    moco_run(demo, out, "--epochs", "1")
    return out


def test_a_finished_run_is_not_overwritten(demo, finished, tmp_path):
    before = {f: open(finished / f, "rb").read() for f in ("checkpoint.pt", "log.jsonl")}
    proc = moco_run(demo, finished, "--epochs", "2", check=False)
    line = error_of(proc)
    assert proc.returncode == 1 and "holds a run (checkpoint.pt)" in line and "--resume" in line and "--overwrite" in line
    assert {f: open(finished / f, "rb").read() for f in before} == before
    copy = tmp_path / "copy"
    copy.mkdir()
    for f, data in before.items():
        (copy / f).write_bytes(data)
    moco_run(demo, copy, "--epochs", "1", "--overwrite")  # asked for: replaced, its log started afresh
    assert [r.get("epoch") for r in read_log(copy) if "epoch" in r] == [1]


def test_resume_refuses_another_model_other_flags_and_nothing_to_do(demo, finished, tmp_path):
    ckpt = finished / "checkpoint.pt"
    line = error_of(moco_run(demo, tmp_path / "r", "--epochs", "2", "--resume", ckpt, "--dim", "32", check=False))
    assert "differs from the checkpoint's: --dim 16 -> 32" in line and "--resume-changed" in line
    line = error_of(moco_run(demo, tmp_path / "r", "--epochs", "2", "--resume", ckpt, "--dim", "32", "--resume-changed",
                             check=False))
    assert "the checkpoint's model does not fit this command's" in line
    line = error_of(moco_run(demo, tmp_path / "r", "--epochs", "2", "--resume", ckpt, "--lr", "0.1", check=False))
    assert "--lr 0.06 -> 0.1" in line
    proc = moco_run(demo, tmp_path / "r", "--epochs", "1", "--resume", ckpt, check=False)
    assert proc.returncode == 1 and "at epoch 1 of --epochs 1: nothing to do" in error_of(proc)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag,value,want", [("--batch-size", "0", "> 0"), ("--batch-size", "-8", "> 0"),
                                             ("--epochs", "0", "> 0"), ("--lr", "-0.1", "> 0"), ("--lr", "nan", "> 0"),
                                             ("--save-every", "0", "> 0"), ("--m", "1.5", "in [0, 1]"),
                                             ("--weight-decay", "-1.0", ">= 0"), ("--workers", "-1", ">= 0")])
def test_numbers_out_of_range_are_one_line_before_any_data(tmp_path, flag, value, want):
    with pytest.raises(moco.InputError) as e:  # in-process: the one-line wrapper is the other tests' subject
        moco.main(["--train-list", str(tmp_path / "no_such_list.txt"), "--out", str(tmp_path / "o"), flag, value])
    assert str(e.value) == f"{flag} {value}: must be {want}" and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--lr", "-1.0"), ("--extract-batch-size", "0")])
def test_linear_probe_numbers_out_of_range(tmp_path, random_ckpt, flag, value):
    proc = run("linear_probe.py", "--encoder", random_ckpt, "--train-list", "t.txt", "--val-list", "v.txt",
               "--val-patched-list", "p.txt", "--out", tmp_path / "o", flag, value, check=False)
    assert error_of(proc).startswith(f"linear_probe.py: error: {flag} {value}: must be") and not (tmp_path / "o").exists()


def test_a_failure_between_the_temporary_file_and_the_rename_keeps_the_old_output(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    moco.save_checkpoint(path, {"epoch": 1})
    target = tmp_path / "metrics.json"
    linear_probe.write_atomic(str(target), lambda f: f.write(b"old"))

    def fail(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        moco.save_checkpoint(path, {"epoch": 2})
    with pytest.raises(OSError):
        linear_probe.write_atomic(str(target), lambda f: f.write(b"new"))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1} and target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "metrics.json"]  # no .tmp left behind


def test_log_holds_only_checkpointed_epochs(demo, tmp_path, monkeypatch):
    saves = []

    def save(path, checkpoint):  # the second save fails: epochs 2 and 3 never reach a checkpoint
        saves.append(checkpoint["epoch"])
        if len(saves) == 2:
            raise OSError(28, "No space left on device", path)
        torch.save(checkpoint, path)
    monkeypatch.setattr(moco, "save_checkpoint", save)
    with pytest.raises(OSError):
        moco.main([str(a) for a in ("--train-list", demo / "train_poisoned.txt", "--out", tmp_path / "o", *MOCO,
                                    "--epochs", "3", "--save-every", "1")])
    assert [r["epoch"] for r in read_log(tmp_path / "o") if "epoch" in r] == [1]
    assert read_log(tmp_path / "o")[0]["machine"]["cores"] == os.cpu_count()  # the machine, first


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "big.png")
    data = moco.FileList(moco.Samples([(str(tmp_path / "big.png"), 0)], "l.txt", [7]), None)
    monkeypatch.setattr(moco, "MAX_PIXELS", 1000)
    with pytest.raises(moco.InputError, match=r"l.txt:7: .*big.png is 30x40 pixels, more than the 1000 allowed"):
        data.load()
    monkeypatch.setattr(moco, "MAX_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL's own bomb error (over twice its limit) is one line too
    with pytest.raises(moco.InputError, match=r"l.txt:7: not an image: .*big.png \(Image size"):
        data.load()


def test_a_read_only_out_is_one_line(demo, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    want = f"--out {folder / 'run'}: {folder} is not writable"
    if not os.access(folder, os.W_OK):
        assert error_of(moco_run(demo, folder / "run", "--epochs", "1", check=False)) == f"moco.py: error: {want}"
    else:  # root writes anywhere: the check itself, on a folder the process may not write
        monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(folder))
        args = moco.parse_args(["--train-list", "t.txt", "--out", str(folder / "run")])
        with pytest.raises(moco.InputError, match="^" + want.replace("[", r"\[") + "$"):
            moco.check_out(args)


def test_cache_on_and_off_give_the_same_draws(tmp_path):
    """One data path: the same seed gives the same views of the first batch whether the images are held in memory
    or decoded from disk (PNG and JPEG, of different sizes)."""
    rng = np.random.default_rng(0)
    samples = []
    for i, (h, w) in enumerate([(20, 31), (48, 40), (33, 33), (24, 56)]):
        path = tmp_path / f"{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        samples.append((str(path), 0))
    views = []
    for cache in ("on", "off"):
        data = moco.FileList(samples, moco.TwoViews(*moco.aug_plus(16)), seed=5)
        data.load(cache)
        assert (data.images is not None) == (cache == "on")
        views.append(data.__getitems__([(0, 2), (0, 0), (0, 3), (0, 1)]))
    flat = lambda batch: [t for item in batch for view in item[0] for t in view]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(views[0]), flat(views[1])))
