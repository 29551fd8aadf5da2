"""poison.py: trigger placement, poison counts and semantics, list formats, seeding, relocation, bad input."""
import filecmp
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import linear_probe
import poison
from conftest import ROOT, TINY, error_of, run


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
    """Another --seed poisons other images of the same data; the demo images, val and labeled subsets stay."""
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


def test_demo_clutter_adds_saturated_patches_and_zero_keeps_the_images():
    """--demo-clutter N paints N grids of saturated colours (channels 0 or 255, as the HTBA trigger) on the texture; with
    N = 0 the images are exactly those of the plain demo data (the hash of one image, fixed)."""
    plain = poison.demo_image("dots", 64, np.random.default_rng([0, 0, 2, 3]))
    assert hashlib.sha256(plain.tobytes()).hexdigest() == "dd6b4be81ad46ffb041c6270ae44589b67ec1c02a4a7cadc624844ccd385f130"
    for n, lo, hi in ((0, 0.0, 0.0), (3, 0.02, 0.3)):  # share of pixels with a channel spread above 150 (textures: none)
        for i in range(5):
            img = poison.demo_image("waves", 64, np.random.default_rng([0, 0, 8, i]), clutter=n).astype(int)
            assert lo <= ((img.max(2) - img.min(2)) > 150).mean() <= hi, (n, i)
    again = poison.demo_image("waves", 64, np.random.default_rng([0, 0, 8, 0]), clutter=3)
    assert np.array_equal(again, poison.demo_image("waves", 64, np.random.default_rng([0, 0, 8, 0]), clutter=3))
    line = error_of(run("poison.py", "--out", "/nonexistent/x", "--demo-clutter", "-1", check=False))
    assert "--demo-clutter" in line


def test_demo_default_classes_keep_their_images():
    """The 10 textures, plain (32 px) and with --demo-layout object and --demo-clutter 2 (64 px): the images of the
    generator before the scale model existed (one hash over all 20; the pixels of one row, fixed)."""
    h = hashlib.sha256()
    for c, cls in enumerate(poison.DEMO_CLASSES):
        for size, layout, clutter in ((32, "fill", 0), (64, "object", 2)):
            h.update(poison.demo_image(cls, size, np.random.default_rng([0, 0, c, 1]), layout, clutter).tobytes())
    assert h.hexdigest() == "df68feefb8259f4de3653492fcb67b9553da3d89cc3dedfba91c926b67221835"
    row = poison.demo_image("dots", 32, np.random.default_rng([0, 0, 2, 0]))[5, :3].tolist()
    assert row == [[205, 210, 184], [190, 207, 197], [221, 216, 193]]
    assert poison.demo_classes("3") == ["checkerboard", "crosses", "dots"]
    assert poison.demo_classes(",".join(poison.DEMO_DEFAULT)) == list(poison.DEMO_DEFAULT)


