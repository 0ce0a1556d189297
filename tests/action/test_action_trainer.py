"""ACTIONTrainer / ACTIONPlusPlusTrainer in process: stages, EMA, optimiser groups, exact resume, settings, modes."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers_nnunet import planned_tiny_root, set_nnunet_paths

from nnunet_ext.action.trainer import ActionPlusPlusTrainerBase, ActionTrainerBase
from nnunet_ext.compat import unwrap
from nnunet_ext_trainers.action_trainers import (
    ACTIONPlusPlusTrainer,
    ACTIONPlusPlusTrainer_plannedBatch,
    ACTIONTrainer,
    ACTIONTrainer_plannedBatch,
)

DATASET = 994
NAME = "Tiny"


class _Small:
    """Test budget: stages of 1, 2 and 1 epochs of one iteration, small samplers."""

    stage_epochs = (1, 2, 1)
    num_queries = 32
    num_negatives = 64
    max_prototype_pixels = 512
    saacl_pixels_per_class = 16
    saacl_queue_size = 64


class _SmallAction(_Small, ActionTrainerBase):
    pass


class _SmallActionPP(_Small, ActionPlusPlusTrainerBase):
    pass


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    return planned_tiny_root(tmp_path_factory.getbasetemp(), DATASET, n_labelled=5, n_unlabeled=0,
                             shape=(20, 24, 28))


@pytest.fixture
def make_trainer(planned, monkeypatch):
    set_nnunet_paths(monkeypatch, planned, n_proc_da=0)
    folder = planned / "nnUNet_preprocessed" / f"Dataset{DATASET:03d}_{NAME}"
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())

    def make(cls=_SmallAction, plans_update=None, dataset_update=None, initialize=True):
        p = copy.deepcopy(plans)
        p.update(plans_update or {})
        p["continue_training"] = False
        dj = {**dataset_json, **(dataset_update or {})}
        trainer = cls(p, "3d_fullres", 0, dj, device=torch.device("cpu"))
        trainer.num_epochs = 4
        trainer.num_iterations_per_epoch = 1
        if initialize:
            trainer.initialize()
        return trainer

    return make


def _batches(trainer, seed: int, labelled: int = 2, unlabeled_rows: int = 2) -> tuple[dict, dict]:
    """A labelled batch (deep-supervision targets) and an unlabeled batch with a padded slab, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn((labelled, trainer.num_input_channels, *patch), generator=g)
    with torch.no_grad():
        shapes = [o.shape[2:] for o in trainer.network(data)]
    labels = torch.randint(0, 3, (labelled, 1, *patch), generator=g).float()
    target = [torch.nn.functional.interpolate(labels, size=s, mode="nearest") for s in shapes]
    valid = torch.ones((unlabeled_rows, 1, *patch), dtype=torch.bool)
    valid[:, :, :4] = False
    unlabeled = {"data": torch.randn((unlabeled_rows, trainer.num_input_channels, *patch), generator=g),
                 "valid": valid, "keys": [f"u{i}" for i in range(unlabeled_rows)]}
    return {"data": data, "target": target, "keys": [f"l{i}" for i in range(labelled)]}, unlabeled


def _step(trainer, seed: int, labelled: int = 2, unlabeled_rows: int = 2) -> dict:
    batch, unlabeled = _batches(trainer, seed, labelled, unlabeled_rows)
    trainer.dataloader_unlabeled = iter([unlabeled])
    return trainer.train_step(batch)


def _state(trainer) -> dict[str, torch.Tensor]:
    state = {f"net.{k}": v.clone() for k, v in unwrap(trainer.network).state_dict().items()}
    state.update({f"extra.{k}": v.clone() for k, v in trainer.extra_modules.state_dict().items()})
    return state


def _optimised_ids(trainer) -> list[set[int]]:
    return [{id(p) for p in group["params"]} for group in trainer.optimizer.param_groups]


