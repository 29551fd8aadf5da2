"""linear_probe.py: metric counts, the classifier on constructed features, list/checkpoint errors, end to end."""
import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import linear_probe
from conftest import TINY, error_of, run, write_checkpoint
from conftest import probe as conftest_probe


def test_metrics_from_a_known_confusion_matrix():
    clean = np.array([[5, 1, 0], [2, 6, 2], [0, 1, 3]])  # rows = true class, columns = predicted
    patched = np.array([[1, 0, 5], [0, 2, 8], [0, 0, 4]])
    m = linear_probe.metrics(clean, patched, target=2)
    assert m["acc_clean"] == pytest.approx(100 * 14 / 20) and m["acc_patched"] == pytest.approx(100 * 7 / 20)
    assert (m["tp_clean"], m["fp_clean"]) == (3, 2)  # column 2: 0 + 2 (+ 3 on the diagonal)
    assert (m["tp_patched"], m["fp_patched"]) == (4, 13)
    assert m["n_patched_nontarget"] == 16
    assert m["asr"] == pytest.approx(100 * 13 / 16) and m["asr_all"] == pytest.approx(100 * 17 / 20)
    m0 = linear_probe.metrics(clean, patched, target=0)
    assert (m0["tp_clean"], m0["fp_clean"], m0["fp_patched"]) == (5, 2, 0)


def test_confusion_rows_are_true_classes():
    cm = linear_probe.confusion(torch.tensor([2, 2, 0]), torch.tensor([0, 1, 0]), 3)
    assert cm.tolist() == [[1, 0, 1], [0, 0, 1], [0, 0, 0]]


def probe_args(**kw):
    base = dict(classifier="linear", epochs=40, batch_size=256, lr=0.01, weight_decay=1e-4, milestones=[15, 30], seed=0)
    return linear_probe.resolve_protocol(argparse.Namespace(**{**base, **kw}))  # the rest from the row


@pytest.mark.parametrize("classifier,epochs,lr", [("linear", 100, 0.1), ("mlp", 200, 1e-3)])
def test_features_that_expose_the_trigger_give_the_expected_fp(classifier, epochs, lr):
    """Class c's features point along e_c; a triggered image's feature points along the target's: every non-target
    patched image must be a false positive of the target, and no clean image."""
    g = torch.Generator().manual_seed(0)
    C, D, target = 4, 4, 3
    proto = torch.eye(C, D) * 4

    def feats(labels):
        return proto[labels] + 0.1 * torch.randn(len(labels), D, generator=g)

    train_y, val_y = torch.arange(C).repeat(10), torch.arange(C).repeat(5)
    head = linear_probe.train_classifier(feats(train_y), train_y, C, probe_args(classifier=classifier, epochs=epochs, lr=lr))
    with torch.no_grad():
        cm_clean = linear_probe.confusion(head(feats(val_y)).argmax(1), val_y, C)
        cm_patched = linear_probe.confusion(head(feats(torch.full_like(val_y, target))).argmax(1), val_y, C)
    m = linear_probe.metrics(cm_clean, cm_patched, target)
    assert m["acc_clean"] == 100.0 and m["fp_clean"] == 0
    assert m["fp_patched"] == 15 and m["asr"] == 100.0 and m["tp_patched"] == 5


