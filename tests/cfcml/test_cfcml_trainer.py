"""CFCML trainer in-process: set-up from the plans block (or the automatic default), balanced batches, one
training step, numeric statistics from the training fold, predictor contract, checkpoint round trip."""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from cfcml_fixtures import PLANS, writable_planned_root
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ext.cfcml.tabular import TabularDataError, fit_numeric_stats
from nnunet_ext.cfcml.trainer import CLS_LOG_KEYS, CFCMLTrainerCore, load_table
from nnunet_ext.compat import logging_dict
from nnunet_ext.plans import write_derived_plans
from nnunet_ext_trainers.cfcml_trainers import CFCMLTrainer, CFCMLTrainer_noHRM, CFCMLTrainer_tabularOnly

CFCML_PLANS = "nnUNetCPUPlans_CFCML"


@pytest.fixture
def cfcml_root(tmp_path_factory, tmp_path, monkeypatch):
    return writable_planned_root(tmp_path_factory, tmp_path, monkeypatch, masks=True)


@pytest.fixture
def cfcml_roi_root(tmp_path_factory, tmp_path, monkeypatch):
    return writable_planned_root(tmp_path_factory, tmp_path, monkeypatch, masks=False)


def dataset_folder(root, dataset_id):
    name = {801: "CfcmlTiny", 802: "CfcmlTiny"}[dataset_id]
    return root / "nnUNet_preprocessed" / f"Dataset{dataset_id:03d}_{name}"


