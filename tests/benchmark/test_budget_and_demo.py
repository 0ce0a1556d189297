from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import console_script

from nnunet_ext.benchmark.budget import budget_trainer_name, write_budget_trainers
from nnunet_ext.benchmark.demo import format_report


def test_budget_trainers_are_found_by_nnunet_with_their_budget(tmp_path):
    names = write_budget_trainers(tmp_path, ["nnUNetTrainer"], epochs=2, iterations=3, val_iterations=1)
    assert names == {"nnUNetTrainer": budget_trainer_name("nnUNetTrainer", 2, 3)} == {"nnUNetTrainer":
                                                                                       "nnUNetTrainer_e2i3"}
    script = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
              "import inspect\ncls = f('nnUNetTrainer_e2i3')\nprint(cls.__mro__[1].__name__)\n"
              "print(inspect.getsource(cls.__init__))")
    env = {**os.environ, "nnUNet_extTrainer": str(tmp_path)}
    python = os.path.join(os.path.dirname(console_script("nnunet-ext")), "python")
    out = subprocess.run([python, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "nnUNetTrainer" in out.stdout and "self.num_epochs = 2" in out.stdout
    assert "self.num_iterations_per_epoch = 3" in out.stdout


@pytest.mark.parametrize("kwargs, error", [({"trainers": ["NoSuchTrainer"]}, "unknown trainer"),
                                           ({"epochs": 0}, "positive"), ({"iterations": -1}, "positive")])
def test_budget_bad_input(tmp_path, kwargs, error):
    args = {"trainers": ["nnUNetTrainer"], "epochs": 1, "iterations": 1, **kwargs}
    with pytest.raises(ValueError, match=error):
        write_budget_trainers(tmp_path, **args)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_report_shows_ratios_against_stock():
    rows = [{"trainer": "nnUNetTrainer", "dice_per_label": {"1": 0.5, "2": 0.25}, "mean_dice": 0.375,
             "seconds_per_iteration": 1.0, "predict_seconds": 3.0},
            {"trainer": "XTrainer", "dice_per_label": {"1": 0.6, "2": 0.3}, "mean_dice": 0.45,
             "seconds_per_iteration": 2.5, "predict_seconds": 3.5}]
    report = format_report(rows, epochs=2, iterations=10)
    assert "| XTrainer | 0.600 | 0.300 | 0.450 | 2.50 | 2.50 | 3.5 |" in report
    assert "| nnUNetTrainer | 0.500 | 0.250 | 0.375 | 1.00 | 1.00 | 3.0 |" in report
    json.dumps(rows)


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
    """The README's main job with the smallest budget: every step through the real CLI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update({"OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg"})
    # one of our trainers (a semi-supervised one: unlabeled preprocessing is part of the pipeline); every trainer
    # has its own end-to-end test, and default_demo_trainers() is tested without training
    out = subprocess.run([console_script("nnunet-ext"), "demo", "--work-dir", str(tmp_path), "--epochs", "1",
                          "--iterations", "2", "--trainers", "ACTIONTrainer"], capture_output=True, text=True,
                         env=env, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "demo_results.json").read_text())
    assert [r["trainer"] for r in rows] == ["nnUNetTrainer", "ACTIONTrainer"]
    assert all(0.0 <= r["mean_dice"] <= 1.0 and r["seconds_per_iteration"] > 0 for r in rows)
    assert "| nnUNetTrainer |" in (tmp_path / "demo_report.md").read_text()
    assert len(list((tmp_path / "predictions" / "nnUNetTrainer_e1i2").glob("*.nii.gz"))) == 6


def test_demo_trains_every_main_segmentation_trainer():
    from nnunet_ext.benchmark.demo import default_demo_trainers

    assert sorted(default_demo_trainers()) == ["ACTIONPlusPlusTrainer", "ACTIONTrainer", "CAMLTrainer", "CIMLTrainer"]