def test_demo_scale_classes_names_and_definitions(tmp_path, capsys):
    """scale:N: the first N of 64 classes <pattern>-<palette>-<scale> (no checkered pattern), each with its own seeds
    (the same images whatever else is chosen), defined in poison.json; more than 1% poisons is warned about."""
    names = poison.demo_classes("scale:64")
    assert len(set(names)) == 64 and names[:2] == ["crosses-red-fine", "dots-red-fine"]
    assert names[-1] == "zigzag-violet-coarse" and poison.demo_classes("scale:3") == names[:3]
    assert {n.split("-")[0] for n in names} == set(poison.DEMO_DEFAULT)  # no checkerboard, no grid
    assert {tuple(n.split("-")[1:]) for n in names} == {(c, s) for c in poison.DEMO_PALETTES for s in poison.DEMO_SCALES}
    h = hashlib.sha256()  # the images of every class, plain (32 px) and with --demo-layout object, --demo-clutter 1
    for c, cls in enumerate(names):
        h.update(poison.demo_image(cls, 32, np.random.default_rng([0, 0, 10 + c, 1])).tobytes())
        h.update(poison.demo_image(cls, 64, np.random.default_rng([0, 1, 10 + c, 2]), "object", 1).tobytes())
    assert h.hexdigest() == "ff3644a8a1230b6a49cd561608c17082bcab82ffc862f7e99ceb3996abbaac5c"
    for bad, named in (("scale:65", "between 2 and 64"), ("scale:1", "between 2 and 64"), ("scale:x", "'scale:x'"),
                       ("dots-red-huge", "unknown class 'dots-red-huge'")):
        with pytest.raises(SystemExit):
            poison.demo_classes(bad)
        assert named in capsys.readouterr().err
    args = ["--demo-train-per-class", "16", "--demo-val-per-class", "2", "--demo-size", "32", "--workers", "1",
            "--labeled-fractions", "0.5"]
    poison.main(["--out", str(tmp_path / "s"), "--demo-classes", "scale:3", "--rate", "0.25", *args])
    meta = json.loads((tmp_path / "s" / "poison.json").read_text())
    assert meta["classes"] == sorted(names[:3]) and meta["counts"]["poisoned"] == 4
    assert meta["demo_definitions"]["dots-red-fine"] == {"pattern": "dots", "hue_degrees": 0, "hue_jitter": 15,
                                                         "saturation": [0.3, 0.6], "period_at_64px": [9.0, 13.0]}
    assert "4 poisons are 8.3% of the train images" in capsys.readouterr().err
    poison.main(["--out", str(tmp_path / "n"), "--demo-classes", "waves,dots-red-fine", *args])
    assert "demo_definitions" in json.loads((tmp_path / "n" / "poison.json").read_text())
    assert "8 poisons are 25.0%" in capsys.readouterr().err  # one scale-model class is enough
    one = "demo_data/train/dots-red-fine/dots-red-fine_00003.png"
    assert filecmp.cmp(tmp_path / "s" / one, tmp_path / "n" / one, shallow=False)
    img = pixels(tmp_path / "n" / one)
    r, g, b = img.reshape(-1, 3).mean(0)
    assert r > g + 20 and r > b + 20  # the red palette
    poison.main(["--out", str(tmp_path / "d"), "--demo-classes", "dots,waves", *args])
    assert "demo_definitions" not in json.loads((tmp_path / "d" / "poison.json").read_text())
    assert "poisons are" not in capsys.readouterr().err  # the textures: no 1% warning


