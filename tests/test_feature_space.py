"""scripts/feature_space.py: t-SNE on separated blobs, the centroid fraction by hand, the PNG and JSON it writes."""
import importlib.util
import json
import os

import torch
from PIL import Image

from conftest import ROOT

spec = importlib.util.spec_from_file_location("feature_space", os.path.join(ROOT, "scripts", "feature_space.py"))
fs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fs)


def test_tsne_separates_two_gaussian_blobs():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 10, generator=g), torch.randn(40, 10, generator=g) + 8])
    y = torch.arange(2).repeat_interleave(40)
    e = fs.tsne(x, perplexity=10)
    assert e.shape == (80, 2) and torch.isfinite(e).all()
    d = torch.cdist(e, e)
    d.fill_diagonal_(float("inf"))
    assert (y[d.argmin(1)] == y).float().mean() >= 0.95  # 1-NN purity of the embedding
    assert (e[:40].mean(0) - e[40:].mean(0)).norm() > 2 * (e[:40].std(0).norm() + e[40:].std(0).norm())


def test_centroid_fraction_is_the_hand_count():
    # 3 classes with centroids (0, 0), (10, 0), (0, 10); target 2
    train = torch.tensor([[-1.0, 0], [1, 0], [9, 0], [11, 0], [0, 9], [0, 11]])
    train_y = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.tensor([[0.0, 9], [1, 1], [9, 1], [1, 7], [0, 10], [9, 9.5]])  # nearest: 2, 0, 1, 2, 2, 2
    y = torch.tensor([0, 1, 0, 1, 2, 0])  # the 5th is a target image: left out
    assert fs.centroid_fraction(train, train_y, x, y, target=2) == 100 * 3 / 5
    assert fs.centroid_fraction(train, train_y, x, y, target=0) == 100 * 1 / 3  # images 2, 4, 5: nearest 0, 2, 2


def test_trigger_pull_is_the_hand_computed_cosine():
    # two non-target images along x and y (cosine 0); patched, both turn 45 degrees towards (1, 1): cosine 1 between
    # them; target centroid (1, 1) / sqrt 2: clean images at cos 45 = 0.7071 to it, patched at 1
    train, train_y = torch.tensor([[1.0, 1], [2, 2], [0, 1]]), torch.tensor([1, 1, 0])
    val = torch.tensor([[1.0, 0], [0, 3], [5, 5]])
    patched = torch.tensor([[1.0, 1], [2, 2], [5, 5]])
    y = torch.tensor([0, 2, 1])  # the third is a target image: left out
    pull = fs.trigger_pull(train, train_y, val, patched, y, target=1)
    assert abs(pull["cohesion"] - 1.0) < 1e-6 and abs(pull["to_target"] - (1 - 0.5 ** 0.5)) < 1e-6
    same = fs.trigger_pull(train, train_y, val, val, y, target=1)
    assert same == {"cohesion": 0.0, "to_target": 0.0}


def test_norm_ratio_is_the_hand_computed_ratio():
    val = torch.tensor([[3.0, 4], [0, 2], [1, 0]])  # norms 5, 2 (the target image's 1 left out): mean 3.5
    patched = torch.tensor([[6.0, 8], [0, 4], [100, 0]])  # norms 10, 4: mean 7
    y = torch.tensor([0, 2, 1])
    assert abs(fs.norm_ratio(val, patched, y, target=1) - 2.0) < 1e-6
    assert fs.norm_ratio(val, val, y, target=1) == 1.0


def test_picture_and_numbers_of_a_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    names, target = ["checkerboard", "crosses", "dots"], 1
    proto = 5 * torch.eye(3, 8)
    for kind, shift in (("clean", 0), ("poisoned", 1)):  # the backdoored model maps patched images onto the target
        def feats(labels, patched=False):
            centre = proto[torch.full_like(labels, target)] if patched and shift else proto[labels]
            return centre + 0.3 * torch.randn(len(labels), 8, generator=g)
        train_y, val_y = torch.arange(3).repeat(8), torch.arange(3).repeat(10)
        os.makedirs(tmp_path / kind / "probe")
        torch.save({"train": feats(train_y), "train_y": train_y, "val": feats(val_y), "val_y": val_y,
                    "patched": feats(val_y, patched=True), "patched_y": val_y, "target": target, "class_names": names},
                   tmp_path / kind / "probe" / "features.pt")
    fs.main([str(tmp_path), "--size", "160", "--iters", "300", "--perplexity", "10"])
    result = json.load(open(tmp_path / "feature_space.json"))
    assert result["clean"]["patched_to_target_centroid"] == 0.0
    assert result["backdoored"]["patched_to_target_centroid"] == 100.0
    assert result["clean"]["n_patched_nontarget"] == 20 and result["target_name"] == "crosses"
    assert all(0.8 < result[k]["trigger_norm_ratio"] < 1.25 for k in ("clean", "backdoored"))  # moved, not lengthened
    # two 160 px panels side by side; legend: 4 entries (target, 2 classes, patched), 2 per 320 px row -> 2 x 18 + 6
    assert Image.open(tmp_path / "feature_space.png").size == (320, 160 + 42)