def make_trainer(root, cls=CFCMLTrainer, dataset_id=801, plans_identifier=CFCML_PLANS, configure=True,
                 small=True):
    pre = dataset_folder(root, dataset_id)
    if configure and not (pre / f"{plans_identifier}.json").exists():
        write_derived_plans(str(pre), PLANS, plans_identifier, "cfcml", {})
    plans = json.loads((pre / f"{plans_identifier}.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((pre / "dataset.json").read_text())

    class Small(cls):  # short budget, same hooks
        pass

    Small.__name__ = cls.__name__
    trainer = Small(plans, "2d", 0, dataset_json, torch.device("cpu"))
    if small:
        trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 1, 1
    return trainer


def test_initialize_balanced_batches_and_one_step(cfcml_root):
    trainer = make_trainer(cfcml_root)
    trainer.initialize()
    assert trainer.batch_size % 3 == 0 and trainer.oversample_foreground_percent == 1.0
    assert trainer.task_kind == "classification"
    tr_keys, _ = trainer.do_split()
    mean, std = fit_numeric_stats(trainer.table, tr_keys)
    buffers = trainer.network.tabular
    assert np.allclose(buffers.numeric_mean.numpy(), mean) and np.allclose(buffers.numeric_std.numpy(), std)
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    batch = next(trainer.dataloader_train)
    labels = trainer.table.labels(list(batch["keys"])).tolist()
    assert Counter(labels) == {k: trainer.batch_size // 3 for k in range(3)}
    assert all(k in tr_keys for k in batch["keys"])
    trainer.network.train()
    before = {n: p.detach().clone() for n, p in trainer.network.named_parameters()}
    out = trainer.train_step(batch)
    for key in ("cfcml_ce", "cfcml_l_sam", "cfcml_l_up", "cfcml_l_cp", "cfcml_l_seg"):
        assert math.isfinite(float(out[key])), key
    changed = [n for n, p in trainer.network.named_parameters() if not torch.equal(before[n], p)]
    assert any(n.startswith("classifier") for n in changed) and any(n.startswith("decoder") for n in changed)
    assert any(n.startswith("tabular") for n in changed) and any(n.startswith("cie") for n in changed)


def test_iterations_default_to_majority_class_over_per_class_batch(cfcml_root):
    trainer = make_trainer(cfcml_root, small=False)
    trainer.initialize()
    tr_keys, val_keys = trainer.do_split()
    majority = max(Counter(trainer.table.labels(tr_keys).tolist()).values())
    assert trainer.num_iterations_per_epoch == math.ceil(majority / (trainer.batch_size // 3))
    assert trainer.num_val_iterations_per_epoch == math.ceil(len(val_keys) / trainer.batch_size)
    assert trainer.num_epochs == 50 and trainer.initial_lr == 5e-4
    assert isinstance(trainer.optimizer, torch.optim.Adam) and trainer.optimizer.defaults["weight_decay"] == 1e-4


def test_predictor_builds_the_same_network_from_plans_only(cfcml_root):
    trainer = make_trainer(cfcml_root)
    trainer.initialize()
    pm = PlansManager(copy.deepcopy(trainer.plans_manager.plans))
    network = CFCMLTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 3, 2,
                                                      enable_deep_supervision=False)
    network.load_state_dict(trainer.network.state_dict(), strict=True)  # numeric statistics buffers included
    network.eval()
    x = torch.randn(2, 3, *trainer.configuration_manager.patch_size)
    with torch.no_grad():
        out = network(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, *x.shape[2:])


def test_automatic_default_without_configure(cfcml_root):
    pre = dataset_folder(cfcml_root, 801)
    os.remove(pre / "splits_final.json") if (pre / "splits_final.json").exists() else None
    trainer = make_trainer(cfcml_root, plans_identifier=PLANS, configure=False)
    block = trainer.plans_manager.plans["nnunet_ext"]["cfcml"]  # stored in the plans copied to the results
    assert block["schema"]["classes"] == ["atypical", "benign", "malignant"]
    assert trainer.configuration_manager.batch_size % 3 == 0
    trainer.initialize()
    assert (pre / "splits_final.json").exists() and (pre / "tabular" / PLANS / "tabular.csv").exists()
    with pytest.raises(RuntimeError, match="configure cfcml"):
        plans = json.loads((pre / f"{PLANS}.json").read_text())
        pm = PlansManager(plans)
        CFCMLTrainer.build_network_architecture(pm, pm.get_configuration("2d"), 3, 2)


def test_no_hrm_variant_logs_nan_and_mask_free_dataset_skips_segmentation(cfcml_roi_root):
    trainer = make_trainer(cfcml_roi_root, CFCMLTrainer_noHRM, dataset_id=802)
    trainer.initialize()
    assert trainer.settings["w_seg"] == 0.0 and trainer.oversample_foreground_percent == 0.0
    assert trainer.num_val_iterations_per_epoch == 1
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.network.train()
    out = trainer.train_step(next(trainer.dataloader_train))
    assert math.isfinite(float(out["cfcml_ce"]))
    assert all(math.isnan(float(out[k])) for k in ("cfcml_l_sam", "cfcml_l_up", "cfcml_l_cp", "cfcml_l_seg"))


def test_tabular_only_variant_ignores_images(cfcml_root):
    trainer = make_trainer(cfcml_root, CFCMLTrainer_tabularOnly)
    trainer.initialize()
    network = trainer.network.eval()
    keys = trainer.do_split()[0][:2]
    tab = trainer.table.batch(keys)
    shape = (2, 3, *trainer.configuration_manager.patch_size)
    assert torch.equal(network.classify(torch.randn(shape), tab), network.classify(torch.randn(shape), tab))


def test_checkpoint_round_trip_restores_network_state_and_best_auc(cfcml_root, tmp_path):
    trainer = make_trainer(cfcml_root)
    trainer.initialize()
    trainer.best_val_auc = 0.625
    trainer.current_epoch = 3
    for key in CLS_LOG_KEYS:  # as at the end of epoch 3 (the checkpoint stores current_epoch + 1)
        logging_dict(trainer)[key] = [0.5, 0.6, 0.625, 0.6]
    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)
    extra = torch.load(path, weights_only=False)["nnunet_ext"]
    assert extra["family"] == "cfcml" and extra["state"]["best_val_auc"] == 0.625
    assert torch.equal(extra["state"]["numeric_stats"]["mean"], trainer.network.tabular.numeric_mean)

    resumed = make_trainer(cfcml_root)
    resumed.load_checkpoint(path)
    assert resumed.best_val_auc == 0.625 and resumed.current_epoch == 4
    for name, tensor in trainer.network.state_dict().items():
        assert torch.equal(tensor, resumed.network.state_dict()[name]), name
    assert logging_dict(resumed)["cfcml_val_auc"] == [0.5, 0.6, 0.625, 0.6]


def test_unsupported_setups_are_refused(cfcml_root):
    class BadOverrides(CFCMLTrainerCore):
        cfcml_overrides = {"colour": 1}

    with pytest.raises(KeyError, match="colour"):
        make_trainer(cfcml_root, BadOverrides)


def edit_noise(csv_path, value="0.5"):
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([dict(r, noise=value) for r in rows])


@pytest.mark.parametrize("edit,changed", [
    ("csv", "tabular.csv changed"),
    ("json added", "tabular.json was added or removed"),
    ("json removed", "tabular.json was added or removed"),
])
def test_raw_table_edited_after_configure_stops_the_trainer_with_the_command(cfcml_root, edit, changed):
    raw, pre = cfcml_root / "nnUNet_raw" / "Dataset801_CfcmlTiny", dataset_folder(cfcml_root, 801)
    json_path = raw / "tabular.json"
    if edit == "json removed":
        json_path.write_text(json.dumps({"fields": [{"name": "noise", "exclude": True}]}))
    write_derived_plans(str(pre), PLANS, CFCML_PLANS, "cfcml", {})
    if edit == "csv":
        edit_noise(raw / "tabular.csv")
    elif edit == "json added":
        json_path.write_text(json.dumps({"fields": [{"name": "noise", "exclude": True}]}))
    else:
        json_path.unlink()
    command = f"nnunet-ext configure cfcml -d Dataset801_CfcmlTiny -p {PLANS} -o {CFCML_PLANS} --overwrite"
    with pytest.raises(TabularDataError, match=re.escape(changed) + ".*" + re.escape(command)):
        make_trainer(cfcml_root)
    write_derived_plans(str(pre), PLANS, CFCML_PLANS, "cfcml", {}, overwrite=True)  # the command's effect
    assert make_trainer(cfcml_root).cfcml_block["table"]["csv_sha256"] is not None


def test_plans_configured_before_per_plans_copies_use_the_shared_copy_and_are_checked(cfcml_root):
    raw, pre = cfcml_root / "nnUNet_raw" / "Dataset801_CfcmlTiny", dataset_folder(cfcml_root, 801)
    plans_file = pre / f"{CFCML_PLANS}.json"
    write_derived_plans(str(pre), PLANS, CFCML_PLANS, "cfcml", {})
    plans = json.loads(plans_file.read_text())
    del plans["nnunet_ext"]["cfcml"]["table"]  # as written by an older configure, with its shared copy
    plans_file.write_text(json.dumps(plans))
    shutil.copyfile(raw / "tabular.csv", pre / "tabular.csv")
    trainer = make_trainer(cfcml_root)
    assert load_table(trainer.cfcml_block, str(pre), str(raw)).where == str(pre / "tabular.csv")
    edit_noise(raw / "tabular.csv")
    with pytest.raises(TabularDataError, match=re.escape(f"-p SOURCE_PLANS -o {CFCML_PLANS} --overwrite")):
        make_trainer(cfcml_root)
