"""badencoder.py: loss terms, frozen BN and clean encoder, trigger stamping, pipeline/torchrun/resume runs, bad input."""
import json
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import badencoder
import moco
import poison
from conftest import assert_resume_is_exact, error_of, probe, read_log, run, torchrun2

TINY = ["--batch-size", "8", "--workers", "0"]
VIT = {"image_size": 16, "patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # 16 px models gain nothing from more; idle threads spin on a busy machine


pytestmark = pytest.mark.usefixtures("one_thread")  # 16 px models gain nothing from more threads


def test_loss_terms_on_constructed_features():
    # B = 2 shadow images, K = 2 pairs, D = 2; lengths must not matter (cosine similarity)
    z_bd = torch.tensor([[[2.0, 0.0], [-1.0, 0.0]], [[0.0, 3.0], [3.0, 4.0]]])  # (B, K, D)
    r = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)  # f'(ref_k)
    r_aug = torch.tensor([[[0.0, 1.0], [0.0, -5.0]], [[1.0, 1.0], [3.0, 0.0]]])  # f'(aug(ref_k))
    r_c = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # f(ref_k): not parallel to r, so r and r_c cannot be mixed up
    z, z_c = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    l0, l1, l2 = badencoder.badencoder_loss(z, z_bd, r, r_aug, z_c, r_c)
    assert l0.item() == pytest.approx(-(1 + 0 + 0 + 0.8) / 4)  # cosines (b, k): (0,0) 1, (0,1) 0, (1,0) 0, (1,1) 0.8
    assert l1.item() == pytest.approx(-(1 + 0 + 1 / math.sqrt(2) + 1) / 4)
    assert l2.item() == pytest.approx(-0.5)
    l0.backward()
    assert r.grad is not None and r.grad.abs().sum() > 0  # L0 pulls the reference too (not detached)


