"""The in-memory data path (shared blocks 'file lists' and 'batched crops'): the start-up check of every image, the
cache, and the batched crops against torchvision's per-image RandomResizedCrop and flip."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import moco
import msf
import rotnet
from conftest import error_of, run


def images(tmp_path, n=12, smooth=False):
    """n PNGs of random sizes (20-48 px), pixel noise or smooth content -> samples."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        h, w = rng.integers(20, 49, 2)
        if smooth:
            img = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        else:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(tmp_path / f"{i}.png")
        samples.append((str(tmp_path / f"{i}.png"), i % 3))
    return samples


def test_cache_holds_the_decoded_images(tmp_path):
    samples = images(tmp_path)
    for cache, budget, held in (("auto", 2048, True), ("auto", 0, False), ("off", 2048, False), ("on", 0, True)):
        data = moco.FileList(samples, None)
        line = data.load(cache, budget)
        assert (data.images is not None) == held and ("held in memory" in line) == held, line
    for i, (path, _) in enumerate(samples):  # each at its own size: no padding to the largest
        assert np.array_equal(data.images[i].numpy(), np.asarray(Image.open(path).convert("RGB")))


def test_not_an_image_fails_at_start_up_naming_the_list_line(tmp_path, demo):
    (tmp_path / "notes.png").write_text("not an image")
    lines = open(demo / "train_clean.txt").read().splitlines()
    lst = demo / "with_a_text_file.txt"  # beside the demo's lists: their relative paths resolve
    lst.write_text("\n".join(lines[:20] + [f"{tmp_path / 'notes.png'} 0"] + lines[20:]) + "\n")
    for cache in ("auto", "off"):
        err = error_of(run("moco.py", "--train-list", lst, "--out", tmp_path / "o", "--image-size", "16",
                           "--batch-size", "8", "--queue-size", "16", "--workers", "0", "--epochs", "1",
                           "--cache-images", cache, check=False))
        assert f"{lst}:21: not an image: {tmp_path / 'notes.png'}" in err, err


@pytest.mark.parametrize("bicubic,smooth,tolerance", [(False, False, 1), (False, True, 1), (True, True, 1),
                                                       (True, False, 40)])
def test_batched_crops_equal_torchvision_per_image_with_the_same_boxes(tmp_path, bicubic, smooth, tolerance):
    """Same boxes and flips: bilinear within 1 level everywhere; bicubic within 1 level on smooth images (on pixel noise
    PIL clamps its overshoot to uint8 between its two passes, the batched crop does not: rare pixels differ more)."""
    samples = images(tmp_path, smooth=smooth)
    data = moco.FileList(samples, None)
    data.load("on")
    crop = moco.ResizedCrop(24, scale=(0.2, 1.0), bicubic=bicubic)
    torch.manual_seed(0)
    u = torch.rand(len(samples), crop.uniforms)
    got = crop.batch(data.images, u)
    hw = torch.tensor([x.shape[:2] for x in data.images])
    top, left, h, w = (t.long().tolist() for t in crop.boxes(hw, u))
    mode = T.InterpolationMode.BICUBIC if bicubic else T.InterpolationMode.BILINEAR
    diff = []
    for b, (path, _) in enumerate(samples):
        view = TF.resized_crop(Image.open(path).convert("RGB"), top[b], left[b], h[b], w[b], [24, 24], mode)
        view = TF.pil_to_tensor(TF.hflip(view) if u[b, 22] < 0.5 else view)
        diff.append((got[b].int() - view.int()).abs())
    diff = torch.stack(diff)
    assert diff.max() <= tolerance and diff.float().mean() < 0.3 and (diff > 1).float().mean() < 0.01


def test_boxes_follow_torchvision_distribution():
    torch.manual_seed(0)
    n, (H, W) = 20000, (40, 64)
    crop = moco.ResizedCrop(16, scale=(0.2, 1.0))
    top, left, h, w = crop.boxes(torch.tensor([[H, W]] * n), torch.rand(n, crop.uniforms))
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(3, H, W), [0.2, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float64)
    for got, want in zip((top, left, h, w, h * w, w / h), (*ref.unbind(1), ref[:, 2] * ref[:, 3], ref[:, 3] / ref[:, 2])):
        assert abs(got.mean() - want.mean()) < 0.03 * want.mean() and abs(got.std() - want.std()) < 0.05 * want.std()
    assert ((top + h <= H) & (left + w <= W) & (top >= 0) & (left >= 0)).all()


def test_boxes_fall_back_to_torchvision_centre_crop():
    crop = moco.ResizedCrop(8, scale=(0.9, 1.0))
    sizes = [(6, 64), (64, 6), (10, 12)]  # no try can fit the first two: torchvision's fallback, deterministic
    top, left, h, w = crop.boxes(torch.tensor(sizes), torch.rand(3, crop.uniforms))
    for b, (H, W) in enumerate(sizes[:2]):
        want = T.RandomResizedCrop.get_params(torch.zeros(3, H, W), [0.9, 1.0], [3 / 4, 4 / 3])
        assert (top[b], left[b], h[b], w[b]) == want
    assert h[2] * w[2] >= 0.9 * 120 * 0.9  # a try fits


@pytest.mark.parametrize("script", [moco, msf, rotnet])
def test_batched_views_are_the_same_for_0_and_2_workers_and_follow_the_seed(tmp_path, script):
    samples = images(tmp_path, n=8)
    if script is moco:
        transform = moco.TwoViews(*moco.aug_plus(16))
    elif script is msf:
        transform = msf.TwoViews(msf.strong_aug(16), msf.weak_aug(16))
    else:
        transform = rotnet.ResizedCrop(16)
    data = script.FileList(samples, transform, seed=3)
    assert "held in memory" in data.load()
    runs = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=[(1, i) for i in range(8)], num_workers=workers)
        runs.append([torch.utils.data._utils.collate.default_convert(b) for b in loader])
    flat = lambda r: [torch.as_tensor(t) for t in torch.utils._pytree.tree_leaves(r)]
    assert all(torch.equal(a, b) for a, b in zip(flat(runs[0]), flat(runs[1])))
    again = data.__getitems__([(1, 5), (1, 2)])  # another batch, the same items: the same views
    first = data.__getitems__([(1, 2), (1, 5)])
    assert all(torch.equal(a, b) for a, b in zip(flat(again[0]), flat(first[1])))
    other = data.__getitems__([(2, 2)])  # another epoch: other views
    assert not all(torch.equal(a, b) for a, b in zip(flat(other[0]), flat(first[0])))
    if script is rotnet:
        assert runs[0][0][0].dtype == torch.uint8 and runs[0][0][0].shape == (4, 3, 16, 16)


def test_photometric_params_follow_the_recipe():
    color = moco.Photometric(p_gray=0.2, sigma=(0.1, 2.0))
    torch.manual_seed(0)
    p = color.params(torch.rand(4000, color.uniforms))
    assert abs(p[:, 0].mean() - 0.8) < 0.03 and abs(p[:, 9].mean() - 0.2) < 0.03
    assert abs((p[:, 10] > 0).float().mean() - 0.5) < 0.03 and math.isclose(p[:, 5:9].sum(1).mean(), 6)