def test_read_list_errors(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    cases = {"malformed": (f"{img} 0\nonly-one-field\n", ":2: expected"),
             "negative": (f"{img} -1\n", ":1: negative label"),
             "missing": (f"{img} 0\n\nnope.png 1\n", ":3: image not found"),
             "empty": ("\n\n", "empty")}
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.txt"
        path.write_text(text)
        with pytest.raises(linear_probe.InputError, match=message):
            linear_probe.read_list(str(path))
    (tmp_path / "spaces dir").mkdir()
    (tmp_path / "spaces dir" / "b c.png").write_bytes(b"x")
    (tmp_path / "ok.txt").write_text("spaces dir/b c.png 3\n")
    assert linear_probe.read_list(str(tmp_path / "ok.txt")) == [(str(tmp_path / "spaces dir" / "b c.png"), 3)]


def probe(demo, ckpt, out, *extra, check=True):
    return run("linear_probe.py", "--encoder", ckpt, "--train-list", demo / "train_labeled_50pct.txt",
               "--val-list", demo / "val_clean.txt", "--val-patched-list", demo / "val_patched.txt", "--out", out,
               "--epochs", "2", "--workers", "0", *extra, check=check)


KEYS = {"acc_clean", "acc_patched", "tp_clean", "fp_clean", "tp_patched", "fp_patched", "asr", "asr_all", "target",
        "target_name", "n_patched_nontarget", "seconds_extract", "seconds_train", "method", "arch", "layer", "classifier"}


def test_end_to_end_on_a_random_encoder(demo, random_ckpt, tmp_path):
    probe(demo, random_ckpt, tmp_path / "lp", "--knn", "5")
    m = json.load(open(tmp_path / "lp" / "metrics.json"))
    assert KEYS <= set(m) and m["target"] == 1 and m["n_val"] == 12 and m["n_patched_nontarget"] == 8
    assert "knn_acc_clean" in m
    cm = np.load(tmp_path / "lp" / "confusion_patched.npy")
    assert cm.shape == (3, 3) and cm.sum() == 12 and cm[:, 1].sum() - cm[1, 1] == m["fp_patched"]
    rows = open(tmp_path / "lp" / "per_class.csv").read().splitlines()
    assert rows[0].startswith("class,name,tp_clean") and len(rows) == 4
    head = torch.load(tmp_path / "lp" / "classifier.pt", weights_only=True)
    assert {"fc.weight", "mean", "inv_std"} <= set(head["head"])


@pytest.mark.parametrize("layer,dim", [("relu", 64 * 8 * 8), ("layer1", 64 * 4 * 4), ("layer4", 512)])
def test_pooled_layers(demo, random_ckpt, tmp_path, layer, dim):
    probe(demo, random_ckpt, tmp_path / layer, "--layer", layer)
    head = torch.load(tmp_path / layer / "classifier.pt", weights_only=True)["head"]
    assert head["fc.weight"].shape == (3, dim)  # 16 px: stem ReLU map 8x8, layer1 4x4: pooled to min(12, side), never upsampled


def test_mlp_classifier_and_augment(demo, random_ckpt, tmp_path):
    probe(demo, random_ckpt, tmp_path / "mlp", "--classifier", "mlp", "--augment")
    m = json.load(open(tmp_path / "mlp" / "metrics.json"))
    assert m["classifier"] == "mlp" and m["args"]["augment"]


def test_bad_inputs(demo, random_ckpt, tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    assert "not an encoder checkpoint" in error_of(probe(demo, bad, tmp_path / "o", check=False))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    line = error_of(probe(demo, tmp_path / "junk.pt", tmp_path / "o", check=False))
    assert line.endswith("junk.pt: not a PyTorch checkpoint (a zip or pickle file); it looks like text")
    (tmp_path / "cut.pt").write_bytes(open(random_ckpt, "rb").read()[:4000])  # a download cut short
    line = error_of(probe(demo, tmp_path / "cut.pt", tmp_path / "o", check=False))
    assert "cut.pt: a zip file that torch.load(weights_only=True) cannot read (damaged?)" in line
    torch.save(argparse.Namespace(lr=0.1), tmp_path / "pickled.pt", _use_new_zipfile_serialization=False)
    line = error_of(probe(demo, tmp_path / "pickled.pt", tmp_path / "o", check=False))
    assert "pickled.pt: a pickle file holding a pickled argparse.Namespace, which is not loaded" in line
    assert "--target 7" in error_of(probe(demo, random_ckpt, tmp_path / "o", "--target", "7", check=False))
    big = write_checkpoint(tmp_path / "big.pt", image_size=32)
    assert "patched image is 16x16" in error_of(probe(demo, big, tmp_path / "o", check=False))
    broken = tmp_path / "broken.txt"
    broken.write_text(open(demo / "val_clean.txt").read().replace(" 0\n", " zero\n", 1))
    proc = run("linear_probe.py", "--encoder", random_ckpt, "--train-list", broken, "--val-list", demo / "val_clean.txt",
               "--val-patched-list", demo / "val_patched.txt", "--out", tmp_path / "o", check=False)
    assert "broken.txt:1:" in error_of(proc)


def test_unreadable_image_is_one_line_before_any_worker_starts(demo, random_ckpt, tmp_path):
    lst = tmp_path / "val.txt"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    lst.write_text(f"{tmp_path / 'bad.png'} 0\n" + "".join(f"{demo / p} {y}\n" for p, y in
                                                               (ln.split() for ln in open(demo / "val_clean.txt"))))
    proc = run("linear_probe.py", "--encoder", random_ckpt, "--train-list", demo / "train_labeled_50pct.txt",
               "--val-list", lst, "--val-patched-list", demo / "val_patched.txt", "--out", tmp_path / "o",
               "--workers", "1", check=False)
    line = error_of(proc)
    assert "val.txt:1: not an image" in line and "bad.png" in line and "Traceback" not in proc.stderr


REQUIRED = ["--encoder", "e.pt", "--train-list", "t.txt", "--val-list", "v.txt", "--val-patched-list", "p.txt", "--out", "o"]


def resolved(*flags, n_train=1300):
    return linear_probe.resolve_protocol(linear_probe.parse_args([*REQUIRED, *flags]), n_train)


def lrs(args, epochs):
    return [linear_probe.lr_at(args, e) for e in epochs]


def test_each_protocol_row_resolves_to_the_documented_hyperparameters():
    a = resolved("--protocol", "moco")  # CompReSS / SSL-Backdoor eval_linear.py
    assert (a.norm, a.optimizer, a.lr, a.weight_decay, a.batch_size, a.epochs, a.augment, a.layer) == \
        ("l2+std", "sgd", 0.01, 1e-4, 256, 40, "rrc", "final")
    assert lrs(a, [0, 14, 15, 29, 30, 39]) == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])
    d = resolved()  # the default: the moco row on cached center-crop features
    assert d.protocol == "demo" and d.augment is False and vars(d) == {**vars(a), "protocol": "demo", "augment": False}
    j = resolved("--protocol", "jigsaw")  # eval_conv_linear.py: raw pooled conv map, otherwise the moco recipe
    assert (j.norm, j.layer, j.optimizer, j.lr, j.batch_size, j.epochs, j.augment) == ("none", "layer3", "sgd", 0.01, 256, 40, "rrc")
    r = resolved("--protocol", "rotnet")  # LinearClassifiers config: LUT (5, 0.01), (15, 0.002), (25, 4e-4), (35, 8e-5)
    assert (r.norm, r.optimizer, r.weight_decay, r.batch_size, r.epochs, r.augment, r.layer) == \
        ("bn2d", "nesterov", 5e-4, 32, 40, "crop", "layer3")
    assert lrs(r, [0, 4, 5, 14, 15, 24, 25, 39]) == pytest.approx([0.01, 0.01, 2e-3, 2e-3, 4e-4, 4e-4, 8e-5, 8e-5])
    b = resolved("--protocol", "byol")  # byol/test.py: raw features, Adam 1e-2 -> 1e-6 over 500 epochs, batch 1000
    assert (b.norm, b.optimizer, b.lr, b.weight_decay, b.epochs, b.batch_size, b.drop_last, b.augment) == \
        ("none", "adam", 1e-2, 5e-6, 500, 1000, "once", False)
    assert lrs(b, [0, 1, 500]) == pytest.approx([1e-2, 1e-2 * 1e-4 ** (1 / 500), 1e-6])
    m = resolved("--protocol", "mae")  # main_linprobe.py: BN1d, LARS, blr 0.1, batch 16384 = here the whole set
    assert (m.norm, m.optimizer, m.weight_decay, m.epochs, m.warmup, m.batch_size, m.augment) == \
        ("bn1d", "lars", 0.0, 90, 10, 1300, "rrc")
    assert m.lr == pytest.approx(0.1 * 1300 / 256)
    assert lrs(m, [0, 5, 10, 50, 90]) == pytest.approx([0, m.lr / 2, m.lr, m.lr / 2, 0], abs=1e-12)
    assert resolved("--protocol", "mae", n_train=20000).batch_size == 16384
    e = resolved("--classifier", "mlp")  # BadEncoder's downstream MLP (the old --classifier mlp defaults)
    assert (e.protocol, e.norm, e.optimizer, e.lr, e.epochs, e.batch_size) == ("badencoder", "l2", "adam", 1e-4, 500, 64)
    assert (e.order, a.order, m.order, m.drop_last) == ("fixed", "epoch", "epoch", True)


