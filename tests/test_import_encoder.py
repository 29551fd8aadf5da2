"""scripts/import_encoder.py: published key layouts import exactly, bad weights are refused in one line, a pickle
payload never runs, and imported checkpoints run through linear_probe.py, badencoder.py and compress_defense.py."""
import hashlib
import os
import pickle
import re
import sys
import warnings

import pytest
import torch
import torchvision

import badencoder
import compress_defense
import linear_probe
from conftest import ROOT, error_of, probe, run

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import import_encoder  # noqa: E402

SCRIPT = "scripts/import_encoder.py"
VIT = {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128}


pytestmark = pytest.mark.usefixtures("one_thread")  # 16 px models gain nothing from more threads


def resnet18(seed, small_stem=False, fc=True):
    """A random torchvision resnet18's state dict (fc kept unless fc=False; solo-learn's CIFAR stem if small_stem)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    if small_stem:
        model.conv1, model.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    if not fc:
        model.fc = torch.nn.Identity()
    return model.state_dict()


def mlp(prefix, dims=(512, 64, 16)):
    """A projection/prediction head's tensors under prefix (Linear, BN, ReLU, Linear)."""
    return {f"{prefix}0.weight": torch.randn(dims[1], dims[0]), f"{prefix}1.weight": torch.ones(dims[1]),
            f"{prefix}3.weight": torch.randn(dims[2], dims[1])}


def under(prefix, state):
    return {prefix + k: v for k, v in state.items()}


def import_(tmp_path, obj, *flags, name="weights.pth"):
    """torch.save obj, import it in this process -> the checkpoint as the consumers read it."""
    torch.save(obj, tmp_path / name)
    out = tmp_path / "imported" / "encoder.pt"
    import_encoder.main([str(a) for a in ("--weights", tmp_path / name, "--out", out, "--overwrite", *flags)])
    return torch.load(out, weights_only=True)


def assert_backbone_equal(ckpt, source, prefix=""):
    """Every backbone tensor of the checkpoint equals the source's, and the keys are exactly the backbone's."""
    model, _ = linear_probe.build_backbone(ckpt["arch"], ckpt["arch_kwargs"])
    assert set(ckpt["encoder"]) == set(model.state_dict())
    for k, v in ckpt["encoder"].items():
        assert torch.equal(v, source[prefix + k]), k
    model.load_state_dict(ckpt["encoder"], strict=True)


def moco_v2(q, k):  # official MoCo v2: encoder_q / encoder_k with an MLP fc, the queue
    return {"epoch": 800, "arch": "resnet18", "state_dict": {
        **under("module.encoder_q.", {**q, **mlp("fc.")}), **under("module.encoder_k.", {**k, **mlp("fc.")}),
        "module.queue": torch.randn(16, 128), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}}


def moco_v3(q, k):  # MoCo v3 ResNet: base_encoder / momentum_encoder, fc replaced by the projector, a predictor
    return {"epoch": 100, "arch": "resnet18", "scaler": {"scale": 65536.0}, "state_dict": {
        **under("module.base_encoder.", {**q, **mlp("fc.")}), **under("module.momentum_encoder.", {**k, **mlp("fc.")}),
        **mlp("module.predictor.", (16, 64, 16))}}


def byol(q, k):  # online / target networks
    return {"model": {**under("online_network.encoder.", q), **under("target_network.encoder.", k),
                      **mlp("online_network.projector.")}}


def solo_learn(q, k):  # solo-learn: backbone / momentum_backbone (fc = Identity), projector, classifier
    return {"epoch": 9, "state_dict": {**under("backbone.", q), **under("momentum_backbone.", k), **mlp("projector."),
                                       "classifier.weight": torch.randn(10, 512), "classifier.bias": torch.zeros(10)}}


