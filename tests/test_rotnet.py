"""rotnet.py: rotation direction and labels, the x4 batch, the lr look-up table; smoke, torchrun and resume runs,
bad input."""
import json

import pytest
import torch

import rotnet
import test_jigsaw  # the run helpers (train, probe every layer, torchrun) are shared
from conftest import assert_missing_image_refused, assert_resume_is_exact, read_log

TINY = ["--image-size", "16", "--batch-size", "16", "--workers", "0"]


def test_rotations_are_counter_clockwise_with_labels_0_to_3():
    x = torch.arange(16.0).view(1, 1, 4, 4)  # rows [0 1 2 3], [4 5 6 7], ...
    x4, y = rotnet.rotations(x)
    assert y.tolist() == [0, 1, 2, 3]
    assert x4[0, 0].tolist() == x[0, 0].tolist()
    assert x4[1, 0].tolist() == [[3, 7, 11, 15], [2, 6, 10, 14], [1, 5, 9, 13], [0, 4, 8, 12]]  # the right edge on top
    assert x4[2, 0].tolist() == [[15, 14, 13, 12], [11, 10, 9, 8], [7, 6, 5, 4], [3, 2, 1, 0]]
    assert x4[3, 0].tolist() == [[12, 8, 4, 0], [13, 9, 5, 1], [14, 10, 6, 2], [15, 11, 7, 3]]  # the left edge on top


def test_every_image_is_in_the_batch_in_all_4_rotations():
    x = torch.randn(3, 3, 5, 5)
    x4, y = rotnet.rotations(x)
    assert x4.shape == (12, 3, 5, 5) and y.shape == (12,)
    for b in range(3):
        for k in range(4):
            found = [j for j in range(12) if torch.equal(x4[j], torch.rot90(x[b], k, dims=(-2, -1)))]
            assert len(found) == 1 and y[found[0]] == k, (b, k)


def test_defaults_and_the_reference_lr_table():
    args = rotnet.parse_args(["--train-list", "x", "--out", "y"])
    assert (args.epochs, args.batch_size, args.weight_decay) == (105, 128, 1e-4)
    table = [(30, 0.05), (60, 0.005), (90, 0.0005), (100, 0.00005)]  # the reference: first entry with max_epoch > epoch
    for epoch in range(args.epochs):
        expected = next((lr for max_epoch, lr in table if max_epoch > epoch), table[-1][1])
        assert rotnet.step_lr(args.lr, epoch, args.milestones) == pytest.approx(expected), epoch


def test_forward_is_4_way_cross_entropy():
    torch.manual_seed(0)
    model = rotnet.RotNet("resnet18", {"small_stem": False}).eval()
    x, y = rotnet.rotations(torch.randn(2, 3, 16, 16))
    loss, hits = model(x, y)
    logits = model.fc(model.backbone(x))
    assert model.fc.out_features == 4
    assert loss.item() == pytest.approx(-logits.log_softmax(1)[range(8), y].mean().item(), abs=1e-5)
    assert hits == (logits.argmax(1) == y).sum()


def train(demo, out, *extra, check=True):
    return test_jigsaw.train(demo, out, *extra, script="rotnet.py", tiny=TINY, check=check)


def test_smoke_run_checkpoint_is_accepted_by_linear_probe_at_every_layer(demo, tmp_path):
    train(demo, tmp_path / "r", "--epochs", "1")
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "rotnet" and ckpt["feature_dim"] == 512 and ckpt["image_size"] == 16
    assert set(ckpt["encoder"]) == set(rotnet.build_backbone("resnet18", {})[0].state_dict())
    json.dumps(ckpt["args"])
    log = read_log(tmp_path / "r")
    assert log[-1]["epoch"] == 1 and log[-1]["images_per_s"] > 0 and 0 <= log[-1]["pretext_acc"] <= 100
    test_jigsaw.probe_every_layer(demo, tmp_path, tmp_path / "r" / "checkpoint.pt", "rotnet")


def test_resume_continues_exactly(demo, tmp_path):
    # batches of 24; the one-run a uses 2 workers, b none: the worker count must not matter
    assert_resume_is_exact(lambda out, *args: train(demo, out, "--batch-size", "24", *args), tmp_path, "--workers", "2")


def test_torchrun_two_processes(demo, tmp_path):
    stdout, _ = test_jigsaw.torchrun(demo, tmp_path / "d", script="rotnet.py", tiny=TINY)
    assert "32 rotated samples per process" in stdout  # 16 images over 2 processes, x4


def test_bad_inputs(demo, tmp_path, random_ckpt):
    assert_missing_image_refused("rotnet.py", demo, tmp_path, *TINY)
    args = ["--train-list", str(demo / "train_poisoned.txt"), "--out", str(tmp_path / "r")]
    with pytest.raises(rotnet.InputError, match="random.pt: not a rotnet checkpoint"):
        rotnet.main([*args, "--resume", str(random_ckpt)])