@pytest.mark.parametrize("protocol", ["byol", "badencoder", "demo"])
def test_batch_order_and_subset_follow_the_reference(protocol, monkeypatch):
    """13 samples, batch 5, 3 epochs. byol: one subset of 10 for all epochs, reshuffled (test.py's features come from a
    shuffled drop_last loader, once); badencoder: all 13 in one order every epoch (its loader does not shuffle);
    demo (CompReSS): all 13, reshuffled every epoch."""
    seen = []
    cross_entropy = F.cross_entropy
    monkeypatch.setattr(linear_probe.F, "cross_entropy", lambda logits, y: seen.append(y.tolist()) or cross_entropy(logits, y))
    args = linear_probe.resolve_protocol(argparse.Namespace(protocol=protocol, epochs=3, batch_size=5, seed=0), 13)
    linear_probe.train_classifier(torch.eye(13), torch.arange(13), 13, args)  # label = sample index
    epochs = [sum(seen[i:i + len(seen) // 3], []) for i in range(0, len(seen), len(seen) // 3)]
    sets = [sorted(e) for e in epochs]
    if protocol == "byol":
        assert len(seen) == 6 and all(len(e) == 10 for e in epochs) and sets[0] == sets[1] == sets[2]
        assert epochs[0] != epochs[1]
    elif protocol == "badencoder":
        assert all(s == list(range(13)) for s in sets) and epochs[0] == epochs[1] == epochs[2] != list(range(13))
    else:
        assert all(s == list(range(13)) for s in sets) and epochs[0] != epochs[1]


def test_explicit_flags_override_the_row():
    r = resolved("--protocol", "rotnet", "--lr", "0.1", "--epochs", "3", "--batch-size", "8", "--weight-decay", "0",
                 "--milestones", "1", "--optimizer", "sgd", "--norm", "none", "--layer", "layer4", "--no-augment")
    assert (r.lr, r.epochs, r.batch_size, r.weight_decay, r.milestones, r.optimizer, r.norm, r.layer, r.augment) == \
        (0.1, 3, 8, 0.0, [1], "sgd", "none", "layer4", False)
    assert lrs(r, [0, 1, 2]) == pytest.approx([0.1, 0.02, 0.02])  # the row's gamma 0.2 at the given milestone
    assert resolved("--augment").augment == "rrc" and resolved("--protocol", "rotnet", "--augment").augment == "crop"
    assert resolved("--protocol", "mae", "--lr", "0.5").lr == 0.5  # an explicit lr is not rescaled
    assert resolved("--protocol", "moco", "--batch-size", "5000").batch_size == 1300  # capped at the labeled set


def test_batchnorm_heads_have_no_affine_parameters_and_use_batch_statistics():
    torch.manual_seed(0)
    C, L, N = 4, 9, 16  # 4 channels of a pooled 3x3 map, flattened channel-major like features()
    f = torch.randn(N, C, 3, 3) * torch.arange(1, C + 1).view(1, C, 1, 1) + 5
    d = C * L
    head = linear_probe.Head(torch.zeros(d), torch.ones(d), 3, False, "bn2d", channels=C).train()
    assert isinstance(head.bn, torch.nn.BatchNorm2d) and head.bn.weight is None and head.bn.bias is None
    assert [n for n, _ in head.named_parameters()] == ["fc.weight", "fc.bias"]
    z = head.normalise(f.flatten(1)).view(N, C, L)  # train mode: per channel over the batch and the map positions
    assert z.mean((0, 2)) == pytest.approx(torch.zeros(C), abs=1e-5)
    assert z.var((0, 2), unbiased=False) == pytest.approx(torch.ones(C), abs=1e-3)
    assert head.bn.running_mean == pytest.approx(0.1 * f.mean((0, 2, 3)), abs=1e-5)  # running stats move (momentum 0.1)
    head.eval()
    assert not torch.allclose(head.normalise(f.flatten(1)).view(N, C, L).mean((0, 2)), torch.zeros(C), atol=1e-2)
    head1 = linear_probe.Head(torch.zeros(8), torch.ones(8), 3, False, "bn1d").train()
    assert isinstance(head1.bn, torch.nn.BatchNorm1d) and head1.bn.weight is None and head1.bn.eps == 1e-6
    x = torch.randn(N, 8) * 3 + 2
    z1 = head1.normalise(x)
    assert z1.mean(0) == pytest.approx(torch.zeros(8), abs=1e-5) and z1.std(0, unbiased=False) == pytest.approx(torch.ones(8), abs=1e-3)
    raw = linear_probe.Head(torch.zeros(8), torch.ones(8), 3, False, "none")
    assert torch.equal(raw.normalise(x), x)  # jigsaw / byol: the raw features


def test_each_protocol_gets_the_optimizer_of_its_row():
    def opt(name):
        return linear_probe.make_optimizer(torch.nn.Linear(4, 3).parameters(), resolved("--protocol", name))
    moco, rot, byol, mae = opt("moco"), opt("rotnet"), opt("byol"), opt("mae")
    assert type(moco) is torch.optim.SGD and moco.defaults["momentum"] == 0.9 and not moco.defaults["nesterov"]
    assert moco.defaults["weight_decay"] == 1e-4
    assert type(rot) is torch.optim.SGD and rot.defaults["nesterov"] and rot.defaults["weight_decay"] == 5e-4
    assert type(byol) is torch.optim.Adam and byol.defaults["lr"] == 1e-2 and byol.defaults["weight_decay"] == 5e-6
    assert type(mae) is linear_probe.LARS and mae.defaults["weight_decay"] == 0.0


def test_lars_step_matches_the_formula():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = linear_probe.LARS([w, b], lr=2.0, weight_decay=0.5)
    w.grad, b.grad = torch.tensor([[0.5, -2.0]]), torch.tensor([0.25])
    g = w.grad + 0.5 * w.detach()  # (2, 0): ||g|| = 2 -> scaled to 0.001 * 5 / 2
    opt.step()
    assert w.detach() == pytest.approx(torch.tensor([[3.0, 4.0]]) - 2.0 * g * 0.001 * 5 / 2)
    assert b.item() == pytest.approx(1.0 - 2.0 * 0.25)  # a vector: plain momentum SGD, no weight decay, no trust ratio
    w.grad, b.grad = torch.zeros(1, 2), torch.tensor([0.0])
    w1, mu1 = w.detach().clone(), g * 0.001 * 5 / 2
    opt.step()  # only weight decay left: g = 0.5 w, rescaled to 0.001 w; the momentum buffer carries 0.9 x the last one
    assert b.item() == pytest.approx(0.5 - 2.0 * 0.9 * 0.25)
    assert w.detach() == pytest.approx(w1 - 2.0 * (0.9 * mu1 + 0.001 * w1))


@pytest.mark.parametrize("protocol", list(linear_probe.PROTOCOLS))
def test_tiny_end_to_end_probe_per_protocol(demo, random_ckpt, tmp_path, protocol):
    m = conftest_probe(demo, random_ckpt, tmp_path / protocol, "--protocol", protocol)
    row = linear_probe.PROTOCOLS[protocol]
    assert m["protocol"] == protocol and m["layer"] == row["layer"] and m["args"]["norm"] == row["norm"]
    assert m["args"]["batch_size"] == min(row["batch_size"], m["n_train"])
    head = torch.load(tmp_path / protocol / "classifier.pt", weights_only=True)["head"]
    assert ("bn.running_mean" in head) == row["norm"].startswith("bn") and "bn.weight" not in head
    assert m["val_resize"] == 18  # the demo's 32 px val images: Resize(18) + CenterCrop(16), like its patched val


def test_native_size_val_is_not_resized(tmp_path, random_ckpt):
    import poison
    out = tmp_path / "native"  # 16 px images, 16 px evaluation crops: nothing to resize, in poison.py and here
    poison.main(["--out", str(out), "--target", "1", "--rate", "0.5", *TINY, "--demo-size", "16"])
    assert json.load(open(out / "poison.json"))["val_geometry"] == "native"
    m = conftest_probe(out, random_ckpt, tmp_path / "lp", "--protocol", "byol", "--save-features")  # raw features
    assert m["val_resize"] is None
    val = linear_probe.read_list(str(out / "val_clean.txt"))
    model, ckpt = linear_probe.load_encoder(str(random_ckpt))
    tf = linear_probe.T.Compose([linear_probe.T.ToTensor(), linear_probe.T.Normalize(ckpt["mean"], ckpt["std"])])
    with torch.no_grad():  # the clean val features are those of the images as they are: no resize, no crop
        direct = model(torch.stack([linear_probe.FileList(val, tf)[i][0] for i in range(len(val))]))
    assert torch.allclose(torch.load(tmp_path / "lp" / "features.pt", weights_only=True)["val"], direct, atol=1e-4)
    args = argparse.Namespace(val_patched_list=str(tmp_path / "elsewhere" / "val_patched.txt"))  # no poison.json: sizes
    assert linear_probe.val_resize(args, val, 16) is None and linear_probe.val_resize(args, val, 8) == 9
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "poison.json").write_text(json.dumps({"val_geometry": "resize_center_crop", "val_resize": 20}))
    assert linear_probe.val_resize(args, val, 16) == 20  # poison.py's recorded geometry wins