@pytest.mark.parametrize("layout,prefix,drops", [
    ("bare", "", ["fc.bias", "fc.weight"]),
    ("state_dict/module.", "module.", ["module.fc.bias", "module.fc.weight"]),
    ("state_dict/", "", ["fc.bias", "fc.weight"]),  # SimCLR v1 resnet50-1x.pth
    ("model/encoder.", "encoder.", ["encoder.fc.bias", "encoder.fc.weight", "head.weight"]),
    ("model/backbone.", "backbone.", ["backbone.fc.bias", "backbone.fc.weight"])])
def test_single_network_layouts_import_exactly(tmp_path, layout, prefix, drops):
    source = under(prefix, resnet18(0))
    obj = {"bare": source, "state_dict/module.": {"state_dict": source, "epoch": 3}, "state_dict/": {"state_dict": source}}
    obj = obj.get(layout)
    obj = obj or {"model": {**source, **({"head.weight": torch.randn(10, 512)} if "encoder" in layout else {})}}
    ckpt = import_(tmp_path, obj, "--arch", "resnet18", "--image-size", 16)
    assert_backbone_equal(ckpt, source, prefix)
    assert (ckpt["method"], ckpt["arch"], ckpt["arch_kwargs"], ckpt["feature_dim"]) == ("imported", "resnet18",
                                                                                         {"small_stem": False}, 512)
    assert (ckpt["image_size"], ckpt["mean"], ckpt["std"], ckpt["epoch"]) == (16, [0.485, 0.456, 0.406],
                                                                            [0.229, 0.224, 0.225], 0)
    info = ckpt["imported"]
    assert info["file"] == "weights.pth" and info["prefix"] == prefix and info["dropped"] == drops
    assert info["sha256"] == hashlib.sha256((tmp_path / "weights.pth").read_bytes()).hexdigest()
    assert info["container"] == (None if layout == "bare" else layout.split("/")[0])


@pytest.mark.parametrize("layout,chosen", [(moco_v2, "module.encoder_q."), (moco_v3, "module.base_encoder."),
                                           (byol, "online_network.encoder."), (solo_learn, "backbone.")])
def test_two_network_layouts_take_the_query_network(tmp_path, capsys, layout, chosen):
    small = layout is solo_learn  # solo-learn's CIFAR ResNets: 3x3 stem, no fc
    q, k = resnet18(1, small, fc=not small), resnet18(2, small, fc=not small)
    obj = layout(q, k)
    ckpt = import_(tmp_path, obj, "--arch", "resnet18")
    assert ckpt["imported"]["prefix"] == chosen and ckpt["arch_kwargs"] == {"small_stem": small}
    assert_backbone_equal(ckpt, q)  # the query/online copy, not the key/target/momentum one
    assert ckpt["image_size"] == 224
    assert "2 prefixes fit" in capsys.readouterr().out
    dropped = ckpt["imported"]["dropped"]
    assert not any(d.startswith(chosen) and not re.match(r"fc\.", d[len(chosen):]) for d in dropped)
    assert len(dropped) == len(obj.get("state_dict") or obj["model"]) - len(ckpt["encoder"])


def test_forced_prefix_and_ambiguous_prefixes(tmp_path):
    q, k = resnet18(1), resnet18(2)
    ckpt = import_(tmp_path, moco_v2(q, k), "--arch", "resnet18", "--prefix", "module.encoder_k.")
    assert_backbone_equal(ckpt, k)
    with pytest.raises(SystemExit, match=r"several prefixes fit \('a\.', 'b\.'\): choose one with --prefix"):
        import_(tmp_path, {**under("a.", q), **under("b.", k)}, "--arch", "resnet18")


def test_file_without_num_batches_tracked(tmp_path):  # torchvision's first resnet files predate the counter
    source = {k: v for k, v in resnet18(0).items() if not k.endswith("num_batches_tracked")}
    ckpt = import_(tmp_path, source, "--arch", "resnet18")
    assert len(ckpt["imported"]["filled"]) == 20 and int(ckpt["encoder"]["bn1.num_batches_tracked"]) == 0
    assert all(torch.equal(ckpt["encoder"][k], v) for k, v in source.items() if not k.startswith("fc."))


