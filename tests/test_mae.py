"""mae.py: sin-cos table, patchify, masking, masked loss, decoder order, frozen positions, lr schedule, runs, bad input."""
import argparse
import json
import math

import pytest
import torch
import torch.nn as nn
import torchvision

import mae
from conftest import assert_missing_image_refused, assert_resume_is_exact, probe, read_log, run, torchrun2

VIT = {"image_size": 16, "patch_size": 4, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 64}
TINY = ["--image-size", "16", "--patch-size", "4", "--width", "16", "--depth", "2", "--heads", "2", "--decoder-width", "16",
        "--decoder-depth", "1", "--decoder-heads", "2", "--batch-size", "8", "--workers", "0", "--warmup-epochs", "1"]


def tiny_mae(decoder_depth=1):
    torch.manual_seed(0)
    return mae.MAE(VIT, decoder_depth, 16, 2, mask_ratio=0.75, norm_pix_loss=True)


def test_sincos_table_known_values():
    s1, c1 = math.sin(1), math.cos(1)
    expected = [[0, 0, 0, 0], [0, 1, 0, 1], [s1, c1, 0, 1], [0, 1, s1, c1], [s1, c1, s1, c1]]  # [col sin/cos, row sin/cos]
    assert torch.allclose(mae.sincos_pos_embed(4, 2), torch.tensor(expected), atol=1e-7)
    table = mae.sincos_pos_embed(8, 3)  # frequencies 1 and 1/100; token (row 1, col 2) = k 5, table row 6
    assert table.shape == (10, 8) and torch.equal(table[0], torch.zeros(8))
    want = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02), s1, math.sin(0.01), c1, math.cos(0.01)]
    assert torch.allclose(table[6], torch.tensor(want), atol=1e-7)
    same_row, same_col = table[1 + 3 * 1 + 0] - table[6], table[1 + 3 * 2 + 2] - table[6]
    assert torch.equal(same_row[4:], torch.zeros(4)) and same_row[:4].abs().min() > 0  # a column move: first half only
    assert torch.equal(same_col[:4], torch.zeros(4)) and same_col[4:].abs().min() > 0  # a row move: second half only


def test_patchify_is_row_major_and_channel_last():
    imgs = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    patches = mae.patchify(imgs, 2)
    assert patches.shape == (2, 4, 12)
    for i in range(2):
        for j in range(2):
            assert torch.equal(patches[1, 2 * i + j], imgs[1, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].permute(1, 2, 0).flatten())


def test_random_masking_known_answer():
    x = torch.tensor([[10.0, 11.0, 12.0, 13.0]])[..., None]
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3]])  # ascending noise: patches 1, 3, 0, 2
    x_masked, mask, ids_restore = mae.random_masking(x, 0.5, noise)
    assert x_masked.flatten().tolist() == [11.0, 13.0]
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]] and ids_restore.tolist() == [[2, 0, 3, 1]]
    x_masked, mask, _ = mae.random_masking(x, 0.75, noise)
    assert x_masked.flatten().tolist() == [11.0] and mask.tolist() == [[1.0, 0.0, 1.0, 1.0]]


def test_random_masking_keeps_a_quarter_per_sample_and_restores_order():
    torch.manual_seed(0)
    N, L = 5, 64
    x = torch.arange(N * L, dtype=torch.float).reshape(N, L, 1)  # each token's value names its sample and patch
    x_masked, mask, ids_restore = mae.random_masking(x, 0.75, torch.rand(N, L))
    assert x_masked.shape == (N, 16, 1) and mask.sum(1).tolist() == [48.0] * N
    assert len({tuple(m.tolist()) for m in mask}) == N  # a different mask for every sample
    for n in range(N):  # the visible tokens are exactly the unmasked patches
        assert sorted(x_masked[n, :, 0].tolist()) == x[n, mask[n] == 0, 0].tolist()
    padded = torch.cat([x_masked, torch.full((N, L - 16, 1), -1.0)], dim=1)
    restored = padded.gather(1, ids_restore[..., None])
    assert torch.equal(restored, torch.where(mask[..., None] == 0, x, -1.0))


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_sees_only_masked_patches(norm_pix_loss):
    torch.manual_seed(0)
    imgs, pred = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 48)  # patch 4: 2 x 2 patches per image
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    loss = mae.mae_loss(imgs, pred, mask, 4, norm_pix_loss)
    visible, removed = imgs.clone(), imgs.clone()
    visible[0, :, 0:4, 4:8] += torch.randn(3, 4, 4)  # sample 0, patch 1: visible
    removed[0, :, 0:4, 0:4] += torch.randn(3, 4, 4)  # sample 0, patch 0: removed
    assert torch.equal(mae.mae_loss(visible, pred, mask, 4, norm_pix_loss), loss)
    assert not torch.allclose(mae.mae_loss(removed, pred, mask, 4, norm_pix_loss), loss)


