"""The device half of the augmentation (shared blocks 'photometric augmentation' and 'device input') against
torchvision's per-image functional ops, and the host half's seeding."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

import badencoder
import moco
import msf

OPS = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]


def mixed_batch(n=6, h=20, w=24):
    """Random images, a flat gray one, a saturated one, and one with clipped regions."""
    torch.manual_seed(0)
    x = torch.rand(n, 3, h, w)
    x[0] = 0.5
    x[1] = torch.tensor([1.0, 0.0, 0.2]).view(3, 1, 1)
    x[2, :, :6] = 1.0
    return x


def reference(x, params):
    """The same views, one image at a time, with torchvision's functional ops in each view's own order."""
    out = []
    for img, p in zip(x, params.tolist()):
        on, factors, order, gray, sigma = p[0], p[1:5], [int(o) for o in p[5:9]], p[9], p[10]
        if on:
            for op in order:
                img = OPS[op](img, factors[op])
        if gray:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if sigma > 0:
            img = TF.gaussian_blur(img, [13, 13], [sigma, sigma])
        out.append(img)
    return torch.stack(out)


def test_batched_ops_equal_torchvision_per_image():
    x = mixed_batch()
    params = torch.tensor([  # on, b, c, s, h, order, gray, sigma
        [1, 0.7, 1.3, 0.8, 0.08, 0, 1, 2, 3, 0, 0.0],
        [1, 1.2, 0.6, 1.4, -0.1, 3, 2, 1, 0, 0, 1.5],
        [1, 1.4, 1.1, 0.6, 0.05, 1, 3, 0, 2, 1, 0.0],
        [0, 0.6, 0.6, 0.6, 0.1, 2, 0, 3, 1, 1, 0.7],
        [1, 0.9, 1.4, 1.2, -0.03, 2, 3, 1, 0, 0, 2.0],
        [0, 1.0, 1.0, 1.0, 0.0, 0, 1, 2, 3, 0, 0.0]])
    color = moco.Photometric(sigma=(0.1, 2.0))
    assert color.k == 13
    got, want = color(x, params), reference(x, params)
    assert (got - want).abs().max() < 1e-5
    assert (got[5] == x[5]).all()  # everything off: the identity


def test_each_view_has_its_own_order():
    x = mixed_batch()
    p = torch.tensor([[1, 1.4, 0.6, 1.4, 0.1, 0, 1, 2, 3, 0, 0.0]] * 2)
    p[1, 5:9] = torch.tensor([3, 2, 1, 0])
    got = moco.Photometric()(x[[3, 3]], p)  # one image, two orders: different results, each its own order's
    assert (got[0] - got[1]).abs().max() > 1e-2
    assert (got - reference(x[[3, 3]], p)).abs().max() < 1e-5
    torch.manual_seed(0)
    orders = {tuple(p[5:9].int().tolist()) for p in moco.Photometric().params(torch.rand(200, 12))}
    assert len(orders) > 12  # of the 24 orders


def test_draws_follow_the_recipe():
    torch.manual_seed(0)
    p = moco.Photometric(p_gray=0.2, sigma=(0.1, 2.0)).params(torch.rand(4000, 12))
    assert abs(p[:, 0].mean() - 0.8) < 0.03 and abs(p[:, 9].mean() - 0.2) < 0.03 and abs((p[:, 10] > 0).float().mean() - 0.5) < 0.03
    assert p[:, 1:4].min() >= 0.6 and p[:, 1:4].max() <= 1.4 and p[:, 4].abs().max() <= 0.1
    assert p[p[:, 10] > 0, 10].min() >= 0.1 and p[:, 10].max() <= 2.0
    assert (p[:, 5:9].sort(1).values == torch.arange(4.0)).all()  # a permutation each


def test_device_input_normalises_uint8():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    got = moco.to_device(x, "cpu", torch.channels_last, mean, std)
    want = TF.normalize(x.float() / 255, mean, std)
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.allclose(got, want, atol=1e-6)


def views_of(loader):
    return [(q.clone(), pq.clone(), k.clone(), pk.clone()) for ((q, pq), (k, pk)), _, _ in loader]


@pytest.mark.parametrize("script", [moco, msf])
def test_host_half_is_the_same_for_0_and_2_workers(tmp_path, script):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(8):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        samples.append((str(path), 0))
    if script is moco:
        views = moco.TwoViews(*moco.aug_plus(32))
    else:
        views = msf.TwoViews(msf.strong_aug(32), msf.weak_aug(32))
    data = script.FileList(samples, views, seed=3)
    runs = []
    for workers in (0, 2):
        sampler = [(1, i) for i in range(8)]
        loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler, num_workers=workers)
        runs.append(views_of(loader))
    for a, b in zip(*runs):
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    q, pq, k, pk = runs[0][0]
    assert q.dtype == torch.uint8 and q.shape == (4, 3, 32, 32) and pq.shape == (4, 11)
    assert not torch.equal(pq, pk)  # two views, two draws


def test_shadow_reference_views_have_no_blur():
    color = badencoder.ShadowViews(16, [], [], "random", (0.1, 0.9), 1.0).color
    torch.manual_seed(0)
    p = color.params(torch.rand(100, color.uniforms))
    assert color.k == 1 and (p[:, 10] == 0).all() and 0 < p[:, 9].sum() < 100