def vit_state(seed, **kwargs):
    torch.manual_seed(seed)
    return torchvision.models.VisionTransformer(**{**VIT, **kwargs}).state_dict()


def test_torchvision_vit_keeps_its_encoder_prefix_and_reads_its_arguments(tmp_path):
    source = vit_state(0)
    ckpt = import_(tmp_path, source, "--arch", "vit", "--num-heads", 4)
    assert ckpt["arch"] == "vit" and ckpt["arch_kwargs"] == VIT and ckpt["feature_dim"] == 64
    assert ckpt["imported"]["prefix"] == "" and ckpt["image_size"] == 32
    assert_backbone_equal(ckpt, source)  # keys still begin with encoder.
    assert ckpt["imported"]["dropped"] == ["heads.head.bias", "heads.head.weight"]
    # wrapped in a model whose attribute is "encoder", with torchvision < 0.14's MLP names (linear_1, linear_2)
    legacy = {"encoder." + k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
              for k, v in source.items()}
    ckpt = import_(tmp_path, {"state_dict": legacy}, "--arch", "vit", "--num-heads", 4)
    assert ckpt["imported"]["prefix"] == "encoder." and ckpt["arch_kwargs"] == VIT
    assert_backbone_equal(ckpt, source)


def test_vit_heads_from_torchvision_table_else_flag(tmp_path):
    source = vit_state(0, image_size=16, patch_size=16, num_layers=1, num_heads=12, hidden_dim=768, mlp_dim=8)
    ckpt = import_(tmp_path, source, "--arch", "vit")
    assert ckpt["arch_kwargs"]["num_heads"] == 12 and ckpt["arch_kwargs"]["hidden_dim"] == 768
    with pytest.raises(SystemExit, match="hidden_dim 64: the number of heads cannot be read .* pass --num-heads"):
        import_(tmp_path, vit_state(0), "--arch", "vit")
    with pytest.raises(SystemExit, match="--image-size 224: the ViT's position embedding is for 32 px"):
        import_(tmp_path, vit_state(0), "--arch", "vit", "--num-heads", 4, "--image-size", 224)


def refused(tmp_path, obj, *flags):
    """The one error line of the script run as the shell does."""
    torch.save(obj, tmp_path / "bad.pth")
    proc = run(SCRIPT, "--weights", tmp_path / "bad.pth", "--out", tmp_path / "o.pt", *flags, check=False)
    assert not (tmp_path / "o.pt").exists()
    line = error_of(proc)
    assert line.startswith("import_encoder.py: error: "), line
    return line


def test_wrong_arch_missing_key_shape_mismatch_one_line_each(tmp_path):
    source = moco_v2(resnet18(1), resnet18(2))
    line = refused(tmp_path, source, "--arch", "resnet50")
    assert line.endswith("does not fit --arch resnet50: module.encoder_q.layer1.0.conv1.weight has shape (64, 64, 3, 3), "
                         "resnet50 {'small_stem': False} expects (64, 64, 1, 1) "
                         "(prefixes tried: 'module.encoder_q.', 'module.encoder_k.')")
    missing = resnet18(0)
    del missing["layer4.1.bn2.running_var"]
    line = refused(tmp_path, {"state_dict": under("module.", missing)}, "--arch", "resnet18")
    assert line.endswith("does not fit --arch resnet18: module.layer4.1.bn2.running_var missing (prefixes tried: 'module.')")
    wrong = resnet18(0)
    wrong["layer3.0.downsample.0.weight"] = torch.zeros(256, 128, 3, 3)
    line = refused(tmp_path, wrong, "--arch", "resnet18")
    assert "layer3.0.downsample.0.weight has shape (256, 128, 3, 3), resnet18 {'small_stem': False} expects " \
           "(256, 128, 1, 1) (prefixes tried: '')" in line


