"""End to end through the real nnU-Net CLI, each step in a fresh process.

plan (``nnunet-ext plan`` with the CPU planner) -> preprocess unlabeled images -> ``nnUNetv2_train`` of a test
trainer built on the shared plumbing -> ``--c`` resume -> ``nnUNetv2_predict`` -> nnU-Net's evaluation.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers_cli import (TEST_TRAINERS_DIR, console_script, predict_validation_cases_and_evaluate, run_cli,
                      subprocess_env)
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
    predict_validation_cases_and_evaluate(trained["root"], DATASET, "Smoke", TRAINER, PLANS, trained["env"])


def test_missing_modality_on_a_model_without_messages_needs_zero_fill(trained):
    root, env = trained["root"], trained["env"]
    ct_only = root / "ct_only"
    ct_only.mkdir()
    raw = root / "nnUNet_raw" / f"Dataset{DATASET:03d}_Smoke"
    for image in sorted(raw.glob("imagesTr/*_0000.nii.gz"))[:2]:
        (ct_only / image.name).symlink_to(image)
    predict = [console_script("nnunet-ext"), "predict", "-i", str(ct_only), "-d", str(DATASET), "-c", "3d_fullres",
               "-tr", TRAINER, "-p", PLANS, "-f", "0", "-device", "cpu", "--disable_tta", "--missing", "MRI"]
    refused = run_cli([*predict, "-o", str(root / "refused")], env, check=False)
    assert refused.returncode != 0 and "--missing-mode zero-fill" in refused.stderr
    assert not (root / "refused").exists() or not any((root / "refused").iterdir())
    run_cli([*predict, "-o", str(root / "zero_filled"), "--missing-mode", "zero-fill"], env)
    assert sorted(p.name for p in (root / "zero_filled").glob("*.nii.gz")) == \
        sorted(p.name.replace("_0000", "") for p in ct_only.iterdir())
