"""patchsearch.py: k-means, the window search, the poison score on a constructed model, the filtered list, a smoke run."""
import json
import os

import torch
import torch.nn as nn

import linear_probe
import patchsearch
from conftest import run


def test_kmeans_finds_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(8)[:5] * 10
    labels = torch.arange(5).repeat_interleave(40)
    x = centers[labels] + 0.3 * torch.randn(200, 8, generator=g)
    c, a, d = patchsearch.kmeans(x, 5, iters=10, seed=1)
    for blob in range(5):  # every blob is one cluster, and no two blobs share one
        assert len(set(a[labels == blob].tolist())) == 1
    assert len(set(a.tolist())) == 5
    assert torch.allclose(d, (x - c[a]).norm(dim=1), atol=1e-4)
    assert (c[a[labels == 0][0]] - centers[0]).norm() < 0.3


def test_window_search_finds_planted_hot_region():
    g = torch.Generator().manual_seed(0)
    cam = 0.3 * torch.rand(3, 32, 32, generator=g)
    planted = [(7, 2), (0, 25), (20, 13)]
    for b, (i, j) in enumerate(planted):
        cam[b, i:i + 6, j:j + 6] += 0.5
    i, j = patchsearch.best_window(cam, 6)
    assert list(zip(i.tolist(), j.tolist())) == planted


class Toy(nn.Module):
    """A 1x1 conv (identity) + global average pool: features = the mean of each channel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.conv.weight.data = torch.eye(3)[:, :, None, None]

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_planted_patch_flips_clusters_and_gets_the_top_score():
    # Two clean groups (channel 1 or 2 on), one image with a bright 4x4 channel-0 patch: pasting its patch anywhere
    # moves an image into the patch cluster (centroid on channel 0); clean patches move nothing.
    g = torch.Generator().manual_seed(0)
    x = 0.05 * torch.rand(21, 3, 16, 16, generator=g)
    x[:10, 1] += 1
    x[10:20, 2] += 1
    x[20, 1] += 1
    x[20, :, 9:13, 5:9] = torch.tensor([50.0, 0, 0])[:, None, None]
    model = Toy().requires_grad_(False)
    centroids = torch.eye(3)[[1, 2, 0]]  # clusters: group A, group B, the patch
    a, _ = patchsearch.nearest(patchsearch.embed(model, x), centroids)
    assert a.tolist() == [0] * 10 + [1] * 10 + [2]
    patches, i, j = patchsearch.windows(model, centroids, model.conv, x[20:], 4)
    assert (i[0], j[0]) == (9, 5)  # Grad-CAM's best window is the planted patch
    test = [0, 1, 2, 10, 11, 12]
    for prune in (0.0, 0.25):  # score every image, or the pruned iterative search
        scores, scored, log = patchsearch.search(model, model.conv, centroids, a, lambda idx: x[idx], x[test], 4,
                                                 samples_per_iter=2, prune=prune)
        assert scored[20] and scores.argmax().item() == 20
        assert scores[20] == 6 and scores[:20].max() <= 0  # all 6 test images flip to the patch's cluster
    assert scored.sum() == 5 and len(log) == 1  # 3 clusters: 25% of them rounds to 0, which ends the search (reference)
    empty = torch.cat([centroids, torch.full((1, 3), -5.0)])  # a fourth centroid that no image is nearest to
    scores, scored, log = patchsearch.search(model, model.conv, empty, a, lambda idx: x[idx], x[test], 4, prune=0.25)
    assert scores.argmax().item() == 20 and log[0]["clusters"] == 4 and 3 not in log[0]["best_clusters"][:3]


def test_ties_are_ranked_in_a_seeded_random_order():
    scores = torch.zeros(1000)
    scores[[900, 5, 500]] = torch.tensor([3.0, 2.0, 1.0])
    ranked = patchsearch.rank(scores, seed=0)
    assert ranked[:3].tolist() == [900, 5, 500] and sorted(ranked.tolist()) == list(range(1000))
    ties = ranked[3:].tolist()
    assert ties != sorted(ties) and ties == patchsearch.rank(scores, seed=0)[3:].tolist()
    assert sum(i < 500 for i in ties[:100]) in range(30, 71)  # not by list order (class): both halves near the top
    assert ties != patchsearch.rank(scores, seed=1)[3:].tolist()


def read_lines(path):
    return [ln for ln in open(path, encoding="utf-8").read().splitlines() if ln.strip()]


def test_smoke_filtered_list_is_a_subset(demo, random_ckpt, tmp_path):
    out = tmp_path / "ps"
    proc = run("patchsearch.py", "--encoder", random_ckpt, "--train-list", demo / "train_poisoned.txt", "--out", out,
               "--clusters", 3, "--classifier-iters", 3, "--ensemble", 1, "--topk-poisons", 4, "--eval-every", 1,
               "--workers", 0, "--grid", 8)
    assert "flagged" in proc.stdout
    given, kept = linear_probe.read_list(str(demo / "train_poisoned.txt")), linear_probe.read_list(str(out / "train_filtered.txt"))
    given, kept = ([(os.path.realpath(p), y) for p, y in lst] for lst in (given, kept))
    assert 0 < len(kept) < len(given) and all(s in given for s in kept)  # a subset, at least one image flagged
    for line in read_lines(out / "train_filtered.txt"):
        path, label = line.rsplit(None, 1)
        assert label.isdigit() and not path.startswith("/")  # '<path> <label>', path relative to --out
    summary = json.load(open(out / "summary.json"))
    assert summary["n_kept"] == len(kept) and summary["n_flagged"] == len(given) - len(kept)
    assert summary["clusters"] == 3 and summary["layer"] == "layer1" and summary["window"] == 4  # 16 px: 60 * 16 / 224
    assert summary["n_poisons"] == len(json.load(open(demo / "poison.json"))["poisoned_indices"])
    assert 0 <= summary["recall"] <= 100 and 0 <= summary["precision"] <= 100
    scores = read_lines(out / "poison_scores.csv")
    assert scores[0].startswith("index,rank,score") and len(scores) - 1 == summary["n_scored"] > 0
    assert (out / "top_ranked.png").stat().st_size > 0