def test_unmappable_layouts_are_refused(tmp_path):
    def error(obj, *flags):
        with pytest.raises(SystemExit) as e:
            import_(tmp_path, obj, *flags)
        assert "\n" not in e.value.code and e.value.code.startswith("import_encoder.py: error: ")
        return e.value.code
    torch.manual_seed(0)  # lightly: nn.Sequential(*list(resnet.children())[:-1]) as "backbone"
    lightly = torch.nn.Sequential(*list(torchvision.models.resnet18().children())[:-1])
    assert "positional nn.Sequential keys (backbone.4.0.conv1.weight" in error({"state_dict": under(
        "backbone.", lightly.state_dict())}, "--arch", "resnet18")
    timm = {"cls_token": torch.zeros(1, 1, 64), "patch_embed.proj.weight": torch.zeros(64, 3, 8, 8),
            "blocks.0.attn.qkv.weight": torch.zeros(192, 64), "head.weight": torch.zeros(10, 64)}
    for arch in ("vit", "resnet50"):
        assert "a timm-named ViT (module.base_encoder.patch_embed.proj.weight; MoCo v3 ViT, MAE, DINO)" in \
            error(under("module.base_encoder.", timm), "--arch", arch)
    assert error(resnet18(0), "--arch", "densenet121").endswith("--arch densenet121: only torchvision ResNets "
                                                                "(and 'vit') are supported")
    assert "resnet18: conv1.weight missing (prefixes tried: '', 'encoder.')" in error(vit_state(0), "--arch", "resnet18")
    assert "no state dict in it" in error({"epoch": 3, "arch": "resnet18"}, "--arch", "resnet18")


class Payload:
    """Unpickling calls open(path, "w"): the file appears if the loader runs code from the file."""
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_payload_is_refused_without_running(tmp_path):
    plain = tmp_path / "plain.pth"
    with open(plain, "wb") as f:
        pickle.dump({"conv1.weight": torch.zeros(1), "x": Payload(tmp_path / "ran_plain")}, f, protocol=2)
    pickle.load(open(plain, "rb"))  # the payload works: plain unpickling runs it
    assert (tmp_path / "ran_plain").exists()
    obj = {"state_dict": {**resnet18(0), "x": Payload(tmp_path / "ran_torch")}}
    torch.save(obj, tmp_path / "torch.pth")
    line = error_of(run(SCRIPT, "--weights", tmp_path / "torch.pth", "--arch", "resnet18", "--out", tmp_path / "o.pt",
                        check=False))  # as the shell runs it: one line on stderr, naming what the file pickles
    assert line == (f"import_encoder.py: error: {tmp_path / 'torch.pth'}: refused: a zip file holding a pickled io.open, "
                    "which is not loaded (loading it would run code from the file); this script loads weights with "
                    "torch.load(weights_only=True) only")
    for protocol, says in ((2, "refused: a pickle file holding a pickled torch.storage._load_from_bytes, which is not loaded"),
                           (None, "a pickle file that torch.load(weights_only=True) cannot read (damaged?): "
                                  "Unsupported operand 149")):  # pickle.dump into a .pth: a class, a newer protocol
        path = tmp_path / f"pickle{protocol}.pth"
        with open(path, "wb") as f:
            pickle.dump({"state_dict": {**resnet18(0), "x": Payload(tmp_path / f"ran_{protocol}")}}, f, protocol=protocol)
        with pytest.raises(SystemExit, match=re.escape(f"pickle{protocol}.pth: {says}")):
            import_encoder.main(["--weights", str(path), "--arch", "resnet18", "--out", str(tmp_path / "o.pt")])
    assert sorted(os.listdir(tmp_path)) == ["pickle2.pth", "pickleNone.pth", "plain.pth", "ran_plain", "torch.pth"]
    torchscript = tmp_path / "ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(torchscript))
    with pytest.raises(SystemExit, match=r"a TorchScript archive \(code, not a state dict; e.g. OpenAI CLIP's .pt"):
        import_encoder.main(["--weights", str(torchscript), "--arch", "resnet50", "--out", str(tmp_path / "o.pt")])