def test_loss_known_values():
    imgs = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])[None, :, None, :]  # two 1-pixel patches: (1,2,3), (5,5,5)
    pred = torch.zeros(1, 2, 3)
    removed_first, removed_second = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert mae.mae_loss(imgs, pred, removed_first, 1, False).item() == pytest.approx(14 / 3)
    assert mae.mae_loss(imgs, pred, removed_second, 1, False).item() == pytest.approx(25.0)
    # normalised: mean 2, UNBIASED var 1 -> target (-1, 0, 1) / sqrt(1 + 1e-6); a flat patch becomes 0
    assert mae.mae_loss(imgs, pred, removed_first, 1, True).item() == pytest.approx(2 / 3 / (1 + 1e-6), rel=1e-6)
    assert mae.mae_loss(imgs, pred, removed_second, 1, True).item() == 0.0


def test_decoder_puts_every_token_back_at_its_patch():
    model = tiny_mae(decoder_depth=0)  # no decoder blocks: each output depends on its own token only
    latent, mask, ids_restore = model.forward_encoder(torch.randn(2, 3, 16, 16), 0.75)
    pred = model.forward_decoder(latent, ids_restore)
    keep, dpos = latent.shape[1] - 1, model.decoder_pos_embed[0, 1:]
    assert keep == 4 and pred.shape == (2, 16, 48)
    for n in range(2):
        for k in range(16):
            r = ids_restore[n, k]  # patch k's place in the shuffled sequence; the first `keep` are visible
            token = model.decoder_embed(latent[n, 1 + r]) if r < keep else model.mask_token[0, 0]
            assert torch.allclose(pred[n, k], model.decoder_pred(model.decoder_norm(token + dpos[k])), atol=1e-6)
            assert mask[n, k] == (r >= keep)


def test_positions_stay_fixed_and_weight_decay_groups():
    model = tiny_mae()
    table = mae.sincos_pos_embed(16, 4)[None]
    pos = model.vit.encoder.pos_embedding
    assert torch.equal(pos, table) and not pos.requires_grad and torch.equal(model.decoder_pos_embed, table)
    groups = mae.param_groups(model, 0.05)
    name = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({name[id(p)] for p in g["params"]} for g in groups)
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.05, 0.0)
    assert decay | no_decay == set(name.values()) - {"vit.encoder.pos_embedding"} and not decay & no_decay
    attn = "vit.encoder.layers.encoder_layer_0.self_attention"
    assert {"vit.class_token", "mask_token", "vit.conv_proj.weight", f"{attn}.in_proj_weight"} <= decay
    assert {"vit.conv_proj.bias", f"{attn}.in_proj_bias", "vit.encoder.ln.weight", "decoder_norm.weight"} <= no_decay
    token = model.vit.class_token.detach().clone()
    opt = torch.optim.AdamW(groups, lr=0.1, betas=(0.9, 0.95))
    model(torch.randn(4, 3, 16, 16)).backward()
    opt.step()
    assert torch.equal(pos, table) and torch.equal(model.decoder_pos_embed, table)
    assert not torch.equal(model.vit.class_token, token)


