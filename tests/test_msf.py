"""msf.py: mean-shift loss and neighbours, bank pointer, forward order (EMA, enqueue, search), the symmetrised loss, the
lr and momentum schedules; smoke/torchrun/resume runs, bank cap, bad input."""
import argparse
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import msf
from conftest import assert_missing_image_refused, assert_resume_is_exact, error_of, probe, read_log, run, torchrun2

TINY = ["--image-size", "16", "--batch-size", "8", "--workers", "0", "--dim", "16", "--hidden", "32"]


def test_loss_on_constructed_bank_hand_value():
    t, q = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    # t's 3 nearest rows: 0, 1, 4 (t . bank = 1, 0.8, 0.6); there q . bank = 0, 0.6, 0.8, so distances 2, 0.8, 0.4
    assert msf.nearest_neighbours(t, bank, 3).tolist() == [[0, 1, 4]]
    assert msf.mean_shift_loss(q, t, bank, 3).item() == pytest.approx(3.2 / 3, abs=1e-6)
    # had q chosen the neighbours (rows 2, 4, 1) the loss would be 0.4


def tiny_model(K=16, m=0.99, topk=5):
    torch.manual_seed(0)
    return msf.MSF("resnet18", {"small_stem": False}, hidden=8, dim=4, K=K, m=m, topk=topk)


def test_bank_pointer_wraps_and_targets_land_in_their_slots():
    model = tiny_model(K=8)
    batches = [torch.full((4, 4), float(i)) for i in range(3)]
    for b in batches:
        model.enqueue(b)
    assert model.bank_ptr.item() == 4  # 3 x 4 targets in a bank of 8: 12 mod 8
    assert torch.equal(model.bank[:4], batches[2]) and torch.equal(model.bank[4:], batches[1])


def test_own_target_is_first_neighbour_and_k1_is_asymmetric_byol():
    model = tiny_model(K=16)
    t, q = F.normalize(torch.randn(4, 4), dim=1), F.normalize(torch.randn(4, 4), dim=1)
    model.enqueue(F.normalize(torch.randn(4, 4), dim=1))
    model.enqueue(t)  # slots 4..7
    assert msf.nearest_neighbours(t, model.bank, 5)[:, 0].tolist() == [4, 5, 6, 7]
    byol_asym = (2 - 2 * (q * t).sum(dim=1)).mean()
    assert msf.mean_shift_loss(q, t, model.bank, 1).item() == pytest.approx(byol_asym.item(), abs=1e-6)
    assert msf.mean_shift_loss(q, t, model.bank, 5).item() != pytest.approx(byol_asym.item(), abs=1e-3)


def test_forward_updates_target_then_enqueues_then_searches():
    model = tiny_model(K=16, m=0.5, topk=1)
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(0.1 * torch.randn_like(p))
    updated = copy.deepcopy(model.target)  # the target as the EMA leaves it
    with torch.no_grad():
        for pt, po in zip(updated.parameters(), model.online.parameters()):
            pt.mul_(0.5).add_(0.5 * po)
    im_q, im_t = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    loss = model(im_q, im_t)
    t = F.normalize(updated(im_t), dim=1)  # train mode: batch statistics, the same outputs again
    q = F.normalize(model.predictor(model.online(im_q)), dim=1)
    assert model.bank_ptr.item() == 4 and torch.allclose(model.bank[:4], t, atol=1e-5)
    assert loss.item() == pytest.approx((2 - 2 * (q * t).sum(dim=1)).mean().item(), abs=1e-5)  # k = 1: own target