def test_build_backbone_builds_what_the_consumers_build():
    for arch, kwargs in (("resnet18", {"small_stem": False}), ("resnet18", {"small_stem": True}),
                         ("resnet50", {"small_stem": False}), ("vit", VIT)):
        with torch.device("meta"):
            (ours, dim), (theirs, their_dim) = import_encoder.build_backbone(arch, kwargs), \
                linear_probe.build_backbone(arch, kwargs)
        assert dim == their_dim and {k: v.shape for k, v in ours.state_dict().items()} == \
            {k: v.shape for k, v in theirs.state_dict().items()}, (arch, kwargs)
    assert not re.search(r"^(import|from) (" + "|".join(
        os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py")) + r")\b",
        open(os.path.join(ROOT, SCRIPT)).read(), re.M)


def usage_error(capsys, *argv):
    """import_encoder.main in this process on a bad --out -> its one stderr line (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        import_encoder.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("import_encoder.py: error: --out "), err
    return err.strip()


def test_out_is_never_the_weights_and_not_replaced_without_overwrite(tmp_path, capsys):
    weights = tmp_path / "weights.pth"
    torch.save(resnet18(0), weights)
    before = weights.read_bytes()
    for out in (weights, tmp_path / "." / "weights.pth"):
        for flags in ((), ("--overwrite",)):
            assert "is --weights" in usage_error(capsys, "--weights", weights, "--arch", "resnet18", "--out", out, *flags)
    os.link(weights, tmp_path / "hardlink.pth")  # the same file under another name
    assert "is --weights" in usage_error(capsys, "--weights", weights, "--arch", "resnet18", "--out",
                                         tmp_path / "hardlink.pth", "--overwrite")
    assert weights.read_bytes() == before
    out = tmp_path / "encoder.pt"
    out.write_bytes(b"keep me")
    assert usage_error(capsys, "--weights", weights, "--arch", "resnet18", "--out", out).endswith(
        "encoder.pt exists: pass --overwrite to replace it")
    assert out.read_bytes() == b"keep me"
    import_encoder.main([str(a) for a in ("--weights", weights, "--arch", "resnet18", "--out", out, "--overwrite")])
    assert torch.load(out, weights_only=True)["method"] == "imported"
    assert sorted(os.listdir(tmp_path)) == ["encoder.pt", "hardlink.pth", "weights.pth"]


def test_folder_or_unwritable_out_refused_before_any_work(tmp_path, capsys, monkeypatch):
    weights = tmp_path / "weights.pth"
    torch.save(resnet18(0), weights)
    folder = tmp_path / "models"
    folder.mkdir()
    assert "models is a folder: give the checkpoint file to write" in usage_error(
        capsys, "--weights", weights, "--arch", "resnet18", "--out", folder, "--overwrite")
    assert os.listdir(folder) == [] and sorted(os.listdir(tmp_path)) == ["models", "weights.pth"]  # no .tmp anywhere

    def full_disk(obj, path):  # part of the file written, then the disk is full
        open(path, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"--out .*encoder.pt: cannot write it \(\[enforce fail"):
        import_encoder.main([str(a) for a in ("--weights", weights, "--arch", "resnet18", "--out", folder / "encoder.pt")])
    assert os.listdir(folder) == []
    monkeypatch.undo()
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    assert usage_error(capsys, "--weights", weights, "--arch", "resnet18", "--out", tmp_path / "notes.txt" / "e.pt").endswith(
        f"cannot write in {tmp_path / 'notes.txt'} (not a folder)")
    os.chmod(folder, 0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a read-only folder is writable")
        line = usage_error(capsys, "--weights", weights, "--arch", "resnet18", "--out", folder / "sub" / "encoder.pt")
        assert line.endswith(f"cannot write in {folder} (no permission)")
        with pytest.raises(import_encoder.Refused, match=f"--out {folder / 'encoder.pt'}: cannot write it "
                                                         r"\(Permission denied\)"):
            import_encoder.save({"x": 1}, str(folder / "encoder.pt"))  # the write itself fails: one line as well
        assert os.listdir(folder) == []
    finally:
        os.chmod(folder, 0o755)


def test_what_a_file_that_is_not_weights_is(tmp_path):
    rng = torch.Generator().manual_seed(0)
    noise = bytes([7]) + bytes(torch.randint(0, 256, (999,), generator=rng, dtype=torch.uint8).tolist())
    for name, content, says in (("noise.pth", noise, "it is some other binary file"), ("empty.pth", b"", "it is empty"),
                                ("notes.pth", b"epoch 3, lr 0.03\n", "it looks like text")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SystemExit, match=re.escape(f"{name}: not a PyTorch weights file (a zip or pickle file); {says}")):
            import_encoder.main(["--weights", str(tmp_path / name), "--arch", "resnet18", "--out", str(tmp_path / "o.pt")])
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04" + noise)
    with pytest.raises(SystemExit, match=r"cut.pth: a zip file that torch.load\(weights_only=True\) cannot read "
                                         r"\(damaged\?\): PytorchStreamReader failed reading zip archive"):
        import_encoder.main(["--weights", str(tmp_path / "cut.pth"), "--arch", "resnet18", "--out", str(tmp_path / "o.pt")])
    assert not (tmp_path / "o.pt").exists()


def reference_list(demo, tmp_path, target=1):
    line = next(ln for ln in open(demo / "train_clean.txt") if ln.split()[-1] == str(target))
    path = tmp_path / "reference.txt"
    path.write_text(f"{demo / line.rsplit(None, 1)[0]} {target}\n")
    return path


def test_imported_encoders_run_through_probe_badencoder_and_defense(demo, tmp_path):
    source = {"state_dict": under("module.encoder_q.", resnet18(3)), "epoch": 200}
    torch.save(source, tmp_path / "moco_v2_200ep_pretrain.pth.tar")
    enc = tmp_path / "encoder.pt"
    import_encoder.main([str(a) for a in ("--weights", tmp_path / "moco_v2_200ep_pretrain.pth.tar", "--arch", "resnet18",
                                          "--image-size", 16, "--out", enc)])
    m = probe(demo, enc, tmp_path / "probe")
    assert m["method"] == "imported" and m["arch"] == "resnet18" and 0 <= m["asr"] <= 100
    badencoder.main([str(v) for v in (
        "--encoder", enc, "--shadow-list", demo / "train_clean.txt", "--reference-list", reference_list(demo, tmp_path),
        "--trigger", demo / "trigger.png", "--trigger-location", "random", "--out", tmp_path / "bd", "--epochs", 1,
        "--batch-size", 8, "--workers", 0)])
    bd = torch.load(tmp_path / "bd" / "checkpoint.pt", weights_only=True)
    assert bd["source"]["method"] == "imported" and set(bd["encoder"]) == set(torch.load(enc, weights_only=True)["encoder"])
    m = probe(demo, tmp_path / "bd" / "checkpoint.pt", tmp_path / "probe_bd")  # clean and patched (trigger) val
    assert m["method"] == "badencoder" and 0 <= m["asr"] <= 100
    teacher, ckpt = compress_defense.load_encoder(str(enc))
    assert ckpt["method"] == "imported" and teacher(torch.zeros(1, 3, 16, 16)).shape == (1, 512)
    vit = import_(tmp_path, vit_state(4, image_size=16), "--arch", "vit", "--num-heads", 4, name="vit_b_16-test.pth")
    assert vit["image_size"] == 16  # the demo's patched val images are 16 px
    m = probe(demo, tmp_path / "imported" / "encoder.pt", tmp_path / "probe_vit")
    assert m["arch"] == "vit"
