"""poison.py: trigger placement, poison counts and semantics, list formats, seeding, relocation, bad input."""
import filecmp
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import linear_probe
import poison
from conftest import TINY, error_of, run


def lines(path):
    return [ln.split() for ln in open(path).read().splitlines() if ln.strip()]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def find_trigger(img, trigger):
    """Every top-left corner where the image holds the trigger exactly."""
    s = trigger.shape[0]
    return [(x, y) for y in range(img.shape[0] - s + 1) for x in range(img.shape[1] - s + 1)
            if np.array_equal(img[y:y + s, x:x + s], trigger)]


def test_trigger_pixels_exact_and_only_there(demo):
    trigger = pixels(demo / "trigger.png")
    s = trigger.shape[0]
    assert s == 4  # round(50 * 16 / 224)
    clean, pois = lines(demo / "train_clean.txt"), lines(demo / "train_poisoned.txt")
    changed = [(c, p) for c, p in zip(clean, pois) if c != p]
    assert changed
    for c, p in changed:
        a, b = pixels(demo / c[0]), pixels(demo / p[0])
        spots = find_trigger(b, trigger)
        assert len(spots) >= 1
        x, y = spots[0]
        inside = np.zeros(a.shape[:2], bool)
        inside[y:y + s, x:x + s] = True
        assert np.array_equal(a[~inside], b[~inside])  # nothing changes outside the box
        assert 8 <= x <= 20 and 8 <= y <= 20  # central region [0.25 W, 0.75 W - s] of a 32 px image


def test_patched_val_is_center_crop_plus_trigger(demo):
    trigger = pixels(demo / "trigger.png")
    s = trigger.shape[0]
    for c, p in zip(lines(demo / "val_clean.txt"), lines(demo / "val_patched.txt")):
        assert c[1] == p[1] and os.path.basename(c[0]) == os.path.basename(p[0])  # same order, same labels
        crop = np.asarray(poison.center_crop(Image.open(demo / c[0]).convert("RGB"), 18, 16)).astype(int)
        b = pixels(demo / p[0])
        assert b.shape == (16, 16, 3)
        x, y = find_trigger(b, trigger)[0]
        assert 1 <= x <= 10 and 1 <= y <= 10  # [int(0.1 * 16), int(0.9 * 16 - 4)]
        mask = np.ones((16, 16), bool)
        mask[y:y + s, x:x + s] = False
        assert np.array_equal(crop[mask], b[mask])


def test_poison_counts_and_only_target_lines_change(demo):
    clean, pois = lines(demo / "train_clean.txt"), lines(demo / "train_poisoned.txt")
    assert len(clean) == len(pois) == 48
    assert [c[1] for c in clean] == [p[1] for p in pois]
    changed = [c for c, p in zip(clean, pois) if c != p]
    assert len(changed) == 8  # floor(0.5 * 16)
    assert {c[1] for c in changed} == {"1"}
    meta = json.load(open(demo / "poison.json"))
    assert meta["counts"]["poisoned"] == 8 and meta["target"] == {"index": 1, "name": meta["classes"][1]}
    assert meta["classes"] == sorted(meta["classes"])


def test_rate_floor_and_untargeted(tmp_path):
    poison.main(["--out", str(tmp_path / "a"), "--rate", "0.3", *TINY])  # floor(0.3 * 16) = 4
    pairs = zip(lines(tmp_path / "a/train_clean.txt"), lines(tmp_path / "a/train_poisoned.txt"))
    assert sum(c != p for c, p in pairs) == 4
    poison.main(["--out", str(tmp_path / "b"), "--rate", "0.25", "--mode", "untargeted", *TINY])  # floor(0.25 * 48)
    changed = [c for c, p in zip(lines(tmp_path / "b/train_clean.txt"), lines(tmp_path / "b/train_poisoned.txt")) if c != p]
    assert len(changed) == 12 and len({c[1] for c in changed}) > 1