def test_builder_gives_the_stock_network_with_one_output_in_eval_mode(make_trainer):
    trainer = make_trainer(ACTIONTrainer)
    net = ACTIONTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                   trainer.num_input_channels,
                                                   trainer.label_manager.num_segmentation_heads,
                                                   enable_deep_supervision=False).eval()
    net.load_state_dict(unwrap(trainer.network).state_dict(), strict=True)
    x = torch.randn(1, trainer.num_input_channels, *trainer.configuration_manager.patch_size)
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, *x.shape[2:])
    # heads, teacher and queues are not part of the inference network
    assert not any(k.startswith(("teacher", "global", "local", "rep")) for k in net.state_dict())


def test_ema_update_equals_m_teacher_plus_one_minus_m_student(make_trainer):
    trainer = make_trainer()
    trainer.current_epoch = 0
    trainer.on_train_epoch_start()
    heads = trainer.extra_modules
    for name in ("teacher", "global_k", "local_k"):
        assert not any(p.requires_grad for p in heads[name].parameters())
        assert not (_optimised_ids(trainer)[0] | _optimised_ids(trainer)[1]) & {id(p) for p in heads[name].parameters()}
    # make teacher and student clearly different first, so that a wrong momentum cannot pass
    _step(trainer, 0)
    with torch.no_grad():
        for p in [*heads["teacher"].parameters(), *heads["global_k"].parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    teacher_before = {k: v.clone() for k, v in heads["teacher"].state_dict().items()}
    key_before = {k: v.clone() for k, v in heads["global_k"].state_dict().items()}
    _step(trainer, 1)
    m = trainer.ema_momentum
    student = unwrap(trainer.network).state_dict()
    for k, v in heads["teacher"].state_dict().items():
        assert torch.allclose(v, teacher_before[k] * m + student[k] * (1 - m), rtol=1e-6, atol=1e-6), k
    query = heads["global_q"].state_dict()
    for k, v in heads["global_k"].state_dict().items():
        assert torch.allclose(v, key_before[k] * m + query[k] * (1 - m), rtol=1e-6, atol=1e-6), k


def test_stages_switch_optimiser_groups_teacher_and_lr(make_trainer):
    trainer = make_trainer()
    net, heads = unwrap(trainer.network), trainer.extra_modules
    expected_heads = {0: ("global_q", "global_pred"), 1: ("global_q", "global_pred", "local_q", "local_pred"),
                      2: ("rep_head",)}
    seen_stages, lrs = [], []
    for epoch in range(4):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        stage = trainer.action_stage
        seen_stages.append(stage)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        network_ids, head_ids = _optimised_ids(trainer)
        encoder = {id(p) for p in net.encoder.parameters()}
        assert network_ids == (encoder if stage == 0 else {id(p) for p in net.parameters()})
        assert head_ids == {id(p) for name in expected_heads[stage] for p in heads[name].parameters()}
        if stage == 2 and epoch == 3:
            # entering stage iii: the teacher restarts from the student and the best-checkpoint EMA is reset
            for (k, a), b in zip(heads["teacher"].state_dict().items(), net.state_dict().values()):
                assert torch.equal(a, b), k
            assert trainer._best_ema is None
        out = _step(trainer, epoch)
        assert math.isfinite(float(out["loss"]))
        trainer._best_ema = 0.5
    assert seen_stages == [0, 1, 1, 2]
    assert lrs[0] == lrs[1] == lrs[3] == trainer.initial_lr and lrs[2] < lrs[1]


def test_stage_i_trains_only_the_encoder(make_trainer):
    trainer = make_trainer()
    trainer.current_epoch = 0
    trainer.on_train_epoch_start()
    decoder_only = {k: v.clone() for k, v in unwrap(trainer.network).decoder.state_dict().items()
                    if not k.startswith("encoder.")}
    encoder_before = {k: v.clone() for k, v in unwrap(trainer.network).encoder.state_dict().items()}
    out = _step(trainer, 0)
    assert set(out) == {"loss", "action_stage", "action_tau", "action_l_glob"}
    after = unwrap(trainer.network).decoder.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in decoder_only.items())
    assert any(not torch.equal(v, unwrap(trainer.network).encoder.state_dict()[k]) for k, v in encoder_before.items())


