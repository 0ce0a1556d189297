"""End to end through the real nnU-Net CLI, each step in a fresh process.

plan (``nnunet-ext plan`` with the CPU planner) -> preprocess unlabeled images -> ``nnUNetv2_train`` of a test
trainer built on the shared plumbing -> ``--c`` resume -> ``nnUNetv2_predict`` -> nnU-Net's evaluation.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TEST_TRAINERS_DIR, console_script, run_cli, subprocess_env
from helpers_nnunet import make_tiny_dataset

pytestmark = pytest.mark.slow

DATASET = 991
TRAINER = "ExtSmokeTrainer"
PLANS = "nnUNetCPUPlans"



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_base")
    env = subprocess_env(root, extra_trainer_dirs=(TEST_TRAINERS_DIR,))
    make_tiny_dataset(root / "nnUNet_raw", dataset_id=DATASET, name="Smoke", n_labelled=8, n_unlabeled=4,
                      shape=(24, 28, 32))
    run_cli([console_script("nnunet-ext"), "plan", "-d", str(DATASET), "-pl", "CPUPlanner", "-c", "3d_fullres",
         "-np", "1"], env)
    run_cli([console_script("nnunet-ext"), "preprocess-unlabeled", "-d", str(DATASET), "-c", "3d_fullres",
         "-p", PLANS], env)
    train_env = {**env, "nnUNet_n_proc_DA": "0"}
    train = run_cli([console_script("nnUNetv2_train"), str(DATASET), "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS,
                 "-device", "cpu"], train_env)
    fold = root / "nnUNet_results" / f"Dataset{DATASET:03d}_Smoke" / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_0"
    return {"root": root, "env": train_env, "fold": fold, "train_stdout": train.stdout}


def test_training_writes_extra_state_logs_and_progress(trained):
    fold = trained["fold"]
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    extra = checkpoint["nnunet_ext"]
    assert extra["format"] == 1 and extra["family"] == "base"
    teacher_keys = {k.split(".", 1)[0] for k in extra["state"]["extra_modules"]}
    assert teacher_keys == {"teacher"}
    logging = checkpoint["logging"]
    for key in ("smoke_consistency", "smoke_supervised"):
        assert len(logging[key]) == 2 and all(math.isfinite(v) for v in logging[key])
    assert len(logging["train_losses"]) == 2
    log_text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "smoke_consistency" in log_text
    assert (fold / "progress.png").stat().st_size > 0
    assert (fold / "validation" / "summary.json").exists()  # nnU-Net's own final validation ran


def test_resume_with_c_restores_extra_state_bit_for_bit(trained):
    fold = trained["fold"]
    before = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    run_cli([console_script("nnUNetv2_train"), str(DATASET), "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS,
         "-device", "cpu", "--c"], trained["env"])
    after = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # training had already finished, so --c loads, re-saves and must not change a single value
    for name, tensor in before["nnunet_ext"]["state"]["extra_modules"].items():
        assert torch.equal(tensor, after["nnunet_ext"]["state"]["extra_modules"][name]), name
    for name, tensor in before["network_weights"].items():
        assert torch.equal(tensor, after["network_weights"][name]), name
    assert after["current_epoch"] == before["current_epoch"]
    assert before["logging"]["smoke_consistency"] == after["logging"]["smoke_consistency"]


def test_predict_in_fresh_process_and_evaluate(trained):
    root, env = trained["root"], trained["env"]
    raw = root / "nnUNet_raw" / f"Dataset{DATASET:03d}_Smoke"
    splits = json.loads((root / "nnUNet_preprocessed" / f"Dataset{DATASET:03d}_Smoke" / "splits_final.json")
                        .read_text())
    val_cases = splits[0]["val"]
    inputs, gt = root / "predict_in", root / "predict_gt"
    inputs.mkdir()
    gt.mkdir()
    for case in val_cases:
        for image in raw.glob(f"imagesTr/{case}_*.nii.gz"):
            (inputs / image.name).symlink_to(image)
        (gt / f"{case}.nii.gz").symlink_to(raw / "labelsTr" / f"{case}.nii.gz")
    out = root / "predict_out"
    run_cli([console_script("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(DATASET),
         "-c", "3d_fullres", "-tr", TRAINER, "-p", PLANS, "-f", "0", "-device", "cpu", "--disable_tta",
         "-npp", "1", "-nps", "1"], env)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in val_cases)
    run_cli([console_script("nnUNetv2_evaluate_simple"), str(gt), str(out), "-l", "1", "2", "-np", "1"], env)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}
    assert all(0.0 <= summary["mean"][k]["Dice"] <= 1.0 or math.isnan(summary["mean"][k]["Dice"])
               for k in summary["mean"])
