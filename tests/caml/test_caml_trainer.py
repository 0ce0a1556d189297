"""CAMLTrainer in process: network split, training steps in 2D and 3D, exact resume, settings and refusals."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers_nnunet import clone_root, make_tiny_dataset, set_nnunet_paths

from nnunet_ext.caml.configure import derive_plans
from nnunet_ext.caml.settings import CAML_DEFAULTS, caml_defaults
from nnunet_ext_trainers.caml_trainers import CAMLTrainer, CAMLTrainer_paperOptim, CAMLTrainer_plannedBatch

DATASET = 996
NAME = "CamlUnit"
FOLDER = f"Dataset{DATASET:03d}_{NAME}"
PLANS = "nnUNetCPUPlans"
pytestmark = pytest.mark.slow  # plans a dataset and builds trainers (about 2-4 minutes on 2 shared cores)

LOG_KEYS = ("caml_l_sup", "caml_l_c", "caml_l_o", "caml_ramp", "caml_occ_rows", "caml_mem_classes")


class _SmallMemory(CAMLTrainer):
    """Small memory sample so that OCC is active on tiny patches from the first step."""

    memory_per_class = 8
    memory_cap = 32
    num_filtered = 64


class _FixedUnlabeled(_SmallMemory):
    """Unlabeled batches from a seeded generator instead of the loader (the step sequence is reproducible)."""

    def next_unlabeled_batch(self):
        self.unlabeled_calls = getattr(self, "unlabeled_calls", 0) + 1
        g = torch.Generator().manual_seed(1000 + self.unlabeled_calls)
        patch = self.configuration_manager.patch_size
        data = torch.randn((self.batch_size, self.num_input_channels, *patch), generator=g)
        valid = torch.ones((self.batch_size, 1, *patch), dtype=torch.bool)
        valid[:, :, :2] = False  # a padded border
        self.last_unlabeled = data
        return {"data": data, "valid": valid, "keys": [f"unl_{i}" for i in range(self.batch_size)]}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from nnunet_ext.planning import plan_dataset
    from nnunet_ext.ssl.unlabeled_preprocessing import preprocess_unlabeled

    root = tmp_path_factory.mktemp("caml_unit")
    with pytest.MonkeyPatch.context() as mp:
        folders = set_nnunet_paths(mp, root, n_proc_da=1)  # 0 breaks nnU-Net 2.8.1 planning
        make_tiny_dataset(folders["nnUNet_raw"], dataset_id=DATASET, name=NAME, n_labelled=6, n_unlabeled=3)
        plan_dataset(DATASET, "CPUPlanner", ("2d", "3d_fullres"), num_processes=1)
        preprocess_unlabeled(DATASET, ("3d_fullres",), PLANS)
    return root


@pytest.fixture
def make_trainer(planned, monkeypatch):
    set_nnunet_paths(monkeypatch, planned, n_proc_da=0)
    pre = planned / "nnUNet_preprocessed" / FOLDER
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())

    def make(cls=_FixedUnlabeled, configuration="3d_fullres", plans_override=None, dataset_override=None,
             initialize=True):
        p = copy.deepcopy(plans_override or plans)
        p["continue_training"] = False
        trainer = cls(p, configuration, 0, copy.deepcopy(dataset_override or dataset_json), device=torch.device("cpu"))
        trainer.num_epochs, trainer.num_iterations_per_epoch = 5, 3
        if initialize:
            trainer.initialize()
        return trainer

    return make


def _labeled_batch(trainer, seed):
    g = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn((trainer.batch_size, trainer.num_input_channels, *patch), generator=g)
    with torch.no_grad():
        output = trainer.network(data)
    shapes = [o.shape[2:] for o in output] if isinstance(output, list) else [output.shape[2:]]
    target = [torch.randint(0, 3, (trainer.batch_size, 1, *s), generator=g).float() for s in shapes]
    if not isinstance(output, list):
        target = target[0]
    return {"data": data, "target": target, "keys": [f"tr_{i:03d}" for i in range(trainer.batch_size)]}


# ------------------------------------------------------------------ networks
def test_inference_network_is_stock_and_auxiliary_parts_are_extra_modules(make_trainer):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = make_trainer()
    stock = nnUNetTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                     trainer.num_input_channels, 3, enable_deep_supervision=False)
    stock.load_state_dict(trainer.network.state_dict(), strict=True)  # network_weights are a stock checkpoint
    assert CAMLTrainer.build_network_architecture is nnUNetTrainer.build_network_architecture
    assert set(trainer.extra_modules) == {"net_a", "heads"}
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in optimised for p in trainer.extra_modules.parameters())
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    x = torch.randn(1, trainer.num_input_channels, *trainer.configuration_manager.patch_size)
    with torch.no_grad():
        out = trainer.network(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, *trainer.configuration_manager.patch_size)
    assert isinstance(trainer.extra_modules["net_a"](x).seg, torch.Tensor)  # the switch reaches net_a too


# ------------------------------------------------------------------ steps
def test_step_with_real_loaders_3d(make_trainer):
    trainer = make_trainer(_SmallMemory)
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(2)]
        assert set(outputs[0]) == {"loss", *LOG_KEYS}
        assert all(math.isfinite(float(o[k])) for o in outputs for k in o)
        assert outputs[0]["caml_ramp"] == pytest.approx(math.exp(-5))
        assert outputs[1]["caml_ramp"] > outputs[0]["caml_ramp"]
        assert len(trainer.occ.bank) >= 1 and float(outputs[1]["caml_mem_classes"]) >= 1
        trainer.on_train_epoch_end(outputs)
        log = trainer.logger.local_logger.my_fantastic_logging
        assert all(len(log[k]) == 1 for k in LOG_KEYS)
    finally:
        trainer.on_train_end()


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_combined_batch_is_labeled_first_and_supervision_sees_labeled_only(make_trainer, configuration):
    trainer = make_trainer(configuration=configuration)
    seen = {}
    net_a = trainer.extra_modules["net_a"]
    original = net_a.forward

    def record(x):
        seen["data"] = x.detach().clone()
        return original(x)

    net_a.forward = record
    sup_inputs = []
    loss = trainer.loss

    def supervised(output, target):
        sup_inputs.append(output[0].shape[0])
        return loss(output, target)

    trainer.loss = supervised
    trainer.on_train_epoch_start()
    batch = _labeled_batch(trainer, 0)
    out = trainer.train_step(batch)
    n = trainer.batch_size
    assert seen["data"].shape[0] == 2 * n  # unlabeled batch size defaults to the labeled one
    assert torch.equal(seen["data"][:n], batch["data"]) and torch.equal(seen["data"][n:], trainer.last_unlabeled)
    assert sup_inputs == [n, n]  # both sub-models, labeled part only
    assert math.isfinite(float(out["loss"])) and float(out["caml_occ_rows"]) > 0


def test_supervised_term_ignores_unlabeled_logits(make_trainer):
    from nnunet_ext.caml.networks import labeled_part

    trainer = make_trainer(configuration="2d")
    batch = _labeled_batch(trainer, 1)
    n = trainer.batch_size
    logits = [torch.randn(2 * n, *t.shape[1:]).expand(-1, 3, *t.shape[2:]).clone().requires_grad_()
              for t in batch["target"]]
    trainer.loss(labeled_part(logits, n), batch["target"]).backward()
    assert float(logits[0].grad[n:].abs().sum()) == 0.0 and float(logits[0].grad[:n].abs().sum()) > 0


# ------------------------------------------------------------------ resume
def _run_epoch(trainer, seeds):
    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(_labeled_batch(trainer, s)) for s in seeds]
    trainer.on_train_epoch_end(outputs)


def test_resume_restores_memory_auxiliary_model_and_ramp_exactly(make_trainer, tmp_path):
    trainer = make_trainer()
    _run_epoch(trainer, (0, 1, 2))
    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)  # as in on_epoch_end: nnU-Net stores current_epoch + 1, then advances
    trainer.current_epoch += 1

    resumed = make_trainer()
    resumed.load_checkpoint(path)
    rng = torch.get_rng_state()
    assert resumed.current_epoch == 1 and resumed.occ.bank.counts == trainer.occ.bank.counts
    for key, blocks in trainer.occ.bank.features.items():
        assert all(torch.equal(a, b) for a, b in zip(blocks, resumed.occ.bank.features[key]))
    for (name, a), b in zip(trainer.extra_modules.state_dict().items(), resumed.extra_modules.state_dict().values()):
        assert torch.equal(a, b), name

    # the next step of both trainers: same RNG state, same batches -> identical losses
    results = []
    for t in (trainer, resumed):
        torch.set_rng_state(rng)
        t.unlabeled_calls = 3
        t.on_train_epoch_start()
        assert t.caml_step == 3  # epoch 1 x 3 iterations
        results.append(t.train_step(_labeled_batch(t, 3)))
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert float(results[0][key]) == float(results[1][key]), key
    assert float(results[0]["caml_l_o"]) > 0


# ------------------------------------------------------------------ settings and refusals
def test_planned_batch_variant_splits_the_planned_batch_between_labeled_and_unlabeled(make_trainer):
    """CAMLTrainer_plannedBatch (issue 15): labeled + unlabeled patches per step = the planned batch."""

    class _Planned(CAMLTrainer_plannedBatch, _SmallMemory):
        pass

    planned_batch = make_trainer(_SmallMemory).batch_size
    trainer = make_trainer(_Planned)
    assert (trainer.batch_size, trainer.unlabeled_batch_size_per_rank()) == (planned_batch - planned_batch // 2,
                                                                              planned_batch // 2)
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        batch = next(trainer.dataloader_train)
        assert batch["data"].shape[0] == trainer.batch_size
        assert trainer.next_unlabeled_batch()["data"].shape[0] == planned_batch // 2
        output = trainer.train_step(batch)
        assert math.isfinite(float(output["loss"]))
    finally:
        trainer.on_train_end()


def test_defaults_documented_as_class_attributes_match_the_settings_table():
    assert caml_defaults(CAMLTrainer) == CAML_DEFAULTS


def test_plans_block_overrides_class_attributes(make_trainer, planned):
    plans = json.loads((planned / "nnUNet_preprocessed" / FOLDER / f"{PLANS}.json").read_text())
    derived = derive_plans(plans, "nnUNetCPUPlans_caml", {"memory_per_class": 4, "cma_mode": "inter",
                                                          "memory_slots": 5}, "")
    trainer = make_trainer(_FixedUnlabeled, plans_override=derived)
    assert trainer.memory_per_class == 4 and trainer.occ.memory_per_class == 4
    assert trainer.memory_slots == 5 and trainer.occ.memory_slots == 5
    assert trainer.extra_modules["net_a"].cma.intra is None
    assert derived["plans_name"] == "nnUNetCPUPlans_caml"
    with pytest.raises(KeyError, match="memory_per_clas"):
        derive_plans(plans, "x", {"memory_per_clas": 4}, "")
    with pytest.raises(ValueError, match="occ_log_form"):
        derive_plans(plans, "x", {"occ_log_form": "log"}, "")
    with pytest.raises(ValueError, match="memory_cap"):
        derive_plans(plans, "x", {"memory_cap": 8, "memory_per_class": 16}, "")
    with pytest.raises(ValueError, match="memory_slots"):
        derive_plans(plans, "x", {"memory_slots": 0}, "")
    bad = copy.deepcopy(plans)
    bad["nnunet_ext"] = {"version": 1, "caml": {"lambda_o": -1}}
    with pytest.raises(ValueError, match="lambda_o"):
        make_trainer(plans_override=bad)


def test_region_datasets_are_refused(make_trainer, planned):
    dataset_json = json.loads((planned / "nnUNet_preprocessed" / FOLDER / "dataset.json").read_text())
    dataset_json["labels"] = {"background": 0, "whole": [1, 2], "b": 2}
    dataset_json["regions_class_order"] = [1, 2]
    trainer = make_trainer(dataset_override=dataset_json, initialize=False)
    with pytest.raises(NotImplementedError, match="regions"):
        trainer.initialize()


def test_missing_unlabeled_data_names_the_command(make_trainer, planned, tmp_path, monkeypatch):
    root = clone_root(planned, tmp_path / "root")
    import shutil

    shutil.rmtree(root / "nnUNet_preprocessed" / FOLDER / f"{PLANS}_3d_fullres__unlabeled")
    set_nnunet_paths(monkeypatch, root, n_proc_da=0)
    trainer = make_trainer(_SmallMemory)
    with pytest.raises(RuntimeError, match="nnunet-ext preprocess-unlabeled"):
        trainer.on_train_start()


def test_paper_recipe_variant(make_trainer):
    from nnunet_ext.caml.losses import ForegroundDiceLoss

    class _Paper(CAMLTrainer_paperOptim, _FixedUnlabeled):
        pass

    trainer = make_trainer(_Paper)
    assert trainer.num_epochs == 5  # the fixture shortened it; the class sets 60
    assert isinstance(trainer.loss, ForegroundDiceLoss) and not trainer.enable_deep_supervision
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.SGD) and not group["nesterov"]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in optimised for p in trainer.extra_modules.parameters())
    for epoch in (0, 3):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        assert trainer.optimizer.param_groups[0]["lr"] == 0.01
    batch = _labeled_batch(trainer, 0)
    assert isinstance(batch["target"], torch.Tensor)  # no deep supervision
    assert math.isfinite(float(trainer.train_step(batch)["loss"]))
    assert trainer.rampup_length() == 6000 and trainer.rampup_quantum == 150
    assert trainer.w_sup == 0.5 and CAMLTrainer.w_sup == 1.0  # official weight here; stock's weight by default
