"""compress_defense.py: KL(teacher || student), aligned banks, momentum update, frozen teacher, 1q, pipeline, torchrun
and resume runs, bad input."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compress_defense as cd
from conftest import assert_resume_is_exact, error_of, probe, read_log, run, torchrun2

TINY = ["--batch-size", "8", "--workers", "0"]  # the image size (16 px) comes from the teacher checkpoint


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_loss_is_kl_teacher_to_student_batch_mean():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    bank = torch.eye(2)
    # row 1: p = softmax([0.6, 0.8] / 0.5) (teacher), q = softmax([1, 0] / 0.5) (student); row 2: p = q, KL 0
    p, q = softmax([1.2, 1.6]), softmax([2.0, 0.0])
    expected = sum(a * math.log(a / b) for a, b in zip(p, q)) / 2  # KL(p || q) = 0.651; KL(q || p) would be 0.500
    assert cd.compress_loss(s, t, bank, bank, 0.5).item() == pytest.approx(expected, abs=1e-6)


def test_loss_is_zero_only_for_the_same_distributions():
    torch.manual_seed(0)
    s, other, bank = (F.normalize(torch.randn(n, 8), dim=1) for n in (4, 4, 16))
    assert cd.compress_loss(s, s, bank, bank, 0.04).abs().item() < 1e-6
    assert cd.compress_loss(s, other, bank, bank, 0.04).item() > 0.1
    assert cd.compress_loss(s, s, bank, bank[torch.randperm(16)], 0.04).item() > 0.1  # banks out of alignment


def test_bank_init_is_uniform_with_unit_expected_norm():
    torch.manual_seed(0)
    a, b = cd.init_bank(2000, 48), cd.init_bank(2000, 48)
    stdv = 1 / math.sqrt(48 / 3)
    assert a.abs().max().item() <= stdv and a.abs().max().item() > 0.99 * stdv
    assert (a * a).sum(1).mean().item() == pytest.approx(1.0, abs=0.02)
    assert not torch.equal(a, b)


def small_teacher(dim=8):
    return nn.Sequential(nn.Conv2d(3, dim, 3), nn.BatchNorm2d(dim), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_model(variant="2q", K=10, alpha=0.9, teacher=None):
    torch.manual_seed(0)
    teacher = teacher if teacher is not None else small_teacher()
    return cd.CompReSS(teacher, 8, "resnet18", {"small_stem": False}, variant, K, alpha, tau=0.04)


def test_enqueue_writes_both_banks_at_the_same_slots_and_wraps():
    model = tiny_model(K=10)
    for b in range(3):  # images 0..11 in batches of 4; row value = image id in both banks
        ids = torch.arange(4 * b, 4 * b + 4, dtype=torch.float)[:, None]
        model.enqueue(ids.expand(4, 8), ids.expand(4, 512))
    assert model.ptr.item() == 2  # 12 mod 10
    expected = torch.tensor([10, 11, 2, 3, 4, 5, 6, 7, 8, 9], dtype=torch.float)
    assert torch.equal(model.bank_t[:, 0], expected) and torch.equal(model.bank_s[:, 0], expected)


def test_forward_uses_the_banks_before_this_batch_and_aligns_the_slots():
    model = tiny_model(K=6).train()
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    bank_t0, bank_s0 = model.bank_t.clone(), model.bank_s.clone()
    loss = model(x1)
    with torch.no_grad():  # train-mode BN: recomputing on the same batch gives the same features
        t1, k1 = (F.normalize(net(x1), dim=1) for net in (model.teacher, model.student_k))
        s1 = F.normalize(model.student(x1), dim=1)
    assert loss.item() == pytest.approx(cd.compress_loss(s1, t1, bank_s0, bank_t0, 0.04).item(), rel=1e-5)
    assert loss.item() != pytest.approx(cd.compress_loss(s1, t1, model.bank_s, model.bank_t, 0.04).item(), rel=1e-3)
    assert torch.allclose(model.bank_t[:4], t1, atol=1e-5) and torch.allclose(model.bank_s[:4], k1, atol=1e-5)
    assert torch.equal(model.bank_t[4:], bank_t0[4:]) and model.ptr.item() == 4
    model(x2)
    with torch.no_grad():
        t2, k2 = (F.normalize(net(x2), dim=1) for net in (model.teacher, model.student_k))
    slots = [4, 5, 0, 1]  # slot j holds the same image in both banks, across the wrap
    assert torch.allclose(model.bank_t[slots], t2, atol=1e-5) and torch.allclose(model.bank_s[slots], k2, atol=1e-5)
    assert torch.allclose(model.bank_t[2:4], t1[2:], atol=1e-5) and model.ptr.item() == 2


def test_momentum_update_is_exact():
    model = tiny_model(alpha=0.9)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
        model.student.bn1.running_mean.fill_(5.0)
    before_k = [p.clone() for p in model.student_k.parameters()]
    s = [p.clone() for p in model.student.parameters()]
    model.momentum_update()
    for pk, k0, ps in zip(model.student_k.parameters(), before_k, s):
        assert torch.allclose(pk, k0 * 0.9 + ps * (1 - 0.9), rtol=0, atol=1e-6)
    assert torch.equal(model.student_k.bn1.running_mean, torch.zeros(64))  # parameters only, not BN statistics


def test_teacher_gets_no_gradient_and_does_not_change():
    teacher = small_teacher().train()  # handed over trainable and in train mode: CompReSS must freeze it
    model = tiny_model(teacher=teacher)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student0 = model.student.conv1.weight.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                                weight_decay=0.1)
    model.train()
    for _ in range(2):
        loss = model(torch.randn(4, 3, 16, 16))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # weights and BN statistics
    assert not torch.equal(model.student.conv1.weight, student0)


def test_one_queue_maps_the_student_into_the_teacher_space():
    model = tiny_model("1q", K=6).train()
    assert model.fc.weight.shape == (8, 512) and not hasattr(model, "bank_s") and not hasattr(model, "student_k")
    x = torch.randn(4, 3, 16, 16)
    bank_t0 = model.bank_t.clone()
    loss = model(x)
    loss.backward()
    with torch.no_grad():
        t = F.normalize(model.teacher(x), dim=1)
        s = F.normalize(model.fc(model.student(x)), dim=1)
    assert loss.item() == pytest.approx(cd.compress_loss(s, t, bank_t0, bank_t0, 0.04).item(), rel=1e-5)
    assert torch.allclose(model.bank_t[:4], t, atol=1e-5) and model.fc.weight.grad is not None


def distill(out, teacher, train_list, *extra, check=True):
    return run("compress_defense.py", "--teacher", teacher, "--train-list", train_list, "--out", out, *TINY, *extra,
               check=check)


def test_pipeline_poisoned_moco_teacher_to_linear_probe(demo, tmp_path):
    run("moco.py", "--train-list", demo / "train_poisoned.txt", "--out", tmp_path / "moco", "--image-size", "16",
        "--batch-size", "8", "--queue-size", "16", "--dim", "16", "--workers", "0", "--epochs", "1")
    teacher = tmp_path / "moco" / "checkpoint.pt"
    proc = distill(tmp_path / "c", teacher, demo / "train_labeled_25pct.txt", "--epochs", "1")
    assert "capped" in proc.stdout
    ckpt = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "compress" and ckpt["feature_dim"] == 512 and ckpt["image_size"] == 16
    assert ckpt["teacher"]["method"] == "moco" and ckpt["teacher"]["path"] == str(teacher)
    assert set(ckpt["encoder"]) == set(cd.build_backbone("resnet18", {})[0].state_dict())
    assert not any(k.startswith("teacher.") for k in ckpt["train_state"]["model"])
    json.dumps(ckpt["args"])
    log = read_log(tmp_path / "c")
    assert log[0]["bank_size"] == 12 and log[0]["bank_capped"] and log[-1]["epoch"] == 1  # 12 clean images
    assert probe(demo, tmp_path / "c" / "checkpoint.pt", tmp_path / "lp")["method"] == "compress"


def test_resume_continues_exactly_one_queue(demo, random_ckpt, tmp_path):
    lst = demo / "train_labeled_25pct.txt"  # 12 images: one step of 8 per epoch into a bank of 12, wrapping in epoch 2
    extra = ["--variant", "1q", "--milestones", "1"]
    # every tensor of the student, fc, bank and pointer, and the momentum buffers
    a, _ = assert_resume_is_exact(lambda out, *args: distill(out, random_ckpt, lst, *extra, *args), tmp_path)
    assert a["train_state"]["model"]["ptr"].item() == 16 % 12
    lrs = [r["lr"] for r in read_log(tmp_path / "a") if "lr" in r]
    assert lrs == pytest.approx([0.01, 0.002])  # x0.2 for epochs after the milestone, counted from 1
    assert a["train_state"]["model"]["fc.weight"].shape == (512, 512)  # 1q: the Linear layer is training state only
    assert set(a["encoder"]) == set(cd.build_backbone("resnet18", {})[0].state_dict())


def test_torchrun_two_processes(demo, random_ckpt, tmp_path):
    log, ckpt, _ = torchrun2("compress_defense.py", "--teacher", random_ckpt, "--train-list",
                             demo / "train_labeled_50pct.txt", "--out", tmp_path / "d", *TINY, "--bank-size", "20",
                             "--epochs", "1")
    state = ckpt["train_state"]["model"]
    assert state["ptr"].item() == 3 * 8 % 20 == 4  # 24 images, global batch 8: every step enqueues both processes' rows
    for bank in (state["bank_t"], state["bank_s"]):  # every slot overwritten by a normalised embedding
        assert torch.allclose(bank.norm(dim=1), torch.ones(20), atol=1e-5)
    assert log[0]["world_size"] == 2 and log[0]["steps_per_epoch"] == 3


def test_bad_inputs(demo, random_ckpt, tmp_path):
    lst = demo / "train_labeled_50pct.txt"
    bad = tmp_path / "bad.pt"
    torch.save({"method": "moco"}, bad)
    assert "not an encoder checkpoint" in error_of(distill(tmp_path / "c", bad, lst, check=False))
    line = error_of(distill(tmp_path / "c", random_ckpt, lst, "--bank-size", "4", check=False))
    assert "--bank-size 4 is smaller than the global batch size 8" in line
    line = error_of(distill(tmp_path / "c", random_ckpt, lst, "--resume", random_ckpt, check=False))
    assert "not a compress checkpoint" in line
