"""CAMLTrainer end to end through the real nnU-Net CLI, each step in a fresh process.

``nnunet-ext plan`` (CPU plans) -> ``nnunet-ext preprocess-unlabeled`` -> ``nnUNetv2_train -tr CAMLTrainer_smoke``
-> ``--c`` -> ``nnUNetv2_predict`` (nothing CAML-specific) -> nnU-Net's evaluation. The error without preprocessed
unlabeled images is tested in process (tests/caml/test_caml_trainer.py).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from helpers_cli import (TEST_TRAINERS_DIR, console_script, predict_validation_cases_and_evaluate, run_cli,
                      subprocess_env)
from helpers_nnunet import make_tiny_dataset

pytestmark = pytest.mark.slow

DATASET = 995
NAME = "CamlE2E"
TRAINER = "CAMLTrainer_smoke"
PLANS = "nnUNetCPUPlans"
LOG_KEYS = ("caml_l_sup", "caml_l_c", "caml_l_o", "caml_ramp", "caml_occ_rows", "caml_mem_classes")



def train_cmd(*extra: str) -> list[str]:
    return [console_script("nnUNetv2_train"), str(DATASET), "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS,
            "-device", "cpu", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_caml")
    env = subprocess_env(root, extra_trainer_dirs=(TEST_TRAINERS_DIR,))
    make_tiny_dataset(root / "nnUNet_raw", dataset_id=DATASET, name=NAME, n_labelled=8, n_unlabeled=4,
                      shape=(24, 28, 32))
    run_cli([console_script("nnunet-ext"), "plan", "-d", str(DATASET), "-pl", "CPUPlanner", "-c", "3d_fullres",
         "-np", "1"], env)
    train_env = {**env, "nnUNet_n_proc_DA": "0"}
    run_cli([console_script("nnunet-ext"), "preprocess-unlabeled", "-d", str(DATASET), "-c", "3d_fullres",
         "-p", PLANS], env)
    run_cli(train_cmd(), train_env)
    fold = root / "nnUNet_results" / f"Dataset{DATASET:03d}_{NAME}" / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_0"
    return {"root": root, "env": train_env, "fold": fold}


def test_checkpoint_holds_stock_network_and_caml_state(trained):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    fold = trained["fold"]
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    extra = checkpoint["nnunet_ext"]
    assert extra["family"] == "caml"
    modules = {k.split(".", 1)[0] for k in extra["state"]["extra_modules"]}
    assert modules == {"net_a", "heads"}
    bank = extra["state"]["occ"]["memory_bank"]
    assert len(bank["features"]) > 0 and all(len(v) == 3 for v in bank["counts"].values())
    # network_weights are the vanilla model only: they load strictly into stock nnU-Net's network
    plans = PlansManager(json.loads((fold.parent / "plans.json").read_text()))
    configuration = plans.get_configuration("3d_fullres")
    stock = nnUNetTrainer.build_network_architecture(plans, configuration, 2, 3, enable_deep_supervision=False)
    stock.load_state_dict(checkpoint["network_weights"], strict=True)
    logging = checkpoint["logging"]
    for key in LOG_KEYS:
        assert len(logging[key]) == 2 and all(math.isfinite(v) for v in logging[key]), key
    assert logging["caml_mem_classes"][-1] >= 1  # OCC was active
    assert (fold / "validation" / "summary.json").exists()


def test_resume_with_c_keeps_memory_bank_and_models(trained):
    fold = trained["fold"]
    before = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    run_cli(train_cmd("--c"), trained["env"])
    after = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    for name, tensor in before["nnunet_ext"]["state"]["extra_modules"].items():
        assert torch.equal(tensor, after["nnunet_ext"]["state"]["extra_modules"][name]), name
    bank_before = before["nnunet_ext"]["state"]["occ"]["memory_bank"]
    bank_after = after["nnunet_ext"]["state"]["occ"]["memory_bank"]
    assert bank_before["counts"] == bank_after["counts"]
    for key, blocks in bank_before["features"].items():
        assert all(torch.equal(a, b) for a, b in zip(blocks, bank_after["features"][key])), key
    assert after["current_epoch"] == before["current_epoch"]


def test_predict_in_fresh_process_and_evaluate(trained):
    predict_validation_cases_and_evaluate(trained["root"], DATASET, NAME, TRAINER, PLANS, trained["env"])