@pytest.mark.parametrize("arch,kwargs", [("resnet18", {"small_stem": False}), ("vit", VIT)])
def test_identical_encoders_start_at_minus_one(arch, kwargs):
    torch.manual_seed(0)
    f, _ = badencoder.build_backbone(arch, kwargs)
    model = badencoder.BadEncoder(f).train()  # batch-statistics BN in f' would make L2 > -1
    x, x_bd, ref = torch.randn(4, 3, 16, 16), torch.randn(4, 2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        l0, l1, l2 = model(x, x_bd, ref.expand(4, -1, -1, -1, -1), ref)  # un-augmented references
        cos = torch.nn.functional.cosine_similarity(model.f(x_bd.flatten(0, 1)).view(4, 2, -1), model.f(ref), dim=-1)
    assert l1.item() == pytest.approx(-1, abs=1e-5) and l2.item() == pytest.approx(-1, abs=1e-5)
    assert l0.item() == pytest.approx(-cos.mean().item(), abs=1e-5)  # x_bd[:, k] is paired with ref[k]


def test_step_keeps_bn_and_clean_encoder_frozen():
    torch.manual_seed(0)
    model = badencoder.BadEncoder(badencoder.build_backbone("resnet18", {"small_stem": False})[0])
    bn_before = [{k: v.clone() for k, v in m.state_dict().items()} for m in model.bn_layers()]
    f_before = {k: v.clone() for k, v in model.f.state_dict().items()}
    conv_before = model.f_bd.conv1.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    assert model.training and not model.f.training and not any(m.training for m in model.bn_layers())
    x, ref = torch.randn(4, 3, 16, 16), torch.randn(1, 3, 16, 16)
    sum(model(x, torch.randn(4, 1, 3, 16, 16), torch.randn(4, 1, 3, 16, 16), ref)).backward()
    optimizer.step()
    assert all(p.grad is None for p in model.f.parameters())
    assert all(torch.equal(v, model.f.state_dict()[k]) for k, v in f_before.items())
    for m, before in zip(model.bn_layers(), bn_before):  # running statistics, counters and affine parameters
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(model.f_bd.conv1.weight, conv_before)


def test_stamp_places_the_trigger_exactly():
    gray = Image.fromarray(np.full((12, 12, 3), 100, np.uint8))
    e = (np.arange(27, dtype=np.uint8) + 200).reshape(3, 3, 3)
    assert badencoder.corner(32, 10, "bottom-right", None) == 21  # BadEncoder's rows/cols 21..30 of 32
    x = badencoder.corner(12, 3, "bottom-right", None)
    expect = np.full((12, 12, 3), 100, np.uint8)
    expect[2:5, 8:11] = e  # y = 2 (rows), x = 8 (cols); row/col 11 is the 1-px margin
    assert np.array_equal(np.asarray(badencoder.stamp(gray, e, x, 2, 1.0)), expect)
    half = np.asarray(badencoder.stamp(gray, np.full((3, 3, 3), 255, np.uint8), 0, 0, 0.5))
    assert half[0, 0, 0] == 178 and half[3, 3, 0] == 100  # round(0.5 * 255 + 0.5 * 100)


def test_random_corner_covers_poison_val_range():
    random.seed(0)
    seen = {badencoder.corner(32, 7, "random", (0.1, 0.9)) for _ in range(2000)}
    lo = poison.place(32, 32, 7, "random", (0.1, 0.9), (0.0, 0.0))[0]
    hi = poison.place(32, 32, 7, "random", (0.1, 0.9), (0.999999, 0.999999))[0]
    assert seen == set(range(lo, hi + 1)) == set(range(3, 22))


def test_shadow_views_stamp_in_pixel_space_and_augment_each_element(tmp_path):
    Image.fromarray(np.full((20, 20, 3), 100, np.uint8)).save(tmp_path / "gray.png")
    ref = Image.fromarray(np.stack(np.broadcast_arrays(np.arange(16)[None] * 15, 50, 200), -1).astype(np.uint8))
    white = np.full((4, 4, 3), 255, np.uint8)
    views = badencoder.ShadowViews(16, [white], [ref], "random", (0.1, 0.9), 1.0)
    normalised = lambda x, *a: badencoder.to_device(x, "cpu", torch.contiguous_format, MEAN, STD, *a)
    items = []
    for i in range(8):  # the host half (uint8), then the device half (normalisation, the reference's colour ops)
        x, x_bd, (r, p) = badencoder.FileList([(str(tmp_path / "gray.png"), 0)] * 8, views)[(0, i)][0]
        assert x.dtype == x_bd.dtype == r.dtype == torch.uint8 and p.shape == (1, 11)
        items.append((normalised(x[None])[0], normalised(x_bd), normalised(r, views.color, p)))
    corners = set()
    for x, x_bd, r_aug in items:
        changed = (x_bd[0] != x).any(0).nonzero()
        (y0, x0), (y1, x1) = changed.min(0).values.tolist(), changed.max(0).values.tolist()
        assert (y1 - y0, x1 - x0, len(changed)) == (3, 3, 16) and 1 <= min(y0, x0) and max(y0, x0) <= 10
        white_normalised = (1 - torch.tensor(MEAN)) / torch.tensor(STD)  # 255 pasted before normalisation
        assert torch.allclose(x_bd[0, :, y0, x0], white_normalised, atol=1e-6)
        corners.add((y0, x0))
    assert len(corners) > 1  # a new position per image
    assert len({r_aug.sum().item() for _, _, r_aug in items}) == 8  # a fresh augmentation per batch element


def reference_list(demo, tmp_path, n=1, target=1):
    lines = [ln.rsplit(None, 1)[0] for ln in open(demo / "train_clean.txt") if ln.split()[-1] == str(target)][:n]
    path = tmp_path / "reference.txt"
    path.write_text("".join(f"{demo / p} {target}\n" for p in lines))
    return path


def attack_args(demo, encoder, out, refs, *extra):
    return [str(v) for v in ("--encoder", encoder, "--shadow-list", demo / "train_clean.txt", "--reference-list", refs,
                             "--out", out, *TINY, *extra)]


def test_pipeline_moco_badencoder_linear_probe(demo, tmp_path):
    moco.main([str(v) for v in ("--train-list", demo / "train_clean.txt", "--out", tmp_path / "clean", "--image-size", 16,
                                "--queue-size", 16, "--dim", 16, "--epochs", 1, *TINY)])
    refs = reference_list(demo, tmp_path)
    run("badencoder.py", *attack_args(demo, tmp_path / "clean" / "checkpoint.pt", tmp_path / "bd", refs, "--trigger",
                                      demo / "trigger.png", "--trigger-location", "random", "--epochs", 1), env=ONE_THREAD)
    ckpt = torch.load(tmp_path / "bd" / "checkpoint.pt", weights_only=True)
    assert ckpt["method"] == "badencoder" and ckpt["source"]["method"] == "moco" and ckpt["source"]["epoch"] == 1
    assert (ckpt["arch"], ckpt["image_size"], ckpt["feature_dim"]) == ("resnet18", 16, 512)
    assert ckpt["arch_kwargs"] == {"small_stem": False}
    assert set(ckpt["encoder"]) == set(badencoder.build_backbone("resnet18", {})[0].state_dict())
    trigger = np.asarray(Image.open(demo / "trigger.png").convert("RGB"))
    assert torch.equal(ckpt["trigger"]["images"][0], torch.from_numpy(trigger.copy()))
    assert ckpt["trigger"]["location"] == "random" and ckpt["trigger"]["range"] == [0.1, 0.9]
    json.dumps(ckpt["args"])
    log = read_log(tmp_path / "bd")
    assert log[0]["source"]["method"] == "moco" and log[0]["references"] == 1
    last = log[-1]
    assert last["epoch"] == 1 and last["loss"] == pytest.approx(last["l0"] + last["l1"] + last["l2"], abs=1e-5)
    assert -1 <= last["l2"] < -0.9  # f' starts as f: clean embeddings stay put
    m = probe(demo, tmp_path / "bd" / "checkpoint.pt", tmp_path / "lp", "--classifier", "mlp", "--epochs", 2)
    assert m["method"] == "badencoder" and 0 <= m["asr"] <= 100 and 0 <= m["asr_all"] <= 100


def test_resume_continues_exactly(demo, random_ckpt, tmp_path):
    refs = reference_list(demo, tmp_path, n=2)  # two pairs: a white square and poison.py's trigger, random places
    extra = ["--trigger", "white", "--trigger", demo / "trigger.png", "--trigger-location", "random"]
    a, _ = assert_resume_is_exact(
        lambda out, *args: badencoder.main(attack_args(demo, random_ckpt, out, refs, *extra, *args)), tmp_path)
    assert len(a["trigger"]["images"]) == 2


def test_torchrun_two_processes(demo, random_ckpt, tmp_path):
    refs = reference_list(demo, tmp_path)
    log, ckpt, _ = torchrun2("badencoder.py", *attack_args(demo, random_ckpt, tmp_path / "d", refs, "--epochs", 1))
    assert log[0]["world_size"] == 2 and log[0]["steps_per_epoch"] == 48 // 8
    source, encoder = torch.load(random_ckpt, weights_only=True)["encoder"], ckpt["encoder"]
    for key in ("bn1.running_var", "bn1.weight", "layer4.1.bn2.running_mean"):  # BN frozen under DDP too
        assert torch.equal(encoder[key], source[key]), key
    assert not torch.equal(encoder["conv1.weight"], source["conv1.weight"])


def test_bad_inputs(demo, random_ckpt, tmp_path):
    refs = reference_list(demo, tmp_path)
    missing = tmp_path / "missing.txt"
    missing.write_text(open(refs).read().replace("demo_data", "nowhere"))
    proc = run("badencoder.py", *attack_args(demo, random_ckpt, tmp_path / "o", missing), env=ONE_THREAD, check=False)
    assert "missing.txt:1: image not found" in error_of(proc)
    argv = attack_args(demo, random_ckpt, tmp_path / "o", refs)
    with pytest.raises(badencoder.InputError, match="reference.txt: 1 reference image\\(s\\), 2 --trigger"):
        badencoder.main([*argv, "--trigger", "white", "--trigger", "white"])
    with pytest.raises(badencoder.InputError, match="random.pt: not a badencoder checkpoint"):
        badencoder.main([*argv, "--resume", str(random_ckpt)])


def test_images_of_the_input_size_are_used_natively():
    """A 16 px shadow image at --image-size 16 keeps its pixels (the reference's ToTensor + normalise); a 20 px one is
    resized to 18 and center-cropped to 16 (linear_probe.py's clean view)."""
    rng = np.random.default_rng(0)
    native, large = (Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)) for s in (16, 20))
    views = badencoder.ShadowViews(16, [np.full((4, 4, 3), 255, np.uint8)], [native], "bottom-right", None, 1.0)
    x, x_bd, (r, _) = views(native)
    assert torch.equal(x, torch.from_numpy(np.asarray(native)).permute(2, 0, 1))
    assert torch.equal(x_bd[0, :, :11, :11], x[:, :11, :11])  # only the bottom-right trigger box changed
    assert torch.equal(r[0], x) or torch.equal(r[0], x.flip(-1))  # the reference: native too (then flipped or not)
    zoomed = T.CenterCrop(16)(T.Resize(18)(large))
    assert torch.equal(views(large)[0], torch.from_numpy(np.asarray(zoomed)).permute(2, 0, 1))
    assert not torch.equal(views(large)[0], torch.from_numpy(np.asarray(large)[2:18, 2:18]).permute(2, 0, 1))