@pytest.mark.parametrize("cls", [_SmallAction, _SmallActionPP])
def test_resume_is_exact_within_and_across_stage_boundaries(make_trainer, cls, tmp_path):
    """A checkpoint after every epoch; a fresh trainer resumed from it makes exactly the uninterrupted next step."""
    trainer = make_trainer(cls)
    reference = {}
    for epoch in range(4):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        outputs = [_step(trainer, 100 + epoch)]
        if epoch > 0:
            reference[epoch] = (outputs[0], _state(trainer))
        trainer.on_train_epoch_end(outputs)
        trainer.save_checkpoint(str(tmp_path / f"after_{epoch}.pth"))
    # after epoch 0: next step crosses i -> ii; after 1: stays in ii (restored stage-ii optimiser groups and
    # momentum); after 2: crosses ii -> iii
    for saved_epoch in range(3):
        resumed = make_trainer(cls, initialize=False)
        resumed.load_checkpoint(str(tmp_path / f"after_{saved_epoch}.pth"))
        assert resumed.current_epoch == saved_epoch + 1
        assert resumed.action_stage == (0, 1, 1)[saved_epoch]
        resumed.on_train_epoch_start()
        out = _step(resumed, 100 + saved_epoch + 1)
        expected_out, expected_state = reference[saved_epoch + 1]
        assert set(out) == set(expected_out)
        for key in out:
            assert out[key] == expected_out[key], (saved_epoch, key)
        state = _state(resumed)
        for key, value in expected_state.items():
            assert torch.equal(state[key], value), (saved_epoch, key)


def test_every_action_key_has_one_entry_per_epoch(make_trainer):
    trainer = make_trainer(_SmallActionPP)
    for epoch in range(4):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        trainer.on_train_epoch_end([_step(trainer, epoch)])
    log = trainer.logger.local_logger.my_fantastic_logging
    for key in trainer.extra_log_keys:
        assert len(log[key]) == 4, key
    assert log["action_stage"] == [0.0, 1.0, 1.0, 2.0]
    assert math.isnan(log["action_l_anco"][0]) and math.isfinite(log["action_l_anco"][3])
    assert math.isnan(log["action_l_loc"][3]) and math.isfinite(log["action_l_loc"][1])
    assert math.isfinite(log["action_l_saacl"][3]) and math.isnan(log["action_l_saacl"][2])
    # the SAACL queue received teacher features with labels
    assert (trainer.extra_modules["saacl_labels"].get() >= 0).sum() > 0


@pytest.mark.parametrize("cls, rows_per_pass", [(_SmallAction, [2]), (_SmallActionPP, [4])])
def test_stage_iii_runs_the_teacher_once_per_step(make_trainer, cls, rows_per_pass):
    """ACTION: one teacher pass over the unlabeled images; ACTION++: one pass over labelled + unlabeled (issue 15),
    whose rows equal separate passes (the teacher normalises per sample)."""
    trainer = make_trainer(cls)
    trainer.current_epoch = 3
    trainer.on_train_epoch_start()
    assert trainer.action_stage == 2
    teacher = trainer.extra_modules["teacher"]
    rows: list[int] = []
    handle = teacher.encoder.register_forward_hook(lambda _m, inputs, _o: rows.append(inputs[0].shape[0]))
    try:
        _step(trainer, 7)
    finally:
        handle.remove()
    assert rows == rows_per_pass

    batch, unlabeled = _batches(trainer, 8)
    logits, labelled_features = trainer.teacher_stage_iii_pass(batch["data"], unlabeled["data"])
    with torch.no_grad():
        assert torch.allclose(logits, teacher(unlabeled["data"]), atol=1e-5)
        if cls is _SmallActionPP:
            from nnunet_ext.action.features import forward_with_features

            _, _, separate = forward_with_features(teacher, batch["data"])
            assert len(labelled_features) == len(separate[: trainer.rep_feature_stages])
            for joint, alone in zip(labelled_features, separate):
                assert torch.allclose(joint, alone, atol=1e-5)
        else:
            assert labelled_features is None


