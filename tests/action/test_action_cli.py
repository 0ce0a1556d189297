"""ACTION end to end through the stock nnU-Net CLI, each step in a fresh process.

``nnunet-ext plan`` (CPU plans) -> ``preprocess-unlabeled`` -> ``nnUNetv2_train -tr ACTIONTrainer_smoke`` (three
one-epoch stages) -> ``--c`` -> ``nnUNetv2_predict`` -> nnU-Net's evaluation; ACTION++ is trained and predicted too.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers_cli import (TEST_TRAINERS_DIR, console_script, predict_validation_cases_and_evaluate, run_cli,
                      subprocess_env)
from helpers_nnunet import make_tiny_dataset
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

pytestmark = pytest.mark.slow

DATASET = 995
NAME = "ActionSmoke"
PLANS = "nnUNetCPUPlans"



def fold_folder(root, trainer):
    return root / "nnUNet_results" / f"Dataset{DATASET:03d}_{NAME}" / f"{trainer}__{PLANS}__3d_fullres" / "fold_0"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_action")
    env = subprocess_env(root, extra_trainer_dirs=(TEST_TRAINERS_DIR,))
    make_tiny_dataset(root / "nnUNet_raw", dataset_id=DATASET, name=NAME, n_labelled=6, n_unlabeled=4,
                      shape=(24, 28, 32))
    run_cli([console_script("nnunet-ext"), "plan", "-d", str(DATASET), "-pl", "CPUPlanner", "-c", "3d_fullres",
         "-np", "1"], env)
    run_cli([console_script("nnunet-ext"), "preprocess-unlabeled", "-d", str(DATASET), "-c", "3d_fullres",
         "-p", PLANS], env)
    return {"root": root, "env": {**env, "nnUNet_n_proc_DA": "0"}}


def train(prepared, trainer, *extra):
    return run_cli([console_script("nnUNetv2_train"), str(DATASET), "3d_fullres", "0", "-tr", trainer, "-p", PLANS,
                "-device", "cpu", *extra], prepared["env"])


def test_action_trains_through_all_stages_resumes_and_predicts(prepared):
    trainer = "ACTIONTrainer_smoke"
    train(prepared, trainer)
    fold = fold_folder(prepared["root"], trainer)
    before = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    state = before["nnunet_ext"]["state"]
    assert before["trainer_name"] == trainer and before["nnunet_ext"]["family"] == "action"
    assert state["stage"] == 2 and state["stage_epochs"] == [1, 1, 1]
    log = before["logging"]
    assert log["action_stage"] == [0.0, 1.0, 2.0]
    assert math.isfinite(log["action_l_glob"][0]) and math.isfinite(log["action_l_loc"][1])
    assert all(math.isfinite(log[k][2]) for k in ("action_l_sup", "action_l_unsup", "action_l_anco"))
    assert math.isnan(log["action_l_anco"][0])
    log_text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "entering stage ii" in log_text and "entering stage iii" in log_text
    assert (fold / "validation" / "summary.json").exists()

    # --c on a finished run loads everything (stage-iii optimiser groups included) and changes nothing
    train(prepared, trainer, "--c")
    after = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    for name, tensor in before["nnunet_ext"]["state"]["extra_modules"].items():
        assert torch.equal(tensor, after["nnunet_ext"]["state"]["extra_modules"][name]), name
    for name, tensor in before["network_weights"].items():
        assert torch.equal(tensor, after["network_weights"][name]), name
    assert after["nnunet_ext"]["state"]["stage"] == 2

    predict_validation_cases_and_evaluate(prepared["root"], DATASET, NAME, trainer, PLANS, prepared["env"])


def test_action_plus_plus_trains_through_all_stages(prepared):
    trainer = "ACTIONPlusPlusTrainer_smoke"
    train(prepared, trainer)
    checkpoint = torch.load(fold_folder(prepared["root"], trainer) / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)
    extra = checkpoint["nnunet_ext"]["state"]["extra_modules"]
    assert "rep_head_ema.0.weight" in extra and "centres.centres" in extra
    assert (extra["saacl_labels.items"] >= 0).any()
    assert math.isfinite(checkpoint["logging"]["action_l_saacl"][2])
    # the predictor's route (stock builder from the copied plans, strict load) without a second prediction run
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    fold = fold_folder(prepared["root"], trainer)
    plans_manager = PlansManager(str(fold.parent / "plans.json"))
    configuration = plans_manager.get_configuration("3d_fullres")
    net = nnUNetTrainer.build_network_architecture(plans_manager, configuration, 2, 3, enable_deep_supervision=False)
    net.load_state_dict(checkpoint["network_weights"], strict=True)
