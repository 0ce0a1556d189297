from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers_cli import console_script

from nnunet_ext.benchmark.budget import budget_trainer_name, write_budget_trainers
from nnunet_ext.benchmark.demo import SETTINGS_FILE, check_demo_inputs, DEMO_MODES
from nnunet_ext.benchmark.demo_report import format_report, plot_demo_dice
from nnunet_ext.errors import InputError


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


def _row(trainer: str, dice: tuple[float, float], seconds_per_iteration: float, busy: str | None = None,
         cpu: float | None = 40.0) -> dict:
    return {"trainer": trainer, "dice_per_label": {"1": dice[0], "2": dice[1]}, "mean_dice": sum(dice) / 2,
            "seconds_per_iteration": seconds_per_iteration, "predict_seconds": 3.0, "train_cpu_seconds": cpu,
            "train_wall_seconds": 30.0, "load_average": 1.5, "cpu_count": 2, "busy": busy,
            "progress_png": f"/w/nnUNet_results/{trainer}/fold_0/progress.png"}


def test_report_shows_ratios_against_stock():
    rows = [_row("nnUNetTrainer", (0.5, 0.25), 1.0), _row("XTrainer", (0.6, 0.3), 2.5, cpu=None)]
    report = format_report(rows, epochs=2, iterations=10, configuration="2d", dice_png="demo_dice.png")
    assert "| XTrainer | 0.600 | 0.300 | 0.450 | 2.50 | 2.50 | n/a | 30 | 1.5 | 3.0 |" in report
    assert "| nnUNetTrainer | 0.500 | 0.250 | 0.375 | 1.00 | 1.00 | 40 | 30 | 1.5 | 3.0 |" in report
    assert "Unreliable" not in report and "*" not in report
    assert "`demo_dice.png`" in report and "- XTrainer: `/w/nnUNet_results/XTrainer/fold_0/progress.png`" in report
    json.dumps(rows)


@pytest.mark.parametrize("busy_trainers, marked_speed, marked_ratio", [
    ({"XTrainer"}, {"XTrainer"}, {"XTrainer"}),
    ({"nnUNetTrainer"}, {"nnUNetTrainer"}, {"nnUNetTrainer", "XTrainer"}),  # stock is every ratio's base
])
def test_report_marks_timings_of_a_busy_machine(busy_trainers, marked_speed, marked_ratio):
    rows = [_row(t, (0.5, 0.5), s, busy="mean 1-min load average 11.7 on 2 core(s)" if t in busy_trainers else None)
            for t, s in (("nnUNetTrainer", 1.0), ("XTrainer", 2.0))]
    report = format_report(rows, epochs=2, iterations=10)
    for row in rows:
        cells = next(line for line in report.splitlines() if line.startswith(f"| {row['trainer']} |")).split(" | ")
        assert cells[4].endswith("*") == (row["trainer"] in marked_speed)
        assert cells[5].endswith("*") == (row["trainer"] in marked_ratio)
    assert "Unreliable: the machine was busy while " + ", ".join(sorted(busy_trainers)) in report
    assert "11.7 on 2 core(s)" in report


def test_dice_picture(tmp_path):
    path = plot_demo_dice([_row("nnUNetTrainer", (0.5, 0.25), 1.0), _row("XTrainer", (0.6, 0.3), 2.5)],
                          tmp_path / "demo_dice.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "--epochs must be positive"),
    ({"iterations": -2}, "--iterations must be positive"),
    ({"heartbeat_seconds": 0}, "--heartbeat must be positive"),
    ({"trainers": ["NoSuchTrainer"]}, "--trainers: unknown trainer 'NoSuchTrainer'"),
    ({"trainers": ["CAMLTrainer", "CFCMLTrainer"]}, r"--trainers: \['CFCMLTrainer'\] are not segmentation"),
])
def test_demo_bad_options(tmp_path, kwargs, message):
    args = {"mode": DEMO_MODES["quick"], "epochs": 1, "iterations": 1, "trainers": [], "heartbeat_seconds": 30,
            **kwargs}
    with pytest.raises(InputError, match=message):
        check_demo_inputs(tmp_path / "work", **args)
    assert not (tmp_path / "work").exists()


def test_demo_refuses_a_work_dir_of_the_other_size(tmp_path):
    full = DEMO_MODES["full"]
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"name": "full", "configuration": full.configuration,
                                                      "shape": list(full.shape)}))
    check_demo_inputs(tmp_path, full, 1, 1, [], 30)  # the same size: reused
    with pytest.raises(InputError, match=f"{tmp_path} holds a 'full' demo .*not a 'quick' one"):
        check_demo_inputs(tmp_path, DEMO_MODES["quick"], 1, 1, [], 30)


def test_demo_command_prints_bad_options_as_one_line(tmp_path):
    out = subprocess.run([console_script("nnunet-ext"), "demo", "--work-dir", str(tmp_path / "w"), "--epochs", "0"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "nnunet-ext demo: error: --epochs must be positive, got 0"
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
    """The README's main job with the smallest budget: every step through the real CLI, with progress lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update({"OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg"})
    # one of our trainers (a semi-supervised one: unlabeled preprocessing is part of the pipeline); every trainer
    # has its own end-to-end test, and default_demo_trainers() is tested without training
    out = subprocess.run([console_script("nnunet-ext"), "demo", "--work-dir", str(tmp_path), "--epochs", "2",
                          "--iterations", "2", "--trainers", "ACTIONTrainer", "--heartbeat", "20"],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "demo_results.json").read_text())
    assert [r["trainer"] for r in rows] == ["nnUNetTrainer", "ACTIONTrainer"]
    assert all(0.0 <= r["mean_dice"] <= 1.0 and r["seconds_per_iteration"] > 0 and r["train_cpu_seconds"] > 0
               for r in rows)
    for run, trainer in enumerate(("nnUNetTrainer", "ACTIONTrainer"), 1):
        for epoch in (1, 2):
            assert re.search(rf"^\[run {run}/2 {trainer}\] epoch {epoch}/2  loss -?\d+\.\d+  elapsed \d+:\d\d  run "
                             rf"left ~\d+:\d\d  demo left ~\d+:\d\d$", out.stdout, re.MULTILINE), out.stdout
    report = (tmp_path / "demo_report.md").read_text()
    assert "| nnUNetTrainer |" in report and "progress.png" in report
    assert (tmp_path / "demo_dice.png").is_file()
    assert all(Path(r["progress_png"]).is_file() and Path(r["train_log"]).is_file() for r in rows)
    assert len(list((tmp_path / "predictions" / "nnUNetTrainer_e2i2").glob("*.nii.gz"))) == 6
    assert not list(tmp_path.glob("nnUNet_results/*/*/fold_0/validation"))  # final validation skipped: test split


def test_demo_trains_every_main_segmentation_trainer():
    from nnunet_ext.benchmark.demo import default_demo_trainers

    assert sorted(default_demo_trainers()) == ["ACTIONPlusPlusTrainer", "ACTIONTrainer", "CAMLTrainer", "CIMLTrainer"]
