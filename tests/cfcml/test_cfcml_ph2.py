"""The PH2 real-data path once: converter (20 labelled cases) -> CPU plans (2d) -> configure cfcml -> trainer
initialisation, one class-balanced training step and whole-case validation probabilities."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from cfcml_fixtures import plan_2d_with_cpu_planner
from helpers_nnunet import set_nnunet_paths

from nnunet_ext.plans import write_derived_plans

pytestmark = pytest.mark.slow

DATASET = 804


def test_ph2_plans_configures_and_trains_one_step(shared_data, tmp_path, monkeypatch):
    from nnunet_ext.conversion.ph2 import convert_ph2
    from nnunet_ext_trainers.cfcml_trainers import CFCMLTrainer

    folders = set_nnunet_paths(monkeypatch, tmp_path)
    raw = convert_ph2(shared_data / "PH2", DATASET, output=folders["nnUNet_raw"], labeled="20", seed=0)
    plan_2d_with_cpu_planner(DATASET)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    pre = folders["nnUNet_preprocessed"] / raw.name
    plans = json.loads(open(write_derived_plans(str(pre), "nnUNetCPUPlans", "nnUNetCPUPlans_CFCML", "cfcml",
                                                {"batch_size": 6})).read())
    block = plans["nnunet_ext"]["cfcml"]
    assert sorted(block["schema"]["classes"]) == ["atypical_nevus", "common_nevus", "melanoma"]
    assert block["settings"]["mask_free"] is False and block["settings"]["image_groups"] == [[0, 1, 2]]
    fields = {f["name"]: f for f in block["schema"]["fields"]}
    assert fields["pigment_network"]["type"] == "categorical"
    assert set(fields["pigment_network"]["categories"]) <= {"AT", "T"}
    assert fields["asymmetry"]["type"] == "numeric"  # 0/1/2 (declare it categorical in tabular.json if wanted)

    plans["continue_training"] = False
    dataset_json = json.loads((pre / "dataset.json").read_text())
    trainer = CFCMLTrainer(plans, "2d", 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    batch = next(trainer.dataloader_train)
    assert Counter(trainer.table.labels(list(batch["keys"])).tolist()) == {0: 2, 1: 2, 2: 2}
    trainer.network.train()
    out = trainer.train_step(batch)
    assert all(math.isfinite(float(out[k])) for k in ("loss", "cfcml_ce", "cfcml_l_sam", "cfcml_l_seg"))
    _, val_keys = trainer.do_split()
    probabilities = trainer.predict_validation_cases(list(val_keys))
    assert probabilities.shape == (len(val_keys), 3) and np.allclose(probabilities.sum(1), 1.0, atol=1e-5)
