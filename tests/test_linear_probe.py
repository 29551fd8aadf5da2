"""linear_probe.py: metric counts, the classifier on constructed features, list/checkpoint errors, end to end."""
import argparse
import json

import numpy as np
import pytest
import torch

import linear_probe
from conftest import error_of, run, write_checkpoint


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
    return argparse.Namespace(**{**base, **kw})


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
    assert "junk.pt: not a checkpoint (torch.load with weights_only=True failed" in line
    assert "--target 7" in error_of(probe(demo, random_ckpt, tmp_path / "o", "--target", "7", check=False))
    big = write_checkpoint(tmp_path / "big.pt", image_size=32)
    assert "patched image is 16x16" in error_of(probe(demo, big, tmp_path / "o", check=False))
    broken = tmp_path / "broken.txt"
    broken.write_text(open(demo / "val_clean.txt").read().replace(" 0\n", " zero\n", 1))
    proc = run("linear_probe.py", "--encoder", random_ckpt, "--train-list", broken, "--val-list", demo / "val_clean.txt",
               "--val-patched-list", demo / "val_patched.txt", "--out", tmp_path / "o", check=False)
    assert "broken.txt:1:" in error_of(proc)


def test_unreadable_image_in_a_worker_is_one_line(demo, random_ckpt, tmp_path):
    lst = tmp_path / "val.txt"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    lst.write_text(f"{tmp_path / 'bad.png'} 0\n" + "".join(f"{demo / p} {y}\n" for p, y in
                                                               (ln.split() for ln in open(demo / "val_clean.txt"))))
    proc = run("linear_probe.py", "--encoder", random_ckpt, "--train-list", demo / "train_labeled_50pct.txt",
               "--val-list", lst, "--val-patched-list", demo / "val_patched.txt", "--out", tmp_path / "o",
               "--workers", "1", check=False)
    assert "bad.png: cannot read image" in error_of(proc)
