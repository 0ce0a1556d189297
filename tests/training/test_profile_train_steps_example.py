"""``examples/profile_train_steps.py``: times ``train_step`` of a trainer at chosen epochs (issue 15's profiles)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from helpers_nnunet import planned_tiny_root, set_nnunet_paths

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "profile_train_steps.py"
DATASET = 986


def _load_script():
    spec = importlib.util.spec_from_file_location("profile_train_steps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    return planned_tiny_root(tmp_path_factory.getbasetemp(), DATASET, n_labelled=4, n_unlabeled=0,
                             shape=(16, 20, 24))


def test_prints_seconds_per_step_and_a_profile(planned, monkeypatch, capsys):
    set_nnunet_paths(monkeypatch, planned, n_proc_da=0)
    _load_script().main(["-d", str(DATASET), "-c", "3d_fullres", "-tr", "nnUNetTrainer", "--epochs", "0", "2",
                         "--warmup", "1", "--steps", "2", "--profile"])
    out = capsys.readouterr().out
    timings = re.findall(r"nnUNetTrainer epoch (\d+): ([0-9.]+) s per training step", out)
    assert [epoch for epoch, _ in timings] == ["0", "2"]
    assert all(float(seconds) > 0 for _, seconds in timings)
    assert "train_step" in out and "cumulative" in out


def test_unknown_trainer_is_refused(planned, monkeypatch):
    set_nnunet_paths(monkeypatch, planned, n_proc_da=0)
    with pytest.raises(RuntimeError, match="NoSuchTrainer"):
        _load_script().main(["-d", str(DATASET), "-c", "3d_fullres", "-tr", "NoSuchTrainer"])
