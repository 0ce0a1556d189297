"""CIML trainers in process on tiny planned datasets (CPU plans): label and region datasets, 3D and 2D, the
automatic default and configured plans, loss terms and logs, variants, and an exact checkpoint round trip."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from ciml_testing import single_torch_thread  # noqa: F401
from helpers_nnunet import make_tiny_dataset, plan_and_preprocess, set_nnunet_paths

from nnunet_ext.plans import write_derived_plans
from nnunet_ext_trainers.ciml_trainers import (
    CIMLTrainer,
    CIMLTrainer_noMessages,
    CIMLTrainer_noVIB,
    CIMLTrainer_sharedMsg,
)

LABELS_ID, REGIONS_ID = 981, 982
LABEL_SUBTASKS = {"subtasks": [{"name": "a", "targets": ["a"], "primary": 0, "auxiliary": [1]},
                               {"name": "b", "targets": ["b"], "primary": 1, "auxiliary": [0]}]}
REGION_SUBTASKS = {"subtasks": [{"name": "ab", "targets": ["ab"], "primary": 1, "auxiliary": "all"},
                                {"name": "b", "targets": ["b"], "primary": 0, "auxiliary": "all"}]}


def _plan(root: Path, dataset_id: int, name: str, regions: bool) -> Path:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset, preprocess_dataset

    from nnunet_ext_planners.cpu_planner import CPUPlanner

    with pytest.MonkeyPatch.context() as mp:
        folders = set_nnunet_paths(mp, root)
        raw = make_tiny_dataset(folders["nnUNet_raw"], dataset_id=dataset_id, name=name, n_labelled=5,
                                n_unlabeled=0, shape=(20, 24, 28))
        if regions:
            dataset_json = json.loads((raw / "dataset.json").read_text())
            dataset_json["labels"] = {"background": 0, "ab": [1, 2], "b": 2}
            dataset_json["regions_class_order"] = [1, 2]
            (raw / "dataset.json").write_text(json.dumps(dataset_json))
        plan_and_preprocess(dataset_id, configurations=())  # fast fingerprint (+ default plans, unused)
        mp.setenv("nnUNet_n_proc_DA", "1")
        plan_experiment_dataset(dataset_id, CPUPlanner)
        preprocess_dataset(dataset_id, "nnUNetCPUPlans", ("3d_fullres", "2d"), [1, 1], verbose=False,
                           show_progress_bar=False)
    return folders["nnUNet_preprocessed"] / f"Dataset{dataset_id:03d}_{name}"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("ciml_trainer")
    labels = _plan(root, LABELS_ID, "CimlLabels", regions=False)
    regions = _plan(root, REGIONS_ID, "CimlRegions", regions=True)
    write_derived_plans(str(labels), "nnUNetCPUPlans", "nnUNetCPUPlans_CIML", "ciml", LABEL_SUBTASKS)
    write_derived_plans(str(regions), "nnUNetCPUPlans", "nnUNetCPUPlans_CIML", "ciml", REGION_SUBTASKS)
    return {"root": root, "labels": labels, "regions": regions}


@pytest.fixture
def make_trainer(planned, monkeypatch):
    set_nnunet_paths(monkeypatch, planned["root"], n_proc_da=0)

    def make(cls=CIMLTrainer, dataset="labels", plans="nnUNetCPUPlans_CIML", configuration="3d_fullres",
             initialize=True):
        folder = planned[dataset]
        p = json.loads((folder / f"{plans}.json").read_text())
        p["continue_training"] = False
        trainer = cls(copy.deepcopy(p), configuration, 0, json.loads((folder / "dataset.json").read_text()),
                      device=torch.device("cpu"))
        if initialize:
            trainer.initialize()
        return trainer

    return make


def _batch(trainer, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn((2, trainer.num_input_channels, *patch), generator=g)
    with torch.no_grad():
        shapes = [o.shape[2:] for o in trainer.network(data)]
    if trainer.label_manager.has_regions:
        target = [torch.randint(0, 2, (2, 2, *s), generator=g).float() for s in shapes]
    else:
        target = [torch.randint(0, 3, (2, 1, *s), generator=g).float() for s in shapes]
    return {"data": data, "target": target, "keys": ["x", "y"]}


@pytest.mark.parametrize("dataset, plans, configuration, mode", [
    ("labels", "nnUNetCPUPlans_CIML", "3d_fullres", "labels"),
    ("regions", "nnUNetCPUPlans_CIML", "3d_fullres", "regions"),
    ("labels", "nnUNetCPUPlans", "2d", "direct"),        # automatic default, 2D
    ("regions", "nnUNetCPUPlans", "3d_fullres", "direct"),
])
def test_train_step_and_eval_output(make_trainer, dataset, plans, configuration, mode):
    trainer = make_trainer(dataset=dataset, plans=plans, configuration=configuration)
    assert trainer.ciml_config["resolved"]["output_mode"] == mode
    trainer.beta_now = 0.5  # large, so that a wrong KL term would show in the total
    out = trainer.train_step(_batch(trainer))
    assert set(out) == {"loss", "ciml_loss_seg", "ciml_kl_total", "ciml_beta"}
    assert math.isfinite(float(out["loss"]))
    assert float(out["loss"]) == pytest.approx(float(out["ciml_loss_seg"]) + 0.5 * float(out["ciml_kl_total"]),
                                               rel=1e-5)
    trainer.set_deep_supervision_enabled(False)
    assert all(not d.deep_supervision for d in trainer.network.decoders)
    trainer.network.eval()
    data = _batch(trainer)["data"]
    with torch.no_grad():
        logits = trainer.network(data)
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, trainer.label_manager.num_segmentation_heads, *data.shape[2:])


def test_builder_matches_the_trained_network_from_plans_alone(make_trainer):
    """What nnU-Net's predictor does: build on the class from plans, load network_weights strictly."""
    trainer = make_trainer()
    network = CIMLTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                     trainer.num_input_channels,
                                                     trainer.label_manager.num_segmentation_heads,
                                                     enable_deep_supervision=False)
    network.load_state_dict(trainer.network.state_dict(), strict=True)