def test_symmetric_forward_sums_both_directions_and_banks_both_targets():
    """k = 1 and --symmetric: BYOL's symmetrised loss, each view predicting the other's target."""
    model = tiny_model(K=16, m=0.5, topk=1)
    model.symmetric = True
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(0.1 * torch.randn_like(p))
    updated = copy.deepcopy(model.target)
    with torch.no_grad():
        for pt, po in zip(updated.parameters(), model.online.parameters()):
            pt.mul_(0.5).add_(0.5 * po)
    im_q, im_t = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    loss = model(im_q, im_t)
    with torch.no_grad():
        t_t, t_q = (F.normalize(updated(x), dim=1) for x in (im_t, im_q))
        q_q, q_t = (F.normalize(model.predictor(model.online(x)), dim=1) for x in (im_q, im_t))
    assert model.bank_ptr.item() == 8 and torch.allclose(model.bank[:8], torch.cat([t_t, t_q]), atol=1e-5)
    byol = (2 - 2 * (q_q * t_t).sum(dim=1)).mean() + (2 - 2 * (q_t * t_q).sum(dim=1)).mean()
    assert loss.item() == pytest.approx(byol.item(), abs=1e-5)


def test_schedules_hand_values():
    args = argparse.Namespace(lr=0.8, epochs=10, schedule="cosine", warmup_iters=0, m=0.99, m_schedule="constant")
    assert [msf.learning_rate(e, 0, args) for e in (0, 5)] == pytest.approx([0.8, 0.4])  # per-epoch cosine
    assert msf.target_momentum(7, args) == 0.99
    args.schedule, args.warmup_iters, args.m_schedule = "constant", 4, "cosine"
    assert [msf.learning_rate(9, it, args) for it in (0, 1, 3, 99)] == pytest.approx([0.2, 0.4, 0.8, 0.8])
    assert [msf.target_momentum(e, args) for e in (0, 5, 10)] == pytest.approx([0.99, 0.995, 1.0])


def test_view_kinds_match_their_sources():
    """weak = crop + flip only, strong = aug-plus (bilinear, grayscale 0.2), byol = byol.py's views exactly."""
    import byol
    weak, strong, byol_views = (msf.VIEWS[k](32) for k in ("weak", "strong", "byol"))
    assert (weak[1].p_jitter, weak[1].p_gray, weak[1].p_blur) == (0, 0, 0)
    assert (strong[0].bicubic, strong[1].p_gray, strong[1].p_blur) == (False, 0.2, 0.5)
    ref = byol.byol_aug(32)
    assert (byol_views[0].bicubic, byol_views[0].scale, byol_views[1].p_gray) == (True, (0.2, 1.0), 0.1)
    geometry = lambda crop: (crop.size, crop.scale, crop.ratio, crop.bicubic)  # noqa: E731
    assert geometry(byol_views[0]) == geometry(ref[0]) and vars(byol_views[1]) == vars(ref[1])
    assert msf.parse_args(["--train-list", "x", "--out", "y", "--augmentation", "strong/byol"]).augmentation == "strong/byol"


def test_bn_batch_emulates_the_reference_per_gpu_batch():
    """--bn-batch 4 on a batch of 8 (the reference's DataParallel GPUs): online and predictor BN over each half of
    the query batch; the target batch shuffled, then BN over each half of the shuffled batch, then unshuffled."""
    model = tiny_model(K=16, m=0.5, topk=2)
    model.bn_batch = 4
    im_q, im_t = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(1)
    loss = model(im_q, im_t)
    bank = model.bank.clone()
    model.load_state_dict(state)
    torch.manual_seed(1)
    with torch.no_grad():
        q = F.normalize(torch.cat([model.predictor(model.online(c)) for c in im_q.split(4)]), dim=1)
        model.momentum_update()
        perm = torch.randperm(8)
        t = F.normalize(torch.cat([model.target(c) for c in im_t[perm].split(4)]), dim=1)[torch.argsort(perm)]
        assert not torch.equal(perm[:4].sort().values, torch.arange(4))  # the target's halves hold other images
        model.enqueue(t)
        expected = msf.mean_shift_loss(q, t, model.bank, 2)
    assert torch.allclose(bank, model.bank, atol=1e-5) and loss.item() == pytest.approx(expected.item(), abs=1e-5)
    model.load_state_dict(state)
    model.bn_batch = 8
    assert model(im_q, im_t).item() != pytest.approx(loss.item(), abs=1e-4)  # one BN batch of 8 differs