@pytest.mark.parametrize("shipped", [ACTIONTrainer_plannedBatch, ACTIONPlusPlusTrainer_plannedBatch])
def test_planned_batch_variants_split_the_planned_batch_and_train_every_stage(make_trainer, shipped):
    """issue 15: labelled + unlabeled patches per step = the planned batch; queues sized for that many images."""

    class _Planned(_Small, shipped):
        pass

    planned_batch = 3  # odd: 2 labelled + 1 unlabeled
    trainer = make_trainer(_Planned, plans_update=_batch_size_update(make_trainer, planned_batch))
    labelled, unlabeled_rows = planned_batch - planned_batch // 2, planned_batch // 2
    assert (trainer.batch_size, trainer.unlabeled_batch_size_per_rank()) == (labelled, unlabeled_rows)
    assert trainer.images_per_step == planned_batch
    assert trainer.extra_modules["global_queue"].size == max(trainer.queue_entries, 4 * planned_batch)
    for epoch in range(4):  # stages i, ii, ii, iii
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        output = _step(trainer, epoch, labelled, unlabeled_rows)
        assert math.isfinite(float(output["loss"])), epoch
    assert trainer.action_stage == 2


def _batch_size_update(make_trainer, batch_size: int) -> dict:
    plans = make_trainer(_SmallAction, initialize=False).plans_manager.plans
    update = copy.deepcopy(plans["configurations"])
    update["3d_fullres"]["batch_size"] = batch_size
    return {"configurations": update}


def _temperatures_at(trainer, epoch: int, iteration: int) -> dict[str, float]:
    trainer.current_epoch = epoch
    trainer.on_train_epoch_start()
    trainer._iteration_in_epoch = iteration
    if trainer.action_stage < 2:
        tau_s, tau_t = trainer.distillation_temperatures()
        return {"tau_s": tau_s, "tau_t": tau_t}
    return {"anco": trainer.anco_temperature(), "saacl": trainer.saacl_temperature()}


def test_temperature_schedules_of_action_plus_plus(make_trainer):
    """Default: every temperature on one cosine cycle per stage (stages of 1, 2, 1 epochs of 4 iterations)."""
    trainer = make_trainer(_SmallActionPP)
    trainer.num_iterations_per_epoch = 4
    high = trainer.ats_high
    assert _temperatures_at(trainer, 0, 0) == pytest.approx({"tau_s": high, "tau_t": high})
    assert _temperatures_at(trainer, 0, 2) == pytest.approx({"tau_s": trainer.tau_student,
                                                             "tau_t": trainer.tau_teacher})
    assert _temperatures_at(trainer, 2, 0) == pytest.approx({"tau_s": trainer.tau_student,  # half of stage ii
                                                             "tau_t": trainer.tau_teacher})
    assert _temperatures_at(trainer, 3, 0) == pytest.approx({"anco": high, "saacl": high})
    assert _temperatures_at(trainer, 3, 2) == pytest.approx({"anco": trainer.ats_low_anco,
                                                             "saacl": trainer.saacl_tau_low})
    assert make_trainer(_SmallAction).anco_temperature() == 0.5


@pytest.mark.parametrize("targets", [("distillation_ii", "anco"), ()])
def test_temperatures_left_out_of_the_schedule_are_constant(make_trainer, targets):
    """``ats_targets`` of the official 3D code (stage ii and AnCo; SAACL at 0.07) and none at all (ACTION's
    temperatures)."""

    class _Targets(_SmallActionPP):
        ats_targets = targets

    trainer = make_trainer(_Targets)
    trainer.num_iterations_per_epoch = 4
    constant = {"tau_s": trainer.tau_student, "tau_t": trainer.tau_teacher}
    for iteration in (0, 1, 2):  # stage i
        assert _temperatures_at(trainer, 0, iteration) == pytest.approx(constant)
    stage_ii_start = _temperatures_at(trainer, 1, 0)
    if "distillation_ii" in targets:
        assert stage_ii_start == pytest.approx({"tau_s": trainer.ats_high, "tau_t": trainer.ats_high})
    else:
        assert stage_ii_start == pytest.approx(constant)
    for iteration in (0, 1, 2):  # stage iii
        temperatures = _temperatures_at(trainer, 3, iteration)
        assert temperatures["saacl"] == pytest.approx(trainer.saacl_tau_low)
        expected_anco = ((trainer.ats_high, None, trainer.ats_low_anco)[iteration] if "anco" in targets
                         else trainer.tau_anco)
        if expected_anco is not None:
            assert temperatures["anco"] == pytest.approx(expected_anco)