def test_labeled_subsets_per_class_and_nested(demo):
    small, large = lines(demo / "train_labeled_25pct.txt"), lines(demo / "train_labeled_50pct.txt")
    for c in "012":
        assert sum(ln[1] == c for ln in small) == 4 and sum(ln[1] == c for ln in large) == 8
    assert {ln[0] for ln in small} <= {ln[0] for ln in large}
    assert {ln[0] for ln in large} <= {ln[0] for ln in lines(demo / "train_clean.txt")}  # clean originals only


def test_same_seed_identical_other_seed_differs(tmp_path, demo):
    poison.main(["--out", str(tmp_path / "same"), "--target", "1", "--rate", "0.5", *TINY])
    cmp = filecmp.dircmp(demo, tmp_path / "same")
    for name in ("train_clean.txt", "train_poisoned.txt", "val_patched.txt", "train_labeled_25pct.txt", "trigger.png"):
        assert filecmp.cmp(demo / name, tmp_path / "same" / name, shallow=False), name
    for p, _ in map(tuple, lines(demo / "train_poisoned.txt")):
        assert filecmp.cmp(demo / p, tmp_path / "same" / p, shallow=False)
    assert cmp.diff_files in ([], ["poison.json"])  # poison.json records --out
    poison.main(["--out", str(tmp_path / "other"), "--target", "1", "--rate", "0.5", "--seed", "1", *TINY])
    differs = [not filecmp.cmp(demo / p, tmp_path / "other" / p, shallow=False) for p, _ in lines(demo / "val_patched.txt")]
    assert any(differs)
    assert lines(demo / "train_poisoned.txt") != lines(tmp_path / "other" / "train_poisoned.txt")


def test_data_seed_apart_from_poison_seed(tmp_path, demo):
    """Issue 15: another --seed poisons other images of the same data; the demo images, val and labeled subsets stay."""
    poison.main(["--out", str(tmp_path / "s3"), "--target", "1", "--rate", "0.5", "--seed", "3", *TINY])
    other = tmp_path / "s3"
    for name in ("train_clean.txt", "val_clean.txt", "train_labeled_25pct.txt", "train_labeled_50pct.txt"):
        assert filecmp.cmp(demo / name, other / name, shallow=False), name
    for p, _ in lines(demo / "train_clean.txt") + lines(demo / "val_clean.txt"):
        assert filecmp.cmp(demo / p, other / p, shallow=False), p
    assert lines(demo / "train_poisoned.txt") != lines(other / "train_poisoned.txt")
    meta = json.loads((other / "poison.json").read_text())
    assert meta["seed"] == 3 and meta["data_seed"] == 0
    poison.main(["--out", str(tmp_path / "d1"), "--target", "1", "--rate", "0.5", "--data-seed", "1", *TINY])
    first = lines(demo / "val_clean.txt")[0][0]
    assert not filecmp.cmp(demo / first, tmp_path / "d1" / first, shallow=False)  # another data seed, other images


def test_demo_classes_by_name_give_the_same_images(tmp_path, demo):
    args = [a for a in TINY if a != "3"]  # TINY without "--demo-classes 3"
    args.remove("--demo-classes")
    poison.main(["--out", str(tmp_path / "named"), "--target", "dots", "--demo-classes", "dots,checkerboard", *args])
    meta = json.loads((tmp_path / "named" / "poison.json").read_text())
    assert meta["classes"] == ["checkerboard", "dots"] and meta["target"]["index"] == 1
    for split in ("train", "val"):
        for cls in ("checkerboard", "dots"):
            old, new = demo / "demo_data" / split / cls, tmp_path / "named" / "demo_data" / split / cls
            names = sorted(os.listdir(old))
            assert names == sorted(os.listdir(new))
            assert all(filecmp.cmp(old / n, new / n, shallow=False) for n in names)  # independent of the other classes
    assert not (tmp_path / "named" / "demo_data" / "train" / "crosses").exists()
    line = error_of(run("poison.py", "--out", tmp_path / "bad", "--demo-classes", "dots,zebra", check=False))
    assert "unknown class 'zebra'" in line and not (tmp_path / "bad").exists()