def test_beta_schedule_logs_and_kl_file_over_epochs(make_trainer):
    trainer = make_trainer()
    trainer.num_epochs = 20  # warm-up over 2 epochs
    betas = []
    for epoch in range(3):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        betas.append(trainer.beta_now)
        outputs = [trainer.train_step(_batch(trainer, s)) for s in range(2)]
        trainer.on_train_epoch_end(outputs)
    assert betas == pytest.approx([0.0, 0.5e-3, 1e-3])
    assert trainer.logger.get_value("ciml_beta", step=None) == pytest.approx(betas)
    for key in ("ciml_loss_seg", "ciml_kl_total", "ciml_beta"):
        assert len(trainer.logger.get_value(key, step=None)) == 3
    records = json.loads((Path(trainer.output_folder) / "ciml_kl.json").read_text())
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert sorted(records[0]["kl_pairs"]) == ["CT->b", "MRI->a"]
    assert records[-1]["kl_total"] == pytest.approx(sum(records[-1]["kl_pairs"].values()))
    assert records[-1]["kl_total"] == pytest.approx(trainer.logger.get_value("ciml_kl_total", step=-1), rel=1e-5)


@pytest.mark.parametrize("cls, check", [
    (CIMLTrainer_noMessages, lambda net: len(net.messages) == 0),
    (CIMLTrainer_noVIB, lambda net: all(not m.encoder.variational for m in net.messages.values())),
    (CIMLTrainer_sharedMsg, lambda net: len(net.shared_encoders) > 0),
])
def test_variants_build_and_train(make_trainer, cls, check):
    trainer = make_trainer(cls)
    assert check(trainer.network)
    out = trainer.train_step(_batch(trainer))
    assert math.isfinite(float(out["loss"]))
    if cls is CIMLTrainer_noMessages:
        assert float(out["ciml_kl_total"]) == 0.0


def test_plans_block_for_another_mode_or_changed_dataset_is_refused(make_trainer, planned):
    # label-mode block copied into the region dataset's plans
    labels_block = json.loads((planned["labels"] / "nnUNetCPUPlans_CIML.json").read_text())["nnunet_ext"]
    plans_file = planned["regions"] / "nnUNetCPUPlans_WRONG.json"
    plans = json.loads((planned["regions"] / "nnUNetCPUPlans.json").read_text())
    plans["nnunet_ext"] = labels_block
    plans_file.write_text(json.dumps(plans))
    with pytest.raises(ValueError, match="no longer matches|not a foreground"):
        make_trainer(dataset="regions", plans="nnUNetCPUPlans_WRONG")
    unresolved = {"version": 1, "ciml": {"beta": 1e-3}}
    plans["nnunet_ext"] = unresolved
    plans_file.write_text(json.dumps(plans))
    with pytest.raises(ValueError, match="nnunet-ext configure ciml"):
        make_trainer(dataset="regions", plans="nnUNetCPUPlans_WRONG")


def test_checkpoint_round_trip_is_exact(make_trainer, tmp_path):
    trainer = make_trainer()
    trainer.num_epochs = 10
    trainer.on_train_epoch_start()
    trainer.on_train_epoch_end([trainer.train_step(_batch(trainer, s)) for s in range(2)])
    trainer.current_epoch = 1
    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert saved["nnunet_ext"]["family"] == "ciml"
    assert saved["nnunet_ext"]["state"]["config"]["resolved"] == trainer.ciml_config["resolved"]

    resumed = make_trainer()
    resumed.num_epochs = 10
    resumed.load_checkpoint(path)
    assert resumed.current_epoch == 2 and resumed.kl_history == trainer.kl_history
    for (name, a), (_, b) in zip(trainer.network.state_dict().items(), resumed.network.state_dict().items()):
        assert torch.equal(a, b), name
    trainer.current_epoch = resumed.current_epoch
    for t in (trainer, resumed):
        t.on_train_epoch_start()
    assert resumed.beta_now == trainer.beta_now == pytest.approx(1e-3)  # warm-up of 1 epoch is over
    torch.manual_seed(3)
    first = trainer.train_step(_batch(trainer, 7))
    torch.manual_seed(3)
    second = resumed.train_step(_batch(resumed, 7))
    assert first["loss"] == second["loss"]
    for a, b in zip(trainer.network.parameters(), resumed.network.parameters()):
        assert torch.equal(a, b)