def train(demo, out, *extra, check=True):
    return run("msf.py", "--train-list", demo / "train_poisoned.txt", "--out", out, *TINY, *extra, check=check,
               env={"OMP_NUM_THREADS": "1"})


def test_smoke_run_caps_the_bank_and_linear_probe_accepts_it(demo, tmp_path):
    proc = train(demo, tmp_path / "m", "--epochs", "1")  # default --bank-size 1,024,000 > 48 images
    assert "bank 48 (--bank-size 1024000 capped at one epoch's 48 images)" in proc.stdout
    ckpt = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "msf" and ckpt["feature_dim"] == 512 and ckpt["image_size"] == 16
    assert set(ckpt["encoder"]) == set(msf.build_backbone("resnet18", {})[0].state_dict())
    assert ckpt["train_state"]["model"]["bank"].shape == (48, 16)
    json.dumps(ckpt["args"])
    log = read_log(tmp_path / "m")
    assert log[0]["bank_size"] == 48 and log[-1]["epoch"] == 1 and 0 <= log[-1]["loss"] <= 4
    assert probe(demo, tmp_path / "m" / "checkpoint.pt", tmp_path / "lp")["method"] == "msf"


def test_resume_continues_exactly(demo, tmp_path):
    assert_resume_is_exact(lambda out, *args: train(demo, out, *args), tmp_path)  # online, predictor, target, bank


def test_adam_symmetric_and_schedules_resume_exactly(demo, tmp_path):
    flags = ["--optimizer", "adam", "--lr", "1e-3", "--symmetric", "--schedule", "constant", "--warmup-iters", "4",
             "--m-schedule", "cosine", "--bank-size", "32"]
    a, _ = assert_resume_is_exact(lambda out, *args: train(demo, out, *flags, *args), tmp_path)
    state = next(iter(a["train_state"]["optimizer"]["state"].values()))
    assert {"exp_avg", "exp_avg_sq"} <= set(state) and "momentum_buffer" not in state
    assert a["train_state"]["model"]["bank_ptr"].item() == 2 * 6 * 2 * 8 % 32  # 2 epochs x 6 steps x both views' 8
    log = read_log(tmp_path / "a")
    assert [r["m"] for r in log[1:]] == pytest.approx([0.99, 0.995]) and log[-1]["lr"] == pytest.approx(1e-3)


def test_torchrun_two_processes(demo, tmp_path):
    log, ckpt, _ = torchrun2("msf.py", "--train-list", demo / "train_poisoned.txt", "--out", tmp_path / "d", *TINY,
                             "--bank-size", "32", "--epochs", "1")
    state = ckpt["train_state"]["model"]
    steps = 48 // 8  # 48 images, global batch 8 (4 per process)
    assert state["bank_ptr"].item() == steps * 8 % 32 == 16  # every step enqueues the targets of both processes
    assert torch.allclose(state["bank"].norm(dim=1), torch.ones(32))
    assert log[0]["world_size"] == 2 and log[0]["bank_size"] == 32 and log[0]["steps_per_epoch"] == steps


def test_bad_inputs(demo, tmp_path, random_ckpt):
    assert_missing_image_refused("msf.py", demo, tmp_path, *TINY)
    line = error_of(train(demo, tmp_path / "m", "--bank-size", "20", check=False))
    assert "--bank-size 20 must be divisible by the global batch size 8" in line
    line = error_of(train(demo, tmp_path / "m", "--warmup-iters", "-1", check=False))
    assert "--warmup-iters -1: must be >= 0" in line
    line = error_of(train(demo, tmp_path / "m", "--resume", random_ckpt, check=False))
    assert "random.pt: not a msf checkpoint with training state (its method: random)" in line