def test_lists_resolve_after_moving_the_folder(tmp_path, demo):
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(demo, moved)
    for name in ("train_clean.txt", "train_poisoned.txt", "val_clean.txt", "val_patched.txt", "train_labeled_25pct.txt"):
        samples = linear_probe.read_list(str(moved / name))
        assert all(p.startswith(str(moved)) for p, _ in samples)


def test_opacity_blends(tmp_path):
    poison.main(["--out", str(tmp_path / "o"), "--opacity", "0.5", "--trigger", "white", *TINY])
    clean, pois = lines(tmp_path / "o/val_clean.txt"), lines(tmp_path / "o/val_patched.txt")
    crop = np.asarray(poison.center_crop(Image.open(tmp_path / "o" / clean[0][0]).convert("RGB"), 18, 16)).astype(int)
    diff = pixels(tmp_path / "o" / pois[0][0]) - crop
    ys, xs = np.nonzero(np.abs(diff).sum(2))
    box = crop[ys.min():ys.min() + 4, xs.min():xs.min() + 4]
    expected = np.round(0.5 * 255 + 0.5 * box)
    assert np.abs(pixels(tmp_path / "o" / pois[0][0])[ys.min():ys.min() + 4, xs.min():xs.min() + 4] - expected).max() <= 1


def test_bottom_right_placement():
    assert poison.place(32, 32, 10, "bottom-right", None, None) == (21, 21)  # BadEncoder: rows/cols 21..30 of 32
    assert poison.place(224, 224, 50, "random", (0.1, 0.9), (0.0, 0.999999)) == (22, 151)


def make_jpeg_root(root, classes=("a", "b"), n=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(root / split / c)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / split / c / f"{i}.JPEG")
    return root


def test_data_root_with_jpegs(tmp_path):
    root = make_jpeg_root(tmp_path / "data")
    poison.main(["--data-root", str(root), "--out", str(tmp_path / "o"), "--target", "b", "--rate", "1", "--val-crop", "16",
                 "--workers", "1"])
    pois = lines(tmp_path / "o/train_poisoned.txt")
    assert sum(p[0].startswith("train_poisoned/b/") for p in pois) == 3
    assert all(os.path.isabs(p[0]) for p in pois if not p[0].startswith("train_poisoned"))  # originals stay absolute
    assert Image.open(tmp_path / "o" / pois[-1][0]).format == "JPEG"


def test_bad_inputs(tmp_path, demo):
    root = make_jpeg_root(tmp_path / "data")
    line = error_of(run("poison.py", "--data-root", root, "--out", tmp_path / "o", "--target", "zebra", check=False))
    assert "--target zebra" in line
    line = error_of(run("poison.py", "--out", demo, *TINY, check=False))
    assert "exists" in line and "--overwrite" in line
    (root / "val" / "a" / "1.JPEG").write_bytes(b"not an image")
    line = error_of(run("poison.py", "--data-root", root, "--out", tmp_path / "o", "--target", "a", "--val-crop", "16",
                        check=False))
    assert "1.JPEG" in line and not (tmp_path / "o").exists()


def test_overwrite_replaces_only_when_complete(tmp_path):
    out = tmp_path / "o"
    poison.main(["--out", str(out), *TINY])
    root = make_jpeg_root(tmp_path / "data")
    (root / "train" / "a" / "0.JPEG").write_bytes(b"broken")
    proc = run("poison.py", "--data-root", root, "--out", out, "--target", "a", "--overwrite", "--val-crop", "16",
               check=False)
    assert "0.JPEG" in error_of(proc)
    assert (out / "poison.json").exists() and json.load(open(out / "poison.json"))["demo"]  # the old folder survived