def test_learning_rate_warmup_then_cosine():
    args = argparse.Namespace(warmup_epochs=2, epochs=6, min_lr=0.1)
    for e, want in [(0, 0.0), (1, 0.55), (2, 1.1), (4, 0.6), (6, 0.1)]:
        assert mae.learning_rate(e, 1.1, args) == pytest.approx(want)
    short = argparse.Namespace(warmup_epochs=2, epochs=3, min_lr=0.0)
    assert mae.learning_rate(1.5, 1.0, short) == mae.learning_rate(1.5, 1.0, args) == 0.75  # warmup ignores --epochs


def train(demo, out, *extra, check=True):
    return run("mae.py", "--train-list", demo / "train_poisoned.txt", "--out", out, *TINY, *extra, check=check)


def test_smoke_run_checkpoint_loads_into_torchvision_and_linear_probe(demo, tmp_path):
    train(demo, tmp_path / "m", "--epochs", "1")
    ckpt = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    assert (ckpt["method"], ckpt["arch"], ckpt["arch_kwargs"], ckpt["feature_dim"]) == ("mae", "vit", VIT, 16)
    json.dumps(ckpt["args"])
    log = read_log(tmp_path / "m")
    assert log[0]["steps_per_epoch"] == 6 and log[-1]["epoch"] == 1 and log[-1]["images_per_s"] > 0
    plain = torchvision.models.VisionTransformer(**VIT, num_classes=3)
    result = plain.load_state_dict(ckpt["encoder"], strict=False)
    assert result.missing_keys == ["heads.head.weight", "heads.head.bias"] and result.unexpected_keys == []
    assert torch.equal(ckpt["encoder"]["encoder.pos_embedding"], mae.sincos_pos_embed(16, 4)[None])
    plain.heads = nn.Identity()
    a = ckpt["args"]
    model = mae.MAE(VIT, a["decoder_depth"], a["decoder_width"], a["decoder_heads"], a["mask_ratio"], a["norm_pix_loss"])
    model.load_state_dict(ckpt["train_state"]["model"])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():  # masking off: the MAE path's cls feature is torchvision's plain forward
        assert torch.allclose(model.forward_encoder(x, 0.0)[0][:, 0], plain(x), atol=1e-5)
    assert probe(demo, tmp_path / "m" / "checkpoint.pt", tmp_path / "lp")["method"] == "mae"


def test_resume_continues_exactly(demo, tmp_path):
    # run a with 2 workers: the worker count must not matter either; AdamW's step, exp_avg and exp_avg_sq compared
    a, b = assert_resume_is_exact(lambda out, *args: train(demo, out, *args), tmp_path, "--workers", "2")
    assert torch.equal(a["train_state"]["rng"][0]["torch"], b["train_state"]["rng"][0]["torch"])  # the masks' RNG


def test_torchrun_two_processes(demo, tmp_path):
    log, ckpt, _ = torchrun2("mae.py", "--train-list", demo / "train_poisoned.txt", "--out", tmp_path / "d", *TINY,
                             "--epochs", "1")
    assert log[0]["world_size"] == 2 and log[0]["steps_per_epoch"] == 6 and math.isfinite(log[-1]["loss"])
    assert torch.equal(ckpt["encoder"]["encoder.pos_embedding"], mae.sincos_pos_embed(16, 4)[None])


def test_bad_inputs(demo, tmp_path, random_ckpt):
    assert_missing_image_refused("mae.py", demo, tmp_path, *TINY)
    args = ["--train-list", str(demo / "train_poisoned.txt"), "--out", str(tmp_path / "m"), *TINY]  # in-process: faster
    with pytest.raises(mae.InputError, match="image size must be a multiple of the patch size"):
        mae.main([*args, "--image-size", "18"])
    with pytest.raises(mae.InputError, match="must keep at least one and remove at least one of 16 patches"):
        mae.main([*args, "--mask-ratio", "0.99"])
    with pytest.raises(mae.InputError, match=r"not a mae checkpoint with training state \(its method: random\)"):
        mae.main([*args, "--resume", str(random_ckpt)])
