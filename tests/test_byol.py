"""byol.py: regression loss, tau and lr schedules, EMA, view pairing; smoke/torchrun/resume runs, bad input."""
import json
import math

import pytest
import torch

import byol
from conftest import assert_missing_image_refused, assert_resume_is_exact, error_of, probe, read_log, run, torchrun2

TINY = ["--image-size", "16", "--batch-size", "8", "--workers", "0", "--dim", "16", "--hidden", "32",
        "--warmup-iters", "3"]


def schedule_args(*extra):
    return byol.parse_args(["--train-list", "unused", "--out", "unused", *extra])


def test_regression_loss_hand_value():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[0.6, 0.8], [0.0, -3.0]])
    # cos = 0.6 and -1 (lengths do not matter): mean(2 - 1.2, 2 + 2) = 2.4
    assert byol.regression_loss(p, z).item() == pytest.approx(2.4, abs=1e-6)


def test_tau_first_middle_last_epoch():
    args = schedule_args("--epochs", "4")
    last = 1 - 0.01 * (1 + math.cos(math.pi * 3 / 4)) / 2  # = 1 - 0.01 * 0.1464...
    assert [byol.cosine_tau(e, args) for e in (0, 2, 3)] == pytest.approx([0.99, 0.995, last], abs=1e-12)
    assert last == pytest.approx(0.998536, abs=1e-6)


def test_lr_warmup_and_drops():
    args = schedule_args()  # the paper: 2e-3, 500 warmup iterations, x0.2 at epochs 150 and 175 of 200
    lr = [byol.learning_rate(epoch, it, args) for epoch, it in [(0, 0), (0, 249), (2, 499), (149, 9999), (150, 9999),
                                                                  (175, 9999), (199, 9999)]]
    assert lr == pytest.approx([2e-3 / 500, 1e-3, 2e-3, 2e-3, 4e-4, 8e-5, 8e-5])
    short = schedule_args("--epochs", "30", "--warmup-iters", "0")  # drop 50 would be at epoch -20: never
    assert [byol.learning_rate(e, 0, short) for e in (0, 4, 5, 29)] == pytest.approx([2e-3, 2e-3, 4e-4, 4e-4])


def tiny_model():
    torch.manual_seed(0)
    model = byol.BYOL("resnet18", {"small_stem": False}, hidden=8, dim=4)
    with torch.no_grad():  # online and target differ, as after some training
        for p in model.online.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_update_target_is_exact():
    model = tiny_model()
    model.online[0].bn1.running_mean.fill_(5.0)
    before = [p.clone() for p in model.target.parameters()]
    online = [p.clone() for p in model.online.parameters()]
    model.update_target(0.9)
    for pt, t0, po in zip(model.target.parameters(), before, online):
        assert torch.allclose(pt, 0.9 * t0 + 0.1 * po, rtol=0, atol=1e-6)
    assert torch.equal(model.target[0].bn1.running_mean, torch.zeros(64))  # parameters only, not BN statistics


def test_each_view_predicts_the_other_views_target():
    model = tiny_model()
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    loss = model(x1, x2)
    loss.backward()
    p1, p2 = (model.predictor(model.online(x)) for x in (x1, x2))  # train mode: batch statistics, same outputs
    z1, z2 = (model.target(x) for x in (x1, x2))
    assert loss.item() == pytest.approx((byol.regression_loss(p1, z2) + byol.regression_loss(p2, z1)).item(), abs=1e-5)
    assert loss.item() != pytest.approx((byol.regression_loss(p1, z1) + byol.regression_loss(p2, z2)).item(), abs=1e-3)
    assert all(p.grad is None for p in model.target.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())


def train(demo, out, *extra, check=True):
    return run("byol.py", "--train-list", demo / "train_poisoned.txt", "--out", out, *TINY, *extra, check=check,
               env={"OMP_NUM_THREADS": "1"})


def test_smoke_run_checkpoint_is_accepted_by_linear_probe(demo, tmp_path):
    train(demo, tmp_path / "m", "--epochs", "1")
    ckpt = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "byol" and ckpt["feature_dim"] == 512 and ckpt["image_size"] == 16
    assert set(ckpt["encoder"]) == set(byol.build_backbone("resnet18", {})[0].state_dict())
    json.dumps(ckpt["args"])
    log = read_log(tmp_path / "m")
    # 6 steps of warmup over 3 iterations: the last lr is the full one; tau at epoch 0 is tau_base
    assert log[-1]["epoch"] == 1 and log[-1]["lr"] == 2e-3 and log[-1]["tau"] == 0.99 and log[-1]["images_per_s"] > 0
    assert probe(demo, tmp_path / "m" / "checkpoint.pt", tmp_path / "lp")["method"] == "byol"


def test_resume_continues_exactly(demo, tmp_path):
    assert_resume_is_exact(lambda out, *args: train(demo, out, *args), tmp_path)  # online, predictor, target, Adam


def test_torchrun_two_processes(demo, tmp_path):
    log, ckpt, _ = torchrun2("byol.py", "--train-list", demo / "train_poisoned.txt", "--out", tmp_path / "d", *TINY,
                             "--epochs", "1")
    assert log[0]["world_size"] == 2 and log[0]["steps_per_epoch"] == 48 // 8 and math.isfinite(log[-1]["loss"])
    state = ckpt["train_state"]["model"]
    assert not torch.equal(state["online.1.0.weight"], state["target.1.0.weight"])  # the optimizer and the EMA ran


def test_bad_inputs(demo, tmp_path, random_ckpt):
    assert_missing_image_refused("byol.py", demo, tmp_path, *TINY)
    line = error_of(train(demo, tmp_path / "m", "--resume", random_ckpt, check=False))
    assert "random.pt: not a byol checkpoint with training state (its method: random)" in line


def test_bn_batch_emulates_the_reference_per_gpu_batch():
    """--bn-batch 4 on a batch of 8: the backbones' BN statistics per half (the reference's DataParallel GPUs), the
    projector, predictor and target projector over all 8 (the reference runs them outside DataParallel)."""
    torch.manual_seed(0)
    model = byol.BYOL("resnet18", {"small_stem": False}, hidden=16, dim=8).train()
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    chunked = model(x1, x2, bn_batch=4)
    model.load_state_dict(state)
    with torch.no_grad():
        halves = lambda net, x: torch.cat([net(x[:4]), net(x[4:])])  # noqa: E731
        p1, p2 = (model.predictor(model.online[1](halves(model.online[0], x))) for x in (x1, x2))
        z1, z2 = (model.target[1](halves(model.target[0], x)) for x in (x1, x2))
        expected = byol.regression_loss(p1, z2) + byol.regression_loss(p2, z1)
    assert torch.allclose(chunked, expected, atol=1e-5)
    model.load_state_dict(state)
    all_per_gpu = sum(model(x1[i:i + 4], x2[i:i + 4], bn_batch=4) for i in (0, 4)) / 2  # heads on 4 images too
    model.load_state_dict(state)
    whole = model(x1, x2, bn_batch=8)
    assert not torch.allclose(chunked, all_per_gpu, atol=1e-4) and not torch.allclose(chunked, whole, atol=1e-4)
