"""scripts/ctrl_spectrum.py: the CTRL trigger in the DCT of the crops a trainer sees, with known answers."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np

from conftest import ROOT, TINY

spec = importlib.util.spec_from_file_location("ctrl_spectrum", os.path.join(ROOT, "scripts", "ctrl_spectrum.py"))
cs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cs)
SCRIPT = os.path.join(ROOT, "scripts", "ctrl_spectrum.py")


def test_summary_of_a_constructed_difference():
    d = np.zeros((2, 32, 32, 2))
    d[:, 15, 15, :], d[:, 31, 31, :], d[0, 3, 4, 0] = 100.0, 60.0, 80.0
    s = cs.summary(d, 100.0)
    assert s["mean_at_positions"] == {"15,15": 100.0, "31,31": 60.0} and s["peak"] == [15, 15]
    share0 = (2 * 100 ** 2 + 2 * 60 ** 2) / (2 * 100 ** 2 + 2 * 60 ** 2 + 80 ** 2)
    assert abs(s["energy_share_at_positions_pct"] - 100 * (share0 + 1) / 2) < 1e-9


def test_uncropped_native_images_keep_the_trigger_and_val_crops_have_it(tmp_path):
    """Demo images of 32 px = one window: with --scale 1 1 the 'crop' is the whole image (PIL resizes 32 -> 32 as a
    copy), so the train crops carry the magnitude at CTRL's positions as the patched val crops do, up to uint8 rounding
    and the 0-255 clamp; with the default scale 0.2-1 the zoom moves the trigger's energy elsewhere."""
    out = tmp_path / "c"
    subprocess.run([sys.executable, os.path.join(ROOT, "poison.py"), "--out", str(out), *TINY, "--trigger", "ctrl",
                    "--val-crop", "32"], check=True, capture_output=True, timeout=300)
    for scale, check in (("1 1", lambda s: min(s["mean_at_positions"].values()) > 80 and
                          s["energy_share_at_positions_pct"] > 80),
                         ("0.2 1.0", lambda s: max(s["mean_at_positions"].values()) < 40)):
        r = subprocess.run([sys.executable, SCRIPT, str(out), "--scale", *scale.split(), "--crops", "2",
                            "--out", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        s = json.load(open(tmp_path / "s.json"))
        assert check(s["train_crops"]), (scale, s["train_crops"])
        assert min(s["val_patched"]["mean_at_positions"].values()) > 80, s["val_patched"]
        assert "patched val" in r.stdout and "train crops" in r.stdout


def test_refuses_another_trigger(tmp_path):
    os.makedirs(tmp_path / "p")
    (tmp_path / "p" / "poison.json").write_text(json.dumps({"trigger": {"kind": "htba", "family": "patch"}}))
    r = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "p")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "poison.json: trigger 'htba' is not ctrl" in r.stderr
