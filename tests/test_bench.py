"""scripts/bench.py: the model step of a trainer on a replayed batch, the log reader and the table."""
import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench  # noqa: E402


@pytest.mark.usefixtures("one_thread")
def test_model_step_gives_a_rate_and_logs_beside_its_out(demo, tmp_path):
    out = tmp_path / "rotnet-step"
    argv = ["--train-list", str(demo / "train_clean.txt"), "--image-size", "16", "--batch-size", "4", "--device", "cpu",
            "--save-every", "1000", "--out", str(out)]
    rate = bench.model_step("rotnet", argv, steps=1, epochs=1)
    assert rate > 0
    assert bench.epoch_rates(out / "log.jsonl")[0] == [rate]
    assert os.path.exists(str(out) + ".log")  # the trainer's own output, not the bench's
    assert bench.Replay("batch", 3).__len__() == 3 and list(bench.Replay("batch", 2)) == ["batch", "batch"]


def test_epoch_rates_and_the_table(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [{"args": {}}, {"epoch": 1, "images_per_s": 50.0, "peak_gpu_mib": None},
                                                      {"epoch": 2, "images_per_s": 90.0, "peak_gpu_mib": 1234.5}]) + "\n")
    assert bench.epoch_rates(log) == ([50.0, 90.0], 1234.5)
    (tmp_path / "empty.jsonl").write_text('{"args": {}}\n')
    with pytest.raises(ValueError, match="no epoch logged"):
        bench.epoch_rates(tmp_path / "empty.jsonl")
    text = bench.table([("moco", 100.0, 89.0, 0), ("byol", "failed: x", 0, 0)], "CPU")
    assert "| moco | 100 | 89 | 0.89 | - |" in text and "| byol | failed: x | | | |" in text


def test_set_names_a_known_trainer(capsys):
    with pytest.raises(SystemExit, match="unknown trainer 'mocco'"):
        bench.main(["--set", "mocco=--m 0.9", "--out", "unused"])
