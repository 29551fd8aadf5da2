"""moco.py: InfoNCE, queue, momentum update, shuffle BN, smoke/torchrun/resume runs, bad input."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import moco
from conftest import ROOT, assert_missing_image_refused, assert_resume_is_exact, error_of, probe, read_log, run, torchrun2

TINY = ["--image-size", "16", "--batch-size", "8", "--queue-size", "16", "--workers", "0", "--dim", "16"]


def test_info_nce_hand_value():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # logits = [q.k, q.queue_0, q.queue_1] / tau = [0.6, 0, -1] / 0.5; the positive is class 0
    expected = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(0.0) + math.exp(-2.0)))
    assert moco.info_nce(q, k, queue, 0.5).item() == pytest.approx(expected, abs=1e-6)
    assert moco.info_nce(q, q, -q, 0.1).item() < 1e-8  # a perfect positive against a perfect negative


def tiny_model(K=8, m=0.9, bn_splits=2):
    torch.manual_seed(0)
    return moco.MoCo("resnet18", {"small_stem": False}, dim=4, K=K, m=m, tau=0.2, bn_splits=bn_splits)


def test_queue_pointer_wraps_and_keys_land_in_their_slots():
    model = tiny_model(K=8)
    batches = [torch.full((4, 4), float(i)) for i in range(3)]
    for b in batches:
        model.enqueue(b)
    assert model.queue_ptr.item() == 4  # 3 x 4 keys in a queue of 8: 12 mod 8
    assert torch.equal(model.queue[:4], batches[2]) and torch.equal(model.queue[4:], batches[1])


def test_momentum_update_is_exact():
    model = tiny_model(m=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
        model.encoder_q[0].bn1.running_mean.fill_(5.0)
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    q = [p.clone() for p in model.encoder_q.parameters()]
    model.momentum_update()
    for pk, k0, pq in zip(model.encoder_k.parameters(), before_k, q):
        assert torch.allclose(pk, k0 * 0.9 + pq * (1 - 0.9), rtol=0, atol=1e-6)  # up to float rounding
    assert torch.equal(model.encoder_k[0].bn1.running_mean, torch.zeros(64))  # parameters only, not BN statistics


def test_shuffled_keys_come_back_in_order():
    model = tiny_model(bn_splits=2).eval()  # BN on running statistics: chunking must not change anything
    x = torch.randn(6, 3, 16, 16)
    k = model.keys(x)
    direct = F.normalize(model.encoder_k(x), dim=1)
    assert torch.allclose(k, direct, atol=1e-5)
    model.train()  # train mode: each chunk has its own BN statistics, so the keys do depend on the shuffle
    torch.manual_seed(1)
    a = model.keys(x)
    torch.manual_seed(2)
    b = model.keys(x)
    assert not torch.allclose(a, b)


def test_forward_enqueues_after_the_loss():
    model = tiny_model(K=8)
    queue0 = model.queue.clone()
    x = torch.randn(4, 3, 16, 16)
    loss = model(x, x.flip(3))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.queue_ptr.item() == 4
    assert torch.equal(model.queue[4:], queue0[4:]) and not torch.equal(model.queue[:4], queue0[:4])


def train(demo, out, *extra, check=True):
    return run("moco.py", "--train-list", demo / "train_poisoned.txt", "--out", out, *TINY, *extra, check=check)


def test_smoke_run_checkpoint_is_accepted_by_linear_probe(demo, tmp_path):
    train(demo, tmp_path / "m", "--epochs", "1")
    ckpt = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "moco" and ckpt["feature_dim"] == 512 and ckpt["image_size"] == 16
    assert set(ckpt["encoder"]) == set(moco.build_backbone("resnet18", {})[0].state_dict())
    json.dumps(ckpt["args"])
    log = read_log(tmp_path / "m")
    assert log[-1]["epoch"] == 1 and log[-1]["images_per_s"] > 0 and "emulated" in log[0]["shuffle_bn"]
    assert probe(demo, tmp_path / "m" / "checkpoint.pt", tmp_path / "lp")["method"] == "moco"


def test_resume_continues_exactly(demo, tmp_path):
    assert_resume_is_exact(lambda out, *args: train(demo, out, *args), tmp_path)  # weights, key encoder, queue, pointer


def test_same_seed_same_weights_other_seed_differs(demo, tmp_path):
    train(demo, tmp_path / "a", "--epochs", "1", "--workers", "2")  # worker count must not matter
    train(demo, tmp_path / "b", "--epochs", "1")
    train(demo, tmp_path / "c", "--epochs", "1", "--seed", "1")
    a, b, c = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True)["encoder"] for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_torchrun_two_processes(demo, tmp_path):
    log, ckpt, _ = torchrun2("moco.py", "--train-list", demo / "train_poisoned.txt", "--out", tmp_path / "d", *TINY,
                             "--queue-size", "32", "--epochs", "1")
    state = ckpt["train_state"]["model"]
    steps = 48 // 8  # 48 images, global batch 8 (4 per process)
    assert state["queue_ptr"].item() == steps * 8 % 32 == 16  # every step enqueues the keys of both processes
    assert log[0]["world_size"] == 2 and "across 2 processes" in log[0]["shuffle_bn"] and log[0]["steps_per_epoch"] == steps


def test_bad_inputs(demo, tmp_path):
    assert_missing_image_refused("moco.py", demo, tmp_path, *TINY)
    text = open(demo / "train_poisoned.txt").read()
    for name, broken, problem in (("malformed", text.replace(" 0\n", "\n", 1), "expected '<image path> <integer"),
                                  ("negative", text.replace(" 0\n", " -1\n", 1), "label")):
        (tmp_path / f"{name}.txt").write_text(broken)
        line = error_of(run("moco.py", "--train-list", tmp_path / f"{name}.txt", "--out", tmp_path / name, *TINY,
                            check=False))
        assert f"{name}.txt:1: " in line and problem in line and not (tmp_path / name).exists()
    line = error_of(train(demo, tmp_path / "m", "--queue-size", "20", check=False))
    assert "--queue-size 20 must be divisible by the global batch size 8" in line
    bad = tmp_path / "bad.pt"
    torch.save({"method": "moco"}, bad)
    assert "not an encoder checkpoint" in error_of(train(demo, tmp_path / "m", "--resume", bad, check=False))


def test_query_bn_batch_is_the_reference_per_gpu_batch():
    torch.manual_seed(0)
    model = moco.MoCo("resnet18", {"small_stem": False}, dim=4, K=16, m=0.99, tau=0.2, bn_splits=2, bn_batch=4).train()
    x = torch.randn(8, 3, 16, 16)
    captured = []
    model.encoder_q.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    model(x, x.clone())
    assert [len(o) for o in captured] == [4, 4]  # two BN batches of 4, as on the reference's 2 GPUs
    with torch.no_grad():
        alone = model.encoder_q(x[:4])
    assert torch.allclose(alone, captured[0], atol=1e-5)  # the first 4 queries saw BN over themselves only


def test_masked_negatives_remove_only_poisoned_keys_of_poisoned_queries():
    """scripts/moco_masked_negatives.py: no mask is moco.info_nce; a masked negative leaves the softmax's denominator."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from moco_masked_negatives import masked_info_nce
    torch.manual_seed(0)
    q, k, queue = (F.normalize(torch.randn(n, 8), dim=1) for n in (3, 3, 5))
    none = torch.zeros(3, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)
    assert torch.allclose(masked_info_nce(q, k, queue, 0.2, *none), moco.info_nce(q, k, queue, 0.2))
    q_poison, queue_poison = torch.tensor([True, False, False]), torch.tensor([False, True, True, False, False])
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.2
    want = [-logits[i, 0] + torch.logsumexp(logits[i, [0, 1, 4, 5]] if i == 0 else logits[i], 0) for i in range(3)]
    assert torch.allclose(masked_info_nce(q, k, queue, 0.2, q_poison, queue_poison), torch.stack(want).mean())


def test_masked_negatives_diagnostic_runs_and_writes_a_moco_checkpoint(demo, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "moco_masked_negatives.py"), str(demo),
                           str(tmp_path / "m"), *TINY, "--epochs", "1"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "negatives masked per poisoned query" in proc.stdout
    log = read_log(tmp_path / "m")
    assert log[0]["poisons"] > 0 and log[-1]["epoch"] == 1 and log[-1]["masked_negatives_per_poisoned_query"] >= 0
    assert log[-1]["images_per_s"] > 0  # tables.py pair reads it
    assert moco.load_checkpoint(str(tmp_path / "m" / "checkpoint.pt"))["method"] == "moco"
