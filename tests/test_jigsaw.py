"""jigsaw.py: permutation set, tile placement, colour rules, per-slot BN, weight decay, schedule; smoke, torchrun and
resume runs, bad input."""
import collections
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

import jigsaw
import linear_probe
from conftest import assert_missing_image_refused, assert_resume_is_exact, probe, read_log, run, torchrun2

TINY = ["--image-size", "16", "--batch-size", "16", "--workers", "0", "--num-perms", "24"]
MEAN, STD = torch.tensor(jigsaw.MEAN).view(3, 1, 1), torch.tensor(jigsaw.STD).view(3, 1, 1)


def test_permutation_set():
    perms = jigsaw.hamming_permutations(2000, 0)
    assert perms.shape == (2000, 9) and perms.dtype == torch.int64
    assert torch.equal(perms.sort(dim=1).values, torch.arange(9).expand(2000, 9))  # every row permutes 0..8
    assert len(set(map(tuple, perms.tolist()))) == 2000
    d = (perms[:, None] != perms[None]).sum(-1)[~torch.eye(2000, dtype=torch.bool)]  # pairwise Hamming distances
    assert d.min() >= 2 and d.float().mean() > 7.9  # the reference's file: min 2, mean 8.004
    assert torch.equal(jigsaw.hamming_permutations(100, 0), perms[:100])  # same seed, same (greedy: prefix) set
    assert not torch.equal(jigsaw.hamming_permutations(100, 1), perms[:100])


def test_each_permutation_maximises_the_summed_hamming_distance():
    perms = jigsaw.hamming_permutations(8, 3).numpy()
    every = np.array(list(itertools.permutations(range(9))))
    for i in range(1, len(perms)):
        summed = (every[:, None] != perms[None, :i]).sum((1, 2))
        summed[(every[:, None] == perms[None, :i]).all(-1).any(1)] = -1  # already chosen
        assert summed[(every == perms[i]).all(1)].item() == summed.max(), i


def test_sizes_scale_with_the_image_size():
    assert jigsaw.jigsaw_sizes(224) == (256, 255, 85, 64)  # the reference's Resize, RandomCrop, cell and tile
    assert jigsaw.jigsaw_sizes(32) == (37, 36, 12, 9)


GRAY = [20 + 25 * k for k in range(9)]


def device_half(views):
    """The device half of the augmentation on one sample: (uint8 tiles, colour flags) -> normalised float tiles."""
    (tiles, flags), y = views
    assert tiles.dtype == torch.uint8
    return jigsaw.to_device(tiles[None], "cpu", torch.contiguous_format, MEAN, STD, jigsaw.jigsaw_color, flags[None])[0], y


def test_tile_k_lands_in_slot_perm_k():
    """Cells of distinct constant gray levels (unchanged by grayscale and, to 1e-4, by the colour projection)."""
    a = np.zeros((256, 256, 3), np.uint8)
    for k, g in enumerate(GRAY):
        a[85 * (k // 3) : 85 * (k // 3 + 1) + (k // 3 == 2), 85 * (k % 3) : 85 * (k % 3 + 1) + (k % 3 == 2)] = g
    image, perms = Image.fromarray(a), jigsaw.hamming_permutations(50, 0)
    transform, labels = jigsaw.JigsawTransform(perms, 224), set()
    for seed in range(8):
        torch.manual_seed(seed)
        tiles, y = device_half(transform(image))
        assert tiles.shape == (9, 3, 64, 64)
        labels.add(y.item())
        for k in range(9):
            assert torch.allclose(tiles[perms[y, k]] * STD + MEAN, torch.full((3, 64, 64), GRAY[k] / 255), atol=1e-3), k
    assert len(labels) > 4  # several permutations were checked, not just an involution


def test_gray_half_projection_quarter_original_quarter():
    red = Image.new("RGB", (40, 40), (255, 0, 0))
    transform = jigsaw.JigsawTransform(jigsaw.hamming_permutations(2, 0), 32)
    expected = {"gray": (76 / 255,) * 3, "projected": (0.8333, 0.3333, -0.1667), "as is": (1.0, 0.0, 0.0)}
    counts = collections.Counter()
    for seed in range(200):
        torch.manual_seed(seed)
        pixel = (device_half(transform(red))[0] * STD + MEAN)[0, :, 0, 0]
        counts[next(n for n, v in expected.items() if torch.allclose(pixel, torch.tensor(v), atol=1e-3))] += 1
    assert 80 < counts["gray"] < 120 and 30 < counts["projected"] < 70 and 30 < counts["as is"] < 70, counts


def test_bn_statistics_are_per_tile_slot():
    torch.manual_seed(0)
    model = jigsaw.Jigsaw("resnet18", {"small_stem": False}, num_perms=5).train()
    tiles = [torch.randn(4, 3, 8, 8) + s for s in range(9)]  # every slot has its own mean
    loss, hits = model(tiles, torch.zeros(4, dtype=torch.long))
    assert torch.isfinite(loss) and 0 <= hits <= 4
    expected = torch.zeros(64)
    with torch.no_grad():
        for x in tiles:  # one BN update per slot (momentum 0.1), in slot order
            expected = 0.9 * expected + 0.1 * model.trunk.conv1(x).mean((0, 2, 3))
    assert model.trunk.bn1.num_batches_tracked.item() == 9
    assert torch.allclose(model.trunk.bn1.running_mean, expected, atol=1e-6)


def test_weight_decay_follows_the_reference_names():
    model = jigsaw.Jigsaw("resnet18", {}, num_perms=10)
    decay, no_decay = jigsaw.param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0
    assert len(decayed) == 20 + 3 + 1  # 20 convolutions, the 3 downsample BN weights (quirk), fc.weight
    assert "trunk.layer2.0.downsample.1.weight" in decayed and "fc.weight" in decayed
    assert not {"trunk.bn1.weight", "trunk.layer1.0.bn2.weight", "trunk.layer2.0.downsample.1.bias", "fc.bias"} & decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_defaults_and_schedule_are_the_reference_recipe():
    args = jigsaw.parse_args(["--train-list", "x", "--out", "y"])
    assert (args.epochs, args.batch_size, args.lr, args.num_perms, args.weight_decay) == (105, 256, 0.01, 2000, 1e-4)
    lrs = [jigsaw.step_lr(args.lr, e, args.milestones) for e in (0, 29, 30, 59, 60, 90, 99, 100, 104)]
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6])