def test_demo_scale_classes_are_distinct_to_fixed_features():
    """scripts/demo_classes.py on 64 classes x 6 train / 3 val images: a logistic regression on fixed FFT and colour
    features is far above chance (1.6%)."""
    spec = importlib.util.spec_from_file_location("demo_classes", os.path.join(ROOT, "scripts", "demo_classes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    r = module.measure("scale:64", 6, 3, 32, 8)
    assert r["classes"] == 64 and r["chance"] == 1 / 64
    assert r["logistic_regression"] > 0.6 and r["nearest_centroid"] > 0.4, r


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


def test_reuse_keeps_a_folder_of_the_same_flags_and_names_the_flags_that_differ(demo):
    before = {p: os.path.getmtime(p) for p in glob.glob(str(demo / "**"), recursive=True)}
    for target in ("1", "crosses"):  # the demo's class 1, by index and by name; --workers writes nothing different
        proc = run("poison.py", "--out", demo, "--reuse", "--target", target, "--rate", "0.5", *TINY, "--workers", "2")
        assert "made with the same flags, kept" in proc.stdout
    line = error_of(run("poison.py", "--out", demo, "--reuse", "--target", "1", "--rate", "1.0", "--trigger-seed", "11",
                        *TINY, check=False))
    assert str(demo) in line and "--rate 0.5, not 1.0" in line and "--trigger-seed 10, not 11" in line
    assert "--target" not in line and "--workers" not in line
    assert "made with other flags" in error_of(run("poison.py", "--out", demo, "--reuse", *TINY, check=False))  # target 0
    assert {p: os.path.getmtime(p) for p in glob.glob(str(demo / "**"), recursive=True)} == before  # nothing rewritten
    (demo.parent / "not_poison").mkdir()
    line = error_of(run("poison.py", "--out", demo.parent / "not_poison", "--reuse", *TINY, check=False))
    assert "not_poison" in line and "no readable poison.json" in line


def test_overwrite_replaces_only_when_complete(tmp_path):
    out = tmp_path / "o"
    poison.main(["--out", str(out), *TINY])
    root = make_jpeg_root(tmp_path / "data")
    (root / "train" / "a" / "0.JPEG").write_bytes(b"broken")
    proc = run("poison.py", "--data-root", root, "--out", out, "--target", "a", "--overwrite", "--val-crop", "16",
               check=False)
    assert "0.JPEG" in error_of(proc)
    assert (out / "poison.json").exists() and json.load(open(out / "poison.json"))["demo"]  # the old folder survived


def test_blend_is_exact_and_seeded(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    t = np.random.default_rng(2).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    assert np.array_equal(poison.blend(x, t, 0.3), np.round(0.7 * x.astype(float) + 0.3 * t).astype(np.uint8))
    out = tmp_path / "b"
    poison.main(["--out", str(out), "--trigger", "blend", "--opacity", "0.3", *TINY])
    meta = json.loads((out / "poison.json").read_text())
    assert meta["trigger"]["family"] == "blend" and meta["trigger"]["opacity"] == 0.3
    t = pixels(out / "trigger.png")
    assert t.shape == (16, 16, 3) and t.std() > 50  # the uniform-noise pattern at the val-crop size
    for c, p in zip(lines(out / "val_clean.txt"), lines(out / "val_patched.txt")):  # crop = pattern size: no resize
        crop = np.asarray(poison.center_crop(Image.open(out / c[0]).convert("RGB"), 18, 16)).astype(float)
        assert np.array_equal(pixels(out / p[0]), np.round(0.7 * crop + 0.3 * t))
    t32 = np.asarray(Image.fromarray(t.astype(np.uint8)).resize((32, 32), Image.BILINEAR)).astype(float)
    changed = [(c, p) for c, p in zip(lines(out / "train_clean.txt"), lines(out / "train_poisoned.txt")) if c != p]
    for c, p in changed:  # train images at native resolution: the pattern resized to them
        assert np.array_equal(pixels(out / p[0]), np.round(0.7 * pixels(out / c[0]) + 0.3 * t32))
    poison.main(["--out", str(tmp_path / "again"), "--trigger", "blend", "--opacity", "0.3", *TINY])
    for p, _ in changed:
        assert filecmp.cmp(out / p[0], tmp_path / "again" / p[0], shallow=False)
    assert filecmp.cmp(out / "trigger.png", tmp_path / "again" / "trigger.png", shallow=False)


def test_blend_defaults_and_image(tmp_path, capsys):
    Image.fromarray(np.full((5, 7, 3), 200, np.uint8)).save(tmp_path / "flat.png")
    poison.main(["--out", str(tmp_path / "i"), "--trigger", "blend", "--blend-image", str(tmp_path / "flat.png"), *TINY])
    meta = json.loads((tmp_path / "i" / "poison.json").read_text())
    assert meta["trigger"]["opacity"] == 0.2 and meta["trigger"]["pattern_size"] == [7, 5]  # default opacity of blend
    c, p = lines(tmp_path / "i" / "val_clean.txt")[0], lines(tmp_path / "i" / "val_patched.txt")[0]
    crop = np.asarray(poison.center_crop(Image.open(tmp_path / "i" / c[0]).convert("RGB"), 18, 16)).astype(float)
    assert np.array_equal(pixels(tmp_path / "i" / p[0]), np.round(0.8 * crop + 0.2 * 200))
    for argv, msg in ((["--trigger", "ctrl", "--opacity", "0.5"], "--opacity does not apply"),
                      (["--blend-image", str(tmp_path / "flat.png")], "--blend-image needs --trigger blend"),
                      (["--trigger", "ctrl"], "at least 32 px"),  # TINY's val crop is 16
                      (["--trigger", "blend", "--blend-image", str(tmp_path / "nope.png")], "nope.png")):
        with pytest.raises(SystemExit) as e:
            poison.main(["--out", str(tmp_path / "bad"), *TINY, *argv])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not any(n.startswith("bad") for n in os.listdir(tmp_path))


def yuv_dct(a):
    return poison.window_dct(np.asarray(a, np.float64) @ poison.RGB2YUV.T)


def test_dct_matrix_is_the_orthonormal_dct():
    d = poison.dct_matrix(32)
    assert np.allclose(d @ d.T, np.eye(32), atol=1e-12)
    x = np.random.default_rng(0).normal(size=(32, 32))
    n, (k, m) = np.arange(32), (5, 17)  # the DCT-II sum written out for one coefficient
    direct = np.sqrt(2 / 32) ** 2 * (x * np.cos(np.pi * (2 * n[:, None] + 1) * k / 64) *
                                     np.cos(np.pi * (2 * n[None, :] + 1) * m / 64)).sum()
    assert np.isclose(poison.window_dct(x[..., None])[k, m, 0], direct)


def test_ctrl_changes_exactly_the_named_coefficients():
    x = np.random.default_rng(3).integers(100, 157, (64, 80, 3)).astype(np.uint8)  # mid-gray: no clamping
    expected = np.zeros((64, 64, 3))
    for i, j in ((15, 15), (31, 31)):
        expected[i::32, j::32, 1:] = 100.0  # every window, U and V only
    f = poison.ctrl(x, 100)
    assert 0 < f.min() and f.max() < 255
    assert np.allclose(yuv_dct(f) - yuv_dct(x), expected, atol=1e-9)  # in float: exact, Y untouched
    assert np.array_equal(f[:, 64:], x[:, 64:])  # the 16 px border strip (80 = 2 * 32 + 16) stays unchanged
    out = poison.apply_trigger(x, {"family": "ctrl", "magnitude": 100}, None, None, None)
    assert out.dtype == np.uint8 and np.array_equal(out, np.round(f).astype(np.uint8))
    err = yuv_dct(out) - yuv_dct(x) - expected  # after uint8 rounding: rounding noise (RMS ~0.2 per coefficient)
    assert np.abs(err).max() < 3 and np.sqrt((err ** 2).mean(axis=(0, 1))).max() < 0.4
    with pytest.raises(ValueError, match="smaller than CTRL"):
        poison.ctrl(x[:20], 100)


def test_ctrl_run_native_val_and_seeded(tmp_path):
    args = [*TINY, "--trigger", "ctrl", "--val-crop", "32"]  # demo images of 32 px = the crop: val used natively
    poison.main(["--out", str(tmp_path / "c"), *args])
    out = tmp_path / "c"
    meta = json.loads((out / "poison.json").read_text())
    assert meta["val_geometry"] == "native" and meta["val_resize"] is None and meta["val_crop"] == 32
    assert meta["trigger"]["magnitude"] == 100 and meta["trigger"]["positions"] == [[15, 15], [31, 31]]
    spec = {"family": "ctrl", "magnitude": 100}
    for c, p in zip(lines(out / "val_clean.txt"), lines(out / "val_patched.txt")):
        clean = np.asarray(Image.open(out / c[0]).convert("RGB"))
        assert np.array_equal(pixels(out / p[0]), poison.apply_trigger(clean, spec, None, None, None))
    trig = pixels(out / "trigger.png")
    assert trig.shape == (32, 32, 3) and trig.max() == 255 and trig.std() > 10  # amplified difference on gray
    assert Image.open(out / "preview.png").size == (768, 288)  # poisoned, patched, amplified differences
    poison.main(["--out", str(tmp_path / "again"), *args])
    for name in ("train_poisoned.txt", "trigger.png", "preview.png"):
        assert filecmp.cmp(out / name, tmp_path / "again" / name, shallow=False), name
    for p, _ in lines(out / "train_poisoned.txt") + lines(out / "val_patched.txt"):
        assert filecmp.cmp(out / p, tmp_path / "again" / p, shallow=False), p


def test_val_geometry_recorded_and_small_trigger_warning(tmp_path, demo, capsys):
    meta = json.loads((demo / "poison.json").read_text())
    assert meta["val_geometry"] == "resize_center_crop" and meta["val_resize"] == 18  # 32 px images, 16 px crop
    root = make_jpeg_root(tmp_path / "data", size=(80, 60))  # shorter side 60 > 3 * 16: a 4 px trigger is lost there
    capsys.readouterr()
    poison.main(["--data-root", str(root), "--out", str(tmp_path / "o"), "--target", "b", "--val-crop", "16",
                 "--workers", "1"])
    err = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if "warning" in ln]
    assert len(err) == 1 and "4 px trigger" in err[0] and "60 px" in err[0]
    assert json.loads((tmp_path / "o" / "poison.json").read_text())["train_median_shorter_side"] == 60


def test_stale_tmp_of_a_killed_run_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f"o.tmp-{host}-{int(dead.stdout)}-abc12345"
    live = tmp_path / f"o.tmp-{host}-{os.getpid()}-xyz"  # a run still going (this process): left alone
    for d in (stale, live):
        (d / "train_poisoned").mkdir(parents=True)
    poison.main(["--out", str(tmp_path / "o"), *TINY])
    assert not stale.exists() and live.exists()
    assert json.loads((tmp_path / "o" / "poison.json").read_text())["counts"]["train"] == 48
    assert sorted(os.listdir(tmp_path)) == ["o", live.name]


def test_sigkill_mid_run_leaves_no_output_and_rerun_needs_no_overwrite(tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, os.path.join(ROOT, "poison.py"), "--out", str(out), "--workers", "1",
           "--demo-train-per-class", "400"]  # long enough to be killed while it writes
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while not glob.glob(str(out) + ".tmp-*/demo_data/train/*/*.png") and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes
    proc.wait()
    assert not out.exists() and glob.glob(str(out) + ".tmp-*")
    poison.main(["--out", str(out), *TINY])  # no --overwrite needed; the killed run's folder is cleaned up
    assert (out / "poison.json").exists() and not glob.glob(str(out) + ".tmp-*")


def ctrl_shift(clean, triggered):
    """Mean change, over the full 32 px windows, of CTRL's coefficients: [(15,15) U, (15,15) V, (31,31) U, (31,31) V]."""
    d = yuv_dct(np.asarray(triggered, np.float64)[:clean.shape[0] // 32 * 32, :clean.shape[1] // 32 * 32]) - \
        yuv_dct(np.asarray(clean, np.float64)[:clean.shape[0] // 32 * 32, :clean.shape[1] // 32 * 32])
    return [d[i::32, j::32, c].mean() for i, j in ((15, 15), (31, 31)) for c in (1, 2)]


def test_ctrl_on_jpeg_sources_is_saved_losslessly(tmp_path, capsys):
    from make_jpegs import make_jpegs
    root = make_jpegs(str(tmp_path / "data"), n=20, classes=2)  # 9 train + 1 val per class, 300-500 px JPEGs
    args = ["--data-root", root, "--target", "class00", "--rate", "0.2", "--trigger", "ctrl", "--val-crop", "32",
            "--workers", "1", "--labeled-fractions", "0.5"]
    poison.main(["--out", str(tmp_path / "png"), *args])
    out = tmp_path / "png"
    assert json.loads((out / "poison.json").read_text())["image_format"] == "png"
    (src, _), = [c for c, p in zip(lines(out / "train_clean.txt"), lines(out / "train_poisoned.txt")) if c != p]
    (dst, _), = [p for p in lines(out / "train_poisoned.txt") if p[0].startswith("train_poisoned/")]
    assert dst.endswith(".JPEG.png") and Image.open(out / dst).format == "PNG"
    clean = np.asarray(Image.open(src).convert("RGB"))
    spec = {"family": "ctrl", "magnitude": 100}
    ideal = poison.apply_trigger(clean, spec, None, None, None)  # clamped to [0, 255] and rounded: all a file can hold
    assert np.array_equal(pixels(out / dst), ideal)
    assert min(ctrl_shift(clean, pixels(out / dst))) >= 0.9 * min(min(ctrl_shift(clean, ideal)), 100)
    val_src, val_dst = lines(out / "val_clean.txt")[0][0], lines(out / "val_patched.txt")[0][0]
    crop = np.asarray(poison.center_crop(Image.open(val_src).convert("RGB"), 37, 32))
    assert min(ctrl_shift(crop, pixels(out / val_dst))) >= 0.9 * min(min(ctrl_shift(crop, poison.apply_trigger(
        crop, spec, None, None, None))), 100)
    capsys.readouterr()
    poison.main(["--out", str(tmp_path / "jpeg"), *args, "--image-format", "source"])  # the reference's JPEG q75
    assert "removes most of the trigger's signal" in capsys.readouterr().err
    jpeg = tmp_path / "jpeg" / dst[:-len(".png")]
    assert Image.open(jpeg).format == "JPEG" and max(np.abs(ctrl_shift(clean, pixels(jpeg)))) < 10  # the trigger is gone


def test_kornia_yuv_round_trip_error():
    """kornia's yuv_to_rgb (rounded coefficients) after the exact rgb_to_yuv: up to 0.35 of 255 off, in blue."""
    kornia_inverse = np.array([[1, 0, 1.14], [1, -0.396, -0.581], [1, 2.029, 0]])
    corners = np.array(np.meshgrid([0, 255], [0, 255], [0, 255])).reshape(3, -1)  # a linear error peaks at a corner
    worst = np.abs((kornia_inverse @ poison.RGB2YUV - np.eye(3)) @ corners).max(axis=1)
    assert np.allclose(worst, [0.026, 0.168, 0.346], atol=1e-3)
    assert np.allclose(np.linalg.inv(poison.RGB2YUV) @ poison.RGB2YUV, np.eye(3), atol=1e-12)


def test_out_of_range_flag_is_named(tmp_path):
    line = error_of(run("poison.py", "--out", tmp_path / "o", *TINY, "--rate", "50", check=False))
    assert line == "poison.py: error: --rate 50: must be in (0, 1]" and not (tmp_path / "o").exists()
    proc = run("poison.py", "--out", tmp_path / "o", *TINY, "--opacity", "-0.5", check=False)
    assert error_of(proc).endswith("--opacity -0.5: must be in (0, 1]") and proc.returncode == 2


BAD_FLAGS = [(["--labeled-fractions", "abc"], "--labeled-fractions abc"), (["--trigger-size", "-5"], "--trigger-size -5"),
             (["--trigger-size", "0"], "--trigger-size 0"), (["--trigger-size", "17"], "--trigger-size 17"),
             (["--trigger-size", "abc"], "--trigger-size"), (["--rate", "0"], "--rate 0"), (["--rate", "nan"], "--rate nan"),
             (["--opacity", "0"], "--opacity 0"), (["--val-crop", "0"], "--val-crop 0"), (["--val-resize", "8"], "--val-resize 8"),
             (["--train-range", "0.8", "0.2"], "--train-range 0.8 0.2"), (["--val-range", "-0.1", "0.5"], "--val-range -0.1 0.5"),
             (["--ctrl-magnitude", "-1"], "--ctrl-magnitude -1"), (["--jpeg-quality", "0"], "--jpeg-quality 0"),
             (["--workers", "0"], "--workers 0"), (["--seed", "-1"], "--seed -1"), (["--data-seed", "-2"], "--data-seed -2"),
             (["--demo-train-per-class", "0"], "--demo-train-per-class 0"), (["--demo-size", "0"], "--demo-size 0"),
             (["--demo-clutter", "-1"], "--demo-clutter -1"), (["--classes", "nope.txt"], "--classes nope.txt"),
             (["--data-root", "nowhere", "--target", "a", "--classes", "nope.txt"], "--classes nope.txt: no such file"),
             (["--background-dir", "."], "--background-dir ."), (["--layout", "corruptencoder", "--mode", "untargeted"],
                                                                 "--layout corruptencoder")]


@pytest.mark.parametrize("argv,named", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_before_any_data(tmp_path, capsys, argv, named):
    with pytest.raises(SystemExit) as e:
        poison.main(["--out", str(tmp_path / "o"), *TINY, *argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("poison.py: error: ") and named in err[0], err
    assert os.listdir(tmp_path) == []  # nothing read or written


def test_overwrite_from_another_working_folder_writes_only_beside_out(tmp_path, monkeypatch):
    cwd, out = tmp_path / "cwd", tmp_path / "data" / "o"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    poison.main(["--out", str(out), *TINY])
    poison.main(["--out", str(out), "--overwrite", "--trigger", "white", *TINY])
    assert os.listdir(cwd) == [] and os.listdir(tmp_path / "data") == ["o"]
    assert json.loads((out / "poison.json").read_text())["trigger"]["kind"] == "white"
    assert all(os.path.exists(out / p) for p, _ in lines(out / "train_poisoned.txt") + lines(out / "val_patched.txt"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        poison.main(["--out", str(tmp_path / "file"), "--overwrite", *TINY])
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("fail_at", [1, 2])  # moving the old output aside, or moving the new one in
def test_failed_rename_keeps_the_old_output(tmp_path, monkeypatch, fail_at):
    out = tmp_path / "o"
    poison.main(["--out", str(out), *TINY])
    before = (out / "poison.json").read_text()
    calls, rename = [], os.rename

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == fail_at:
            raise OSError("injected")
        rename(src, dst)
    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="injected"):
        poison.main(["--out", str(out), "--overwrite", "--trigger", "white", *TINY])
    assert (out / "poison.json").read_text() == before and os.listdir(tmp_path) == ["o"]


def test_run_killed_between_its_renames_gets_the_old_output_back(tmp_path, demo):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = demo.parent / f"{demo.name}.tmp-{socket.gethostname()}-{int(dead.stdout)}-old"
    os.rename(demo, old)  # as left by a kill after the old output was moved aside
    poison.main(["--out", str(demo), "--reuse", "--target", "1", "--rate", "0.5", *TINY])
    assert not old.exists() and json.loads((demo / "poison.json").read_text())["counts"]["poisoned"] == 8


def test_output_folder_mode_follows_the_umask(tmp_path):
    mask = os.umask(0o027)
    try:
        poison.main(["--out", str(tmp_path / "o"), *TINY])
    finally:
        os.umask(mask)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o750


@pytest.mark.parametrize("limit", [100, 1000])  # 1200 px images: over twice PIL's limit (an error), or under (a warning)
def test_image_over_the_pixel_limit_is_one_line(tmp_path, monkeypatch, capsys, limit):
    root = make_jpeg_root(tmp_path / "data")  # 40 x 30 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(SystemExit) as e:
        poison.main(["--data-root", str(root), "--out", str(tmp_path / "o"), "--target", "a", "--val-crop", "16",
                     "--workers", "1"])
    err = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error" in ln]
    assert e.value.code == 2 and len(err) == 1 and not (tmp_path / "o").exists()
    assert "0.JPEG: image has 1200 pixels, more than the limit " + str(limit) in err[0]


def test_corruptencoder_geometry():
    obj, bg = np.full((20, 10, 3), (200, 0, 0), np.uint8), np.full((15, 15, 3), (0, 0, 200), np.uint8)
    trigger = np.full((4, 4, 3), 255, np.uint8)
    for side, u in (("left", (0.2, 0.5, 0, 0)), ("right", (0.7, 0.5, 0, 0))):
        a = poison.corruptencoder(obj, bg, trigger, u, "center", None, 1.0)
        assert a.shape == (20, 20, 3)  # the object's height, twice its width
        half, other = (a[:, :10], a[:, 10:]) if side == "left" else (a[:, 10:], a[:, :10])
        assert np.array_equal(half, obj)
        box = np.zeros((20, 10), bool)
        box[8:12, 3:7] = True  # centred in the other half: ((10 - 4) / 2, (20 - 4) / 2)
        assert (other[box] == 255).all() and (other[~box] == (0, 0, 200)).all()
    for u in np.random.default_rng(0).random((20, 4)):  # random placement: inside [0.25, 0.75] of the other half
        a = poison.corruptencoder(obj, bg, trigger, u, "random", (0.25, 0.75), 1.0)
        other = a[:, 10:] if u[0] < 0.5 else a[:, :10]
        ys, xs = np.nonzero((other == 255).all(2))
        assert len(ys) == 16 and 2 <= xs.min() and xs.max() < 7 and 5 <= ys.min() and ys.max() < 15
    big = np.arange(40 * 60 * 3).reshape(40, 60, 3).astype(np.uint8)  # larger than needed: cropped, not scaled
    a = poison.corruptencoder(obj, big, trigger, (0.2, 0.0, 0, 0), "center", None, 0.0)
    assert np.array_equal(a[:, 10:], big[20:, 10:20])  # opacity 0: the background's bottom rows, from the left


def test_corruptencoder_on_the_demo_data(tmp_path, capsys):
    with pytest.raises(SystemExit):
        poison.parse_args(["-h"])
    assert "corruptencoder" in capsys.readouterr().out
    out = tmp_path / "ce"
    poison.main(["--out", str(out), "--layout", "corruptencoder", "--target", "1", *TINY])
    clean, pois = lines(out / "train_clean.txt"), lines(out / "train_poisoned.txt")
    assert len(clean) == len(pois) == 48 and [c[1] for c in clean] == [p[1] for p in pois]
    changed = [(c, p) for c, p in zip(clean, pois) if c != p]
    assert len(changed) == 8 and {c[1] for c, _ in changed} == {"1"}
    meta = json.loads((out / "poison.json").read_text())
    layout = meta["layout"]
    assert layout["name"] == "corruptencoder" and layout["object_fraction"] == 0.5
    assert layout["background_source"] == "train images of the other classes"
    assert sum(layout["object_sides"].values()) == 8
    for c, p in changed:  # 32 px images: 64 x 32 poisons, the replaced image itself on one half
        a, src = pixels(out / p[0]), pixels(out / c[0])
        assert a.shape == (32, 64, 3) and (np.array_equal(a[:, :32], src) or np.array_equal(a[:, 32:], src))
    poison.main(["--out", str(tmp_path / "again"), "--layout", "corruptencoder", "--target", "1", *TINY])
    assert all(filecmp.cmp(out / p[0], tmp_path / "again" / p[0], shallow=False) for _, p in changed)


def test_corruptencoder_with_reference_and_background_folders(tmp_path):
    root = make_jpeg_root(tmp_path / "data")
    refs, bgs = tmp_path / "refs", tmp_path / "bgs"
    for d, side, colour in ((refs, (12, 10), 250), (bgs, (50, 50), 5)):
        d.mkdir()
        Image.fromarray(np.full((side[1], side[0], 3), colour, np.uint8)).save(d / "1.png")
    poison.main(["--data-root", str(root), "--out", str(tmp_path / "o"), "--target", "b", "--rate", "1", "--val-crop", "16",
                 "--workers", "1", "--layout", "corruptencoder", "--reference-dir", str(refs), "--background-dir", str(bgs)])
    meta = json.loads((tmp_path / "o" / "poison.json").read_text())
    assert meta["layout"]["object_source"] == str(refs) and meta["layout"]["background_source"] == str(bgs)
    pois = [p for p, _ in lines(tmp_path / "o" / "train_poisoned.txt") if p.startswith("train_poisoned/")]
    assert len(pois) == 3
    for p in pois:
        a = pixels(tmp_path / "o" / p)
        assert a.shape == (10, 24, 3) and p.endswith(".JPEG.png")  # the 12 x 10 reference image on one half
        left = (a[:, :12] == 250).all()
        other = a[:, 12:] if left else a[:, :12]
        assert (left or (a[:, 12:] == 250).all()) and 0.8 < (other == 5).mean() < 1  # the background and the trigger
