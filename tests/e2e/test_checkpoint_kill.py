"""A real SIGKILL in the middle of a checkpoint write, then ``nnUNetv2_train --c`` finishes the training.

The test trainer (``tests/trainer_fixtures/nnunet_ext_checkpoint_test_trainers.py``) hangs half-way through its
second ``checkpoint_latest.pth`` write, so the kill lands inside the write every time.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from helpers_cli import TEST_TRAINERS_DIR, console_script, run_cli, subprocess_env
from helpers_nnunet import make_tiny_dataset, plan_and_preprocess, set_nnunet_paths

pytestmark = pytest.mark.slow

DATASET = 989
TRAINER = "ExtKillableSaveTrainer"


def test_sigkill_during_a_save_and_c_finishes_the_training(tmp_path, monkeypatch):
    set_nnunet_paths(monkeypatch, tmp_path)
    make_tiny_dataset(tmp_path / "nnUNet_raw", dataset_id=DATASET, name="Kill", n_labelled=5, n_unlabeled=0)
    plan_and_preprocess(DATASET)
    env = {**subprocess_env(tmp_path, extra_trainer_dirs=(TEST_TRAINERS_DIR,)), "nnUNet_n_proc_DA": "0"}
    train = [console_script("nnUNetv2_train"), str(DATASET), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]
    fold = tmp_path / "nnUNet_results" / f"Dataset{DATASET:03d}_Kill" / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    marker = tmp_path / "hanging_in_save"

    process = subprocess.Popen(train, env={**env, "NNUNET_EXT_TEST_HANG_IN_SAVE": str(marker)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), f"training ended ({process.returncode}) or timed out before its second save"
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the session started for this process only
        process.wait()

    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1 and "nnunet_ext" in latest  # the previous save, intact
    assert list(fold.glob("*.tmp")), "the killed write should have left its temporary file"

    resumed = run_cli([*train, "--c"], env)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3 and final["nnunet_ext"]["family"] == "base"
    assert "Epoch 1" in resumed.stdout and "Epoch 0" not in resumed.stdout  # continued, not restarted
    assert not list(fold.glob("*.tmp"))
