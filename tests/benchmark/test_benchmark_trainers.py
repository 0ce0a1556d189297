"""Seeded budget trainers, trainer traits through nnU-Net's lookup, and the measuring wrapper."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_cli import TEST_TRAINERS_DIR

from nnunet_ext.benchmark.budget import (
    BUDGET_MODULE,
    Budget,
    load_trainer_from_file,
    seed_everything,
    write_benchmark_trainers,
)
from nnunet_ext.benchmark.measure import TreeMemorySampler, main, process_tree
from nnunet_ext.benchmark.trainer_info import trainer_traits

FIXTURES = Path(__file__).resolve().parent / "fixture_trainers"


def test_seeded_budget_trainers_are_found_by_nnunet(tmp_path):
    names = write_benchmark_trainers(tmp_path, ["nnUNetTrainer", "BenchCrashTrainer"], Budget(2, 3, 1), [0, 7],
                                     skip_final_validation=True, extra_trainer_dirs=[FIXTURES])
    assert names == {("nnUNetTrainer", 0): "nnUNetTrainer_e2i3s0", ("nnUNetTrainer", 7): "nnUNetTrainer_e2i3s7",
                     ("BenchCrashTrainer", 0): "BenchCrashTrainer_e2i3s0",
                     ("BenchCrashTrainer", 7): "BenchCrashTrainer_e2i3s7"}
    script = ("import inspect\nfrom nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
              "cls = f('BenchCrashTrainer_e2i3s7')\nprint('BASE', cls.__mro__[1].__name__)\n"
              "print(inspect.getsource(cls.__init__))\n"
              "print(inspect.getsource(cls.__dict__['perform_actual_validation']))")
    env = {**os.environ, "nnUNet_extTrainer": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "BASE BenchCrashTrainer" in out.stdout
    for line in ("seed_everything(7)", "self.num_epochs = 2", "self.num_iterations_per_epoch = 3",
                 "self.num_val_iterations_per_epoch = 1", "def perform_actual_validation"):
        assert line in out.stdout


def test_final_validation_is_kept_on_request(tmp_path):
    write_benchmark_trainers(tmp_path, ["nnUNetTrainer"], Budget(1, 1), [0], skip_final_validation=False)
    source = (tmp_path / BUDGET_MODULE).read_text()
    assert "perform_actual_validation" not in source and "seed_everything(0)" in source


@pytest.mark.parametrize("seeds, trainers, message", [
    ([], ["nnUNetTrainer"], "seeds"), ([1, 1], ["nnUNetTrainer"], "seeds"), ([-1], ["nnUNetTrainer"], "seeds"),
    ([0], ["NoSuchTrainer"], "unknown trainer"),
])
def test_benchmark_trainers_bad_input(tmp_path, seeds, trainers, message):
    with pytest.raises(ValueError, match=message):
        write_benchmark_trainers(tmp_path, trainers, Budget(1, 1), seeds)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("epochs, iterations, val_iterations", [(0, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_budget_must_be_positive(epochs, iterations, val_iterations):
    with pytest.raises(ValueError, match="positive"):
        Budget(epochs, iterations, val_iterations)


def test_seed_everything_makes_every_generator_repeat():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    seed_everything(5)
    first = draw()
    seed_everything(5)
    assert draw() == first
    seed_everything(6)
    assert draw() != first


def test_load_trainer_from_file_registers_a_private_module():
    cls = load_trainer_from_file("BenchCrashTrainer", str(FIXTURES / "nnunet_ext_benchmark_test_trainers.py"))
    assert cls.__name__ == "BenchCrashTrainer" and cls.__module__.startswith("_nnunet_ext_budget_source_")
    assert load_trainer_from_file("BenchCrashTrainer", str(FIXTURES / "nnunet_ext_benchmark_test_trainers.py")) \
        is cls


@pytest.mark.parametrize("name, dirs, task_kind, semi_supervised", [
    ("nnUNetTrainer", (), "segmentation", False),
    ("BenchClassifierTrainer", (FIXTURES,), "classification", False),
    ("ExtSmokeTrainer", (TEST_TRAINERS_DIR,), "segmentation", True),
])
def test_trainer_traits(name, dirs, task_kind, semi_supervised):
    traits = trainer_traits(name, dirs)
    assert (traits.name, traits.task_kind, traits.semi_supervised) == (name, task_kind, semi_supervised)


def test_trainer_traits_unknown_trainer_and_env_restored(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", "/some/folder")
    with pytest.raises(ValueError, match="NoSuchTrainer"):
        trainer_traits("NoSuchTrainer")
    assert os.environ["nnUNet_extTrainer"] == "/some/folder"


def test_memory_sampler_sees_a_child_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; a = bytearray(300 * 2**20); a[::4096] = "
                              "b'x' * len(a[::4096]); print('ready', flush=True); time.sleep(3)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert child.pid in process_tree(os.getpid())
        with TreeMemorySampler(interval=0.05) as sampler:
            time.sleep(0.2)
        assert sampler.peak_mb >= 300
    finally:
        child.kill()
        child.wait()


def test_memory_sampler_bad_interval():
    with pytest.raises(ValueError, match="interval"):
        TreeMemorySampler(interval=0)


def test_measure_writes_stats_also_when_the_command_fails(tmp_path):
    stats_file = tmp_path / "stats.json"
    code = main(["--stats", str(stats_file), "predict", "--", "--no-such-option"])
    stats = json.loads(stats_file.read_text())
    assert code == 2 and stats["returncode"] == 2  # argparse's exit code of nnUNetv2_predict
    assert stats["args"] == ["--no-such-option"] and stats["peak_rss_mb"] > 0 and stats["wall_seconds"] > 0