def train(demo, out, *extra, script="jigsaw.py", tiny=TINY, check=True):
    """A trainer on the demo data, one thread per process (two would spin-wait on 2 busy cores). tests/test_rotnet.py
    uses this and the run helpers below with its own script and flags."""
    return run(script, "--train-list", demo / "train_poisoned.txt", "--out", out, *tiny, *extra, check=check,
               env={"OMP_NUM_THREADS": "1"})


def probe_every_layer(demo, tmp_path, checkpoint, method):
    """linear_probe.py accepts the checkpoint with every --layer (in this process: 6 interpreter starts cost more)."""
    for layer in ["final", *linear_probe.POOL]:
        metrics = probe(demo, checkpoint, tmp_path / layer, "--layer", layer)
        assert metrics["method"] == method and metrics["layer"] == layer


def torchrun(demo, out, script="jigsaw.py", tiny=TINY):
    """1 epoch with 2 CPU processes (Gloo) -> (stdout, log records); the checkpoint loads strictly into a ResNet-18."""
    log, _, stdout = torchrun2(script, "--train-list", demo / "train_poisoned.txt", "--out", out, *tiny,
                               "--epochs", "1")
    linear_probe.load_encoder(str(out / "checkpoint.pt"))
    assert log[0]["world_size"] == 2 and log[0]["steps_per_epoch"] == 48 // 16 and log[-1]["epoch"] == 1
    return stdout, log


def test_smoke_run_checkpoint_is_accepted_by_linear_probe_at_every_layer(demo, tmp_path):
    train(demo, tmp_path / "j", "--epochs", "1")
    ckpt = torch.load(tmp_path / "j" / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "jigsaw" and ckpt["feature_dim"] == 512 and ckpt["image_size"] == 16
    assert torch.equal(ckpt["perms"], jigsaw.hamming_permutations(24, 0))
    assert set(ckpt["encoder"]) == set(jigsaw.build_backbone("resnet18", {})[0].state_dict())
    json.dumps(ckpt["args"])
    log = read_log(tmp_path / "j")
    assert log[0]["tile"] == 5 and log[-1]["epoch"] == 1 and log[-1]["images_per_s"] > 0
    probe_every_layer(demo, tmp_path, tmp_path / "j" / "checkpoint.pt", "jigsaw")


def test_resume_continues_exactly(demo, tmp_path):
    # batches of 24; the one-run a uses 2 workers, b none: the worker count must not matter
    a, b = assert_resume_is_exact(lambda out, *args: train(demo, out, "--batch-size", "24", *args), tmp_path,
                                  "--workers", "2")
    assert torch.equal(a["perms"], b["perms"])


def test_torchrun_two_processes(demo, tmp_path):
    stdout, _ = torchrun(demo, tmp_path / "d")
    assert "5 px tiles from 6 px cells of a 18 px crop, 24 permutations" in stdout


def test_bad_inputs(demo, tmp_path, random_ckpt):
    assert_missing_image_refused("jigsaw.py", demo, tmp_path, *TINY)
    args = ["--train-list", str(demo / "train_poisoned.txt"), "--out", str(tmp_path / "j")]
    with pytest.raises(jigsaw.InputError, match="random.pt: not a jigsaw checkpoint"):
        jigsaw.main([*args, "--resume", str(random_ckpt)])
    with pytest.raises(jigsaw.InputError, match="--num-perms 0"):
        jigsaw.main([*args, "--num-perms", "0"])