def test_saacl_settings_reach_the_loss_and_the_centroids(make_trainer, monkeypatch):
    import nnunet_ext.action.trainer as trainer_module

    built = []

    class _Recording(trainer_module.SupervisedAnatomicalContrastLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(trainer_module, "SupervisedAnatomicalContrastLoss", _Recording)

    class _Official(_SmallActionPP):
        saacl_count_centre = False
        saacl_mask_empty_slots = False
        saacl_centroid_init = "random"

    for cls, expected in ((_SmallActionPP, (True, True)), (_Official, (False, False))):
        trainer = make_trainer(cls)
        centroids = trainer.extra_modules["centres"].centroids
        if cls is _Official:
            assert torch.allclose(centroids.norm(dim=1), torch.ones(len(centroids)), atol=1e-6)
        else:
            assert torch.equal(centroids, torch.zeros_like(centroids))
        trainer.current_epoch = 3
        trainer.on_train_epoch_start()
        out = _step(trainer, 5)
        assert math.isfinite(float(out["action_l_saacl"]))
        assert (built[-1].count_centre, built[-1].mask_empty_slots) == expected


@pytest.mark.parametrize("name, value, message", [
    ("ats_targets", ("anco", "saacl_typo"), "ats_targets"),
    ("ats_targets", ("anco", "anco"), "ats_targets"),
    ("ats_targets", "anco", "ats_targets"),
    ("saacl_centroid_init", "ones", "saacl_centroid_init"),
    ("saacl_count_centre", 1, "saacl_count_centre"),
    ("saacl_mask_empty_slots", "false", "saacl_mask_empty_slots"),
])
def test_bad_action_plus_plus_settings_are_rejected(make_trainer, name, value, message):
    from nnunet_ext.action.settings import validate_action_settings

    with pytest.raises(ValueError, match=message):
        validate_action_settings({name: value}, "a test")
    bad = type("_Bad", (_SmallActionPP,), {name: value})
    with pytest.raises(ValueError, match=message):
        make_trainer(bad)


def test_method_settings_from_the_plans(make_trainer):
    trainer = make_trainer(plans_update={"nnunet_ext": {"version": 1, "action": {"lambda_anco": 0.5,
                                                                                 "stage_epochs": [2, 1, 1]}}})
    assert trainer.lambda_anco == 0.5 and trainer.resolved_stage_epochs == (2, 1, 1)
    plus = make_trainer(_SmallActionPP, plans_update={"nnunet_ext": {"version": 1, "action": {
        "ats_targets": ["distillation_ii", "anco"], "saacl_count_centre": False}}})
    assert plus.ats_targets == ("distillation_ii", "anco") and plus.saacl_count_centre is False
    with pytest.raises(KeyError, match="lambda_ancoo"):
        make_trainer(plans_update={"nnunet_ext": {"version": 1, "action": {"lambda_ancoo": 0.5}}},
                     initialize=False)


def test_region_datasets_and_bad_mixing_are_rejected(make_trainer):
    regions = {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2]}
    with pytest.raises(NotImplementedError, match="regions"):
        make_trainer(ACTIONTrainer, dataset_update=regions)

    class _BadMixing(_SmallAction):
        mixing = "mixup"

    with pytest.raises(ValueError, match="mixing"):
        make_trainer(_BadMixing)


def test_shipped_trainer_defaults():
    assert ACTIONTrainer.stage_epochs == (100, 100, 800) and sum(ACTIONTrainer.stage_epochs) == 1000
    assert "action_l_saacl" in ACTIONPlusPlusTrainer.extra_log_keys
    assert "action_l_saacl" not in ACTIONTrainer.extra_log_keys
