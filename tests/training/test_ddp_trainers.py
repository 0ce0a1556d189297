"""The method trainers under DDP with 2 ``gloo`` ranks on the CPU (issue 8; recipe in ``docs/ddp.md`` section 6).

nnU-Net forces CUDA once a process group exists, so the trainers run in process with two test-only adjustments:
a subclass that puts the trainer back on the CPU without a GradScaler, and nnU-Net's name ``DDP`` replaced by a
wrapper that drops ``device_ids`` (CPU modules refuse it). One spawn of 2 ranks runs every scenario: each rank
builds the trainer (``initialize`` wraps the network in DDP and broadcasts the extra modules), runs two
``train_step`` calls on its share of a fixed global batch, ends the epoch (global log means) and saves a checkpoint
(written by rank 0). Afterwards each rank leaves the process group and computes, as a single process, the
reference of half of the scenarios: the same trainer from the same initial state on the concatenated global batch,
and a ``--c`` style resume of rank 0's checkpoint on one rank.

The tests then check that the network and every piece of extra state (teachers, queues, memory bank, prototypes,
logs) are identical on both ranks, equal the single process where the method defines them that way, and are
restored exactly from the checkpoint.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers_distributed import run_ranks
from helpers_nnunet import planned_tiny_root, set_nnunet_paths

from nnunet_ext.action.trainer import ActionPlusPlusTrainerBase, ActionTrainerBase
from nnunet_ext.caml.trainer import CAMLTrainerBase
from nnunet_ext.cfcml.trainer import CFCMLTrainerCore
from nnunet_ext.ciml.trainer import CIMLTrainerBase
from nnunet_ext.compat import unwrap
from nnunet_ext.training import distributed as D

WORLD = 2
SPAWN_TIMEOUT_S = 300
DATASET, NAME = 994, "Tiny"  # the ACTION tests' dataset: planned once per session
STEPS = 2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the gloo backend is unavailable in this torch build"),
]


# ---------------------------------------------------------------------------------------------- test trainers
class _OnCPU:
    """nnU-Net sets ``device = cuda:rank`` under DDP; the test runs on the CPU (no GradScaler there)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.device = torch.device("cpu")
        self.grad_scaler = None


class _CIML(_OnCPU, CIMLTrainerBase):
    """CIML with messages but without random draws (no sampling in the bottleneck, no message dropout), so that a
    single process on the concatenated batch is an exact reference."""

    ciml_overrides = {"variational": False, "message_dropout": 0.0}


class _CIMLVariational(_OnCPU, CIMLTrainerBase):
    """CIML with its defaults (variational messages, message dropout): random per rank, so only rank equality,
    unused parameters (none) and the resume are checked."""


class _SmallAction:
    """Stages of 1, 2 and 1 epochs (of 4), small samplers, and no student perturbation (random per rank) so that
    stage ii has an exact one-process reference."""

    stage_epochs = (1, 2, 1)
    num_queries = 32
    num_negatives = 64
    max_prototype_pixels = 512
    saacl_pixels_per_class = 16
    saacl_queue_size = 500
    perturbation_probability = 0.0


class _Action(_OnCPU, _SmallAction, ActionTrainerBase):
    pass


class _ActionPP(_OnCPU, _SmallAction, ActionPlusPlusTrainerBase):
    pass


class _CAML(_OnCPU, CAMLTrainerBase):
    """A small memory sample so that OCC is active on tiny patches from the first step."""

    memory_per_class = 8
    memory_cap = 32


class _CFCML(_OnCPU, CFCMLTrainerCore):
    pass


CFCML_ID, CFCML_NAME = 801, "CfcmlTiny"  # tests/cfcml's 2D classification dataset (3 classes)
CFCML_PLANS, CFCML_PLANS_TOO_SMALL = "nnUNetCPUPlans_CFCMLDDP", "nnUNetCPUPlans_CFCMLDDP6"
CFCML_BATCH = 12  # 2 ranks x 3 classes x 2 cases


# ---------------------------------------------------------------------------------------------- helpers
def _ddp_without_device_ids(module, device_ids=None, **kwargs):
    return torch.nn.parallel.DistributedDataParallel(module, **kwargs)


def _set_paths(root: Path) -> None:
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[var] = str(root / var)
    os.environ.update({"nnUNet_compile": "f", "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "0"})


def make_trainer(cls, root: Path, epoch: int = 5, num_epochs: int = 10):
    _set_paths(root)
    folder = root / "nnUNet_preprocessed" / f"Dataset{DATASET:03d}_{NAME}"
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    trainer = cls(plans, "3d_fullres", 0, json.loads((folder / "dataset.json").read_text()),
                  device=torch.device("cpu"))
    trainer.num_epochs = num_epochs
    trainer.num_iterations_per_epoch = STEPS
    trainer.initialize()
    trainer.current_epoch = epoch
    os.makedirs(trainer.output_folder, exist_ok=True)
    return trainer


def global_batch(trainer, step: int) -> dict:
    """The global labeled batch of ``step`` (the plans' batch size), identical in every process."""
    g = torch.Generator().manual_seed(1000 + step)
    patch = trainer.configuration_manager.patch_size
    size = trainer.configuration_manager.batch_size
    data = torch.randn((size, trainer.num_input_channels, *patch), generator=g)
    labels = torch.randint(0, 3, (size, 1, *patch), generator=g).float()
    with torch.no_grad():
        shapes = [o.shape[2:] for o in unwrap(trainer.network)(data[:1])]
    target = [torch.nn.functional.interpolate(labels, size=tuple(s), mode="nearest") for s in shapes]
    return {"data": data, "target": target, "keys": [f"case_{step}_{i}" for i in range(size)]}


def global_unlabeled(trainer, step: int) -> dict:
    """The global unlabeled batch of ``step`` (1:1 with the labeled batch), padded in the first 4 slices."""
    g = torch.Generator().manual_seed(2000 + step)
    patch = trainer.configuration_manager.patch_size
    size = trainer.configuration_manager.batch_size
    valid = torch.ones((size, 1, *patch), dtype=torch.bool)
    valid[:, :, :4] = False  # the same padding in every sample keeps the per-rank valid counts equal
    return {"data": torch.randn((size, trainer.num_input_channels, *patch), generator=g), "valid": valid,
            "keys": [f"unlabeled_{step}_{i}" for i in range(size)]}


def rank_share(batch: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s rows of a global batch, split as nnU-Net splits the batch size (rank 0 first)."""
    size = batch["data"].shape[0]
    shares = [D.split_batch_size(size, world, r) for r in range(world)]
    start, stop = sum(shares[:rank]), sum(shares[:rank + 1])
    return {k: [t[start:stop] for t in v] if k == "target" else v[start:stop] for k, v in batch.items()}


def snapshot(trainer) -> dict:
    state = {f"net.{k}": v.detach().clone() for k, v in unwrap(trainer.network).state_dict().items()}
    state.update({f"extra.{k}": v.detach().clone() for k, v in trainer.extra_modules.state_dict().items()})
    if getattr(trainer, "occ", None) is not None:  # CAML's memory bank (not a module)
        bank = trainer.occ.bank
        for key in sorted(bank.features):
            state.update({f"bank.{key}.{c}": rows.clone() for c, rows in enumerate(bank.features[key])})
            state[f"bank.{key}.counts"] = torch.tensor(bank.counts[key])
    return state


def load_snapshot(trainer, state: dict) -> None:
    assert not any(k.startswith("bank.") for k in state), "memory banks are not restored from snapshots"
    unwrap(trainer.network).load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    trainer.extra_modules.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("extra.")})


def logged(trainer) -> dict:
    return {k: trainer.logger.get_value(k, step=-1) for k in trainer.extra_log_keys}


def run_epoch(trainer, batches: list[dict], unlabeled: list[dict] | None = None) -> list[dict]:
    trainer.on_train_epoch_start()
    if unlabeled is not None:
        trainer.dataloader_unlabeled = iter(unlabeled)
    outputs = [trainer.train_step(b) for b in batches]
    trainer.on_train_epoch_end(outputs)
    return outputs


# ---------------------------------------------------------------------------------------------- scenarios
def ddp_ciml(rank: int, root: Path, out_dir: Path, cls=_CIML) -> dict:
    trainer = make_trainer(cls, root)
    initial = snapshot(trainer)
    batches = [rank_share(global_batch(trainer, s), rank, WORLD) for s in range(STEPS)]
    outputs = run_epoch(trainer, batches)
    checkpoint = str(out_dir / f"{cls.__name__}.pth")
    trainer.save_checkpoint(checkpoint)
    return {"initial": initial, "final": snapshot(trainer), "outputs": outputs, "logged": logged(trainer),
            "kl_history": trainer.kl_history, "weight_factors": list(trainer.loss.weight_factors),
            "checkpoint": checkpoint, "batch_size": trainer.batch_size}


def reference_ciml(ddp: dict, root: Path, cls=_CIML) -> dict:
    """One process: the concatenated batch from the same initial state; and rank 0's checkpoint resumed."""
    trainer = make_trainer(cls, root)
    load_snapshot(trainer, ddp["initial"])
    # nnU-Net gives the lowest deep-supervision output the weight 1e-6 instead of 0 under DDP; use DDP's weights
    trainer.loss.weight_factors = tuple(ddp["weight_factors"])
    outputs = run_epoch(trainer, [global_batch(trainer, s) for s in range(STEPS)])
    return {"final": snapshot(trainer), "outputs": outputs, "logged": logged(trainer), **resume(cls, root, ddp)}


def resume(cls, root: Path, ddp: dict, **make_kwargs) -> dict:
    resumed = make_trainer(cls, root, **{"epoch": 0, **make_kwargs})
    resumed.load_checkpoint(ddp["checkpoint"])
    result = {"resumed": snapshot(resumed), "resumed_epoch": resumed.current_epoch,
              "resumed_rng": torch.get_rng_state()}
    if hasattr(resumed, "kl_history"):
        result["resumed_kl_history"] = resumed.kl_history
    return result


def ddp_action(rank: int, root: Path, out_dir: Path, cls=_Action, epoch: int = 1) -> dict:
    trainer = make_trainer(cls, root, epoch=epoch, num_epochs=4)
    initial = snapshot(trainer)
    batches = [rank_share(global_batch(trainer, s), rank, WORLD) for s in range(STEPS)]
    unlabeled = [rank_share(global_unlabeled(trainer, s), rank, WORLD) for s in range(STEPS)]
    outputs = run_epoch(trainer, batches, unlabeled)
    checkpoint = str(out_dir / f"{cls.__name__}.pth")
    trainer.save_checkpoint(checkpoint)
    return {"initial": initial, "final": snapshot(trainer), "outputs": outputs, "logged": logged(trainer),
            "stage": trainer.action_stage, "weight_factors": list(trainer.loss.weight_factors),
            "checkpoint": checkpoint}


def reference_action(ddp: dict, root: Path, cls=_Action, epoch: int = 1) -> dict:
    trainer = make_trainer(cls, root, epoch=epoch, num_epochs=4)
    load_snapshot(trainer, ddp["initial"])
    trainer.loss.weight_factors = tuple(ddp["weight_factors"])
    outputs = run_epoch(trainer, [global_batch(trainer, s) for s in range(STEPS)],
                        [global_unlabeled(trainer, s) for s in range(STEPS)])
    return {"final": snapshot(trainer), "outputs": outputs, **resume(cls, root, ddp, num_epochs=4)}


def ddp_caml(rank: int, root: Path, out_dir: Path) -> dict:
    trainer = make_trainer(_CAML, root)
    initial = snapshot(trainer)
    batches = [rank_share(global_batch(trainer, s), rank, WORLD) for s in range(STEPS)]
    unlabeled = [rank_share(global_unlabeled(trainer, s), rank, WORLD) for s in range(STEPS)]
    outputs = run_epoch(trainer, batches, unlabeled)
    checkpoint = str(out_dir / "caml.pth")
    trainer.save_checkpoint(checkpoint)
    return {"initial": initial, "final": snapshot(trainer), "outputs": outputs, "logged": logged(trainer),
            "generator": trainer.memory_generator.get_state(), "checkpoint": checkpoint}


def make_cfcml(root: Path, plans_identifier: str = CFCML_PLANS):
    _set_paths(root)
    folder = root / "nnUNet_preprocessed" / f"Dataset{CFCML_ID:03d}_{CFCML_NAME}"
    plans = json.loads((folder / f"{plans_identifier}.json").read_text())
    plans["continue_training"] = False
    trainer = _CFCML(plans, "2d", 0, json.loads((folder / "dataset.json").read_text()), device=torch.device("cpu"))
    trainer.initialize()
    trainer.current_epoch = 5
    os.makedirs(trainer.output_folder, exist_ok=True)
    return trainer


def cfcml_global_batch(trainer, step: int) -> dict:
    """A global batch whose rank shares are class-balanced (2 training cases per class and rank)."""
    tr_keys, _ = trainer.do_split()
    by_class = [sorted(k for k in tr_keys if int(trainer.table.rows[k].label) == c) for c in range(3)]
    keys = [by_class[c][(step + i) % len(by_class[c])] for i in range(CFCML_BATCH // 3) for c in range(3)]
    g = torch.Generator().manual_seed(3000 + step)
    data = torch.randn((CFCML_BATCH, trainer.num_input_channels, *trainer.configuration_manager.patch_size),
                       generator=g)
    with torch.no_grad():
        segmentation, _, _ = unwrap(trainer.network).forward_all(data[:1], trainer.table.batch(keys[:1]),
                                                                 with_segmentation=True)
    heads = trainer.label_manager.num_segmentation_heads
    labels = torch.randint(0, heads, (CFCML_BATCH, 1, *data.shape[2:]), generator=g).float()
    target = [torch.nn.functional.interpolate(labels, size=tuple(o.shape[2:]), mode="nearest") for o in segmentation]
    return {"data": data, "target": target, "keys": keys}


def cfcml_steps(trainer, batches: list[dict]) -> tuple[list[dict], dict]:
    """Train steps; returns the outputs and the (averaged, clipped) network gradients of the first step."""
    trainer.on_train_epoch_start()
    outputs, first_gradients = [], {}
    for step, batch in enumerate(batches):
        outputs.append(trainer.train_step(batch))
        if step == 0:
            first_gradients = {n: p.grad.clone() for n, p in unwrap(trainer.network).named_parameters()
                               if p.grad is not None}
    trainer.on_train_epoch_end(outputs)
    return outputs, first_gradients


def ddp_cfcml(rank: int, root: Path, out_dir: Path) -> dict:
    root = out_dir / "cfcml_root"
    refused = ""
    try:
        make_cfcml(root, CFCML_PLANS_TOO_SMALL)
    except ValueError as error:
        refused = str(error)
    trainer = make_cfcml(root)
    initial = snapshot(trainer)
    outputs, gradients = cfcml_steps(
        trainer, [rank_share(cfcml_global_batch(trainer, s), rank, WORLD) for s in range(STEPS)])
    validation = trainer.predict_validation_cases_on_all_ranks(trainer.val_keys)
    checkpoint = str(out_dir / "cfcml.pth")
    trainer.save_checkpoint(checkpoint)
    return {"initial": initial, "final": snapshot(trainer), "outputs": outputs, "gradients": gradients,
            "logged": logged(trainer), "validation": validation, "batch_size": trainer.batch_size,
            "refused": refused, "checkpoint": checkpoint, "root": root,
            "weight_factors": getattr(trainer.loss, "weight_factors", None)}


def reference_cfcml(ddp: dict, _root: Path) -> dict:
    trainer = make_cfcml(ddp["root"])
    load_snapshot(trainer, ddp["initial"])
    if ddp["weight_factors"] is not None:
        trainer.loss.weight_factors = tuple(ddp["weight_factors"])
    outputs, gradients = cfcml_steps(trainer, [cfcml_global_batch(trainer, s) for s in range(STEPS)])
    validation = trainer.predict_validation_cases(trainer.val_keys)
    resumed = make_cfcml(ddp["root"])
    resumed.load_checkpoint(ddp["checkpoint"])
    return {"final": snapshot(trainer), "outputs": outputs, "gradients": gradients, "validation": validation,
            "resumed": snapshot(resumed), "resumed_epoch": resumed.current_epoch}


SCENARIOS = {
    "ciml": (ddp_ciml, reference_ciml),
    "ciml_variational": (lambda r, root, out: ddp_ciml(r, root, out, _CIMLVariational),
                         lambda ddp, root: resume(_CIMLVariational, root, ddp)),
    "action_stage_ii": (ddp_action, reference_action),
    "action_pp_stage_iii": (lambda r, root, out: ddp_action(r, root, out, _ActionPP, epoch=3),
                            lambda ddp, root: resume(_ActionPP, root, ddp, num_epochs=4)),
    "caml": (ddp_caml, lambda ddp, root: resume(_CAML, root, ddp)),
    "cfcml": (ddp_cfcml, reference_cfcml),
}


def _worker(rank: int, init_file: str, out_dir: str, root: str) -> None:
    torch.set_num_threads(1)
    _set_paths(Path(root))
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module

    nnunet_trainer_module.DDP = _ddp_without_device_ids
    results: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=120))
        torch.manual_seed(rank)  # rank-dependent initialisation on purpose: the broadcast must remove it
        for name, (scenario, _) in SCENARIOS.items():
            started = time.monotonic()
            results[name] = scenario(rank, Path(root), Path(out_dir))
            results[name]["seconds"] = time.monotonic() - started
        dist.barrier()
        dist.destroy_process_group()
        for index, (name, (_, reference)) in enumerate(SCENARIOS.items()):
            if index % WORLD == rank:
                started = time.monotonic()
                results[f"{name}_reference"] = reference(results[name], Path(root))
                results[f"{name}_reference"]["seconds"] = time.monotonic() - started
    except Exception:  # saved so that the test shows the rank's traceback instead of a bare exit code
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- fixtures
def prepare_cfcml_root(base: Path, target: Path) -> None:
    """A copy of tests/cfcml's planned dataset with two CFCML plans: batch 12 (balanced on 2 ranks) and 6."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cfcml"))
    from cfcml_fixtures import PLANS, planned_classification_root

    from nnunet_ext.plans import write_derived_plans

    shutil.copytree(planned_classification_root(base, CFCML_ID, masks=True), target)
    folder = str(target / "nnUNet_preprocessed" / f"Dataset{CFCML_ID:03d}_{CFCML_NAME}")
    with pytest.MonkeyPatch.context() as monkeypatch:
        set_nnunet_paths(monkeypatch, target)  # configure reads tabular.csv from the raw folder
        # no classifier dropout: random per rank, and the one-process reference must draw the same network
        write_derived_plans(folder, PLANS, CFCML_PLANS, "cfcml", {"batch_size": CFCML_BATCH, "dropout": 0.0})
        write_derived_plans(folder, PLANS, CFCML_PLANS_TOO_SMALL, "cfcml", {"batch_size": 6})


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    root = planned_tiny_root(tmp_path_factory.getbasetemp(), DATASET, n_labelled=5, n_unlabeled=0,
                             shape=(20, 24, 28))
    out_dir = tmp_path_factory.mktemp("ddp_trainers")
    prepare_cfcml_root(tmp_path_factory.getbasetemp(), out_dir / "cfcml_root")
    results = run_ranks(_worker, (str(out_dir / "init"), str(out_dir), str(root)), out_dir, WORLD, SPAWN_TIMEOUT_S)
    print({name: round(value["seconds"], 1) for r in results for name, value in r.items()
           if isinstance(value, dict) and "seconds" in value})
    return results


def reference(ranks: list[dict], name: str) -> dict:
    return next(r[f"{name}_reference"] for r in ranks if f"{name}_reference" in r)


def assert_identical_on_ranks(ranks: list[dict], name: str, key: str) -> dict:
    states = [r[name][key] for r in ranks]
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), (name, key, k)
    return states[0]


def assert_close_states(got: dict, expected: dict, keys=None, rtol=1e-4, atol=1e-6) -> None:
    for k in keys if keys is not None else expected:
        a, b = got[k], expected[k]
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=rtol, atol=atol), (k, (a - b).abs().max())
        else:
            assert torch.equal(a, b), k


def assert_same_logs(ranks: list[dict], name: str) -> dict:
    logs = [r[name]["logged"] for r in ranks]
    assert logs[0].keys() == logs[1].keys()
    for k, v in logs[0].items():
        assert v == logs[1][k] or (math.isnan(v) and math.isnan(logs[1][k])), (name, k)
    return logs[0]


def assert_resumed_exactly(ranks: list[dict], name: str) -> None:
    final = assert_identical_on_ranks(ranks, name, "final")
    ref = reference(ranks, name)
    assert ref["resumed"].keys() == final.keys()
    for k in final:
        assert torch.equal(ref["resumed"][k], final[k]), k


# ---------------------------------------------------------------------------------------------- tests: CIML
def test_ciml_ranks_share_the_batch_and_start_from_rank_0(ranks):
    assert [r["ciml"]["batch_size"] for r in ranks] == [1, 1]
    initial = assert_identical_on_ranks(ranks, "ciml", "initial")
    final = assert_identical_on_ranks(ranks, "ciml", "final")
    assert any(not torch.equal(initial[k], final[k]) for k in initial)  # the network trained


def test_ciml_two_ranks_equal_one_process_on_the_concatenated_batch(ranks):
    final = assert_identical_on_ranks(ranks, "ciml", "final")
    ref = reference(ranks, "ciml")
    assert_close_states(final, ref["final"])
    # per-rank step losses: the one-process loss is their mean (equal shares, per-sample mean losses)
    for step in range(STEPS):
        per_rank = [float(r["ciml"]["outputs"][step]["ciml_loss_seg"]) for r in ranks]
        assert sum(per_rank) / WORLD == pytest.approx(float(ref["outputs"][step]["ciml_loss_seg"]), rel=1e-4)


def test_ciml_logs_are_global_means(ranks):
    log = assert_same_logs(ranks, "ciml")
    steps = [float(o["ciml_loss_seg"]) for r in ranks for o in r["ciml"]["outputs"]]
    assert log["ciml_loss_seg"] == pytest.approx(sum(steps) / len(steps), rel=1e-6)
    assert ranks[0]["ciml"]["kl_history"] == ranks[1]["ciml"]["kl_history"]


@pytest.mark.parametrize("name", ["ciml", "ciml_variational"])
def test_ciml_checkpoint_of_rank_0_resumes_on_one_rank(ranks, name):
    assert_resumed_exactly(ranks, name)
    ref = reference(ranks, name)
    assert ref["resumed_epoch"] == 6  # saved at epoch 5; nnU-Net stores current_epoch + 1
    assert ref["resumed_kl_history"] == ranks[0][name]["kl_history"]


def test_checkpoint_holds_every_rank_rng_state_and_one_rank_continues_rank_0(ranks):
    checkpoint = torch.load(ranks[0]["ciml_variational"]["checkpoint"], weights_only=False)
    state = checkpoint["nnunet_ext"]["state"]
    per_rank = state["rng_per_rank"]
    assert len(per_rank) == WORLD
    assert not torch.equal(per_rank[0]["torch"], per_rank[1]["torch"])  # the workers seeded torch with their rank
    assert torch.equal(per_rank[0]["torch"], state["rng"]["torch"])
    assert torch.equal(reference(ranks, "ciml_variational")["resumed_rng"], per_rank[0]["torch"])


def test_ciml_variational_stays_identical_on_ranks(ranks):
    initial = assert_identical_on_ranks(ranks, "ciml_variational", "initial")
    final = assert_identical_on_ranks(ranks, "ciml_variational", "final")
    assert any(not torch.equal(initial[k], final[k]) for k in initial)


# ---------------------------------------------------------------------------------------------- tests: ACTION
def assert_same_rows(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    """Equal up to the order of the rows (one process concatenates all labeled then all unlabeled images, the
    ranks contribute labeled + unlabeled each, so the queues hold the same rows in another order)."""
    assert got.shape == expected.shape
    distance = torch.cdist(got.double().flatten(1), expected.double().flatten(1))
    nearest = distance.argmin(1)
    assert sorted(nearest.tolist()) == list(range(expected.shape[0]))  # a bijection
    assert distance.min(1).values.max() < atol


def test_action_stage_ii_teacher_heads_and_queues_identical_on_ranks(ranks):
    assert [r["action_stage_ii"]["stage"] for r in ranks] == [1, 1]
    initial = assert_identical_on_ranks(ranks, "action_stage_ii", "initial")
    final = assert_identical_on_ranks(ranks, "action_stage_ii", "final")
    for prefix in ("net.", "extra.teacher.", "extra.global_k.", "extra.local_k.", "extra.local_q."):
        assert any(not torch.equal(initial[k], final[k]) for k in final if k.startswith(prefix)), prefix
    # both queues received every rank's rows: 2 steps x (labeled + unlabeled) images of both ranks
    images = STEPS * 2 * WORLD
    assert int(final["extra.global_queue.pointer"]) == images
    assert int(final["extra.local_queue.pointer"]) > int(initial["extra.local_queue.pointer"])
    assert_same_logs(ranks, "action_stage_ii")


def test_action_stage_ii_two_ranks_equal_one_process(ranks):
    final = assert_identical_on_ranks(ranks, "action_stage_ii", "final")
    ref = reference(ranks, "action_stage_ii")["final"]
    queues = [k for k in final if k.endswith("queue.items")]
    assert_close_states(final, ref, keys=[k for k in final if k not in queues], rtol=1e-4, atol=1e-5)
    for k in queues:
        assert_same_rows(final[k], ref[k])


@pytest.mark.parametrize("name", ["action_stage_ii", "action_pp_stage_iii"])
def test_action_checkpoint_of_rank_0_resumes_on_one_rank(ranks, name):
    assert_resumed_exactly(ranks, name)


def test_action_pp_stage_iii_centroids_and_saacl_queues_identical_on_ranks(ranks):
    assert [r["action_pp_stage_iii"]["stage"] for r in ranks] == [2, 2]
    initial = assert_identical_on_ranks(ranks, "action_pp_stage_iii", "initial")
    final = assert_identical_on_ranks(ranks, "action_pp_stage_iii", "final")
    for key in ("extra.centres.centroids", "extra.saacl_features.items", "extra.rep_head_ema.0.weight"):
        assert not torch.equal(initial[key], final[key]), key
    # every class is present in every rank's random labels: 16 voxels per class, rank and step
    classes = 3
    assert int(final["extra.saacl_labels.pointer"]) == STEPS * WORLD * classes * _SmallAction.saacl_pixels_per_class
    assert_same_logs(ranks, "action_pp_stage_iii")


# ---------------------------------------------------------------------------------------------- tests: CAML
def test_caml_models_heads_and_memory_bank_identical_on_ranks(ranks):
    initial = assert_identical_on_ranks(ranks, "caml", "initial")
    final = assert_identical_on_ranks(ranks, "caml", "final")
    for prefix in ("net.", "extra.net_a.", "extra.heads.proj_v.1.running_mean"):
        assert any(not torch.equal(initial[k], final[k]) for k in final if k.startswith(prefix)), prefix
    # the bank holds every labeled case of both ranks and both steps (one process on the concatenated batches
    # would store the same cases)
    cases = {k.split(".")[1] for k in final if k.startswith("bank.")}
    assert cases == {f"case_{step}_{i}" for step in range(STEPS) for i in range(WORLD)}
    assert torch.equal(ranks[0]["caml"]["generator"], ranks[1]["caml"]["generator"])
    log = assert_same_logs(ranks, "caml")
    assert log["caml_mem_classes"] > 0 and log["caml_occ_rows"] > 0  # the memory and OCC were active


def test_caml_checkpoint_of_rank_0_resumes_on_one_rank(ranks):
    assert_resumed_exactly(ranks, "caml")


# ---------------------------------------------------------------------------------------------- tests: CFCML
def test_cfcml_refuses_a_batch_that_is_not_balanced_on_every_rank(ranks):
    for result in ranks:
        assert "multiple of 2 ranks x 3 classes" in result["cfcml"]["refused"]
        assert "batch_size" in result["cfcml"]["refused"]
    assert [r["cfcml"]["batch_size"] for r in ranks] == [CFCML_BATCH // WORLD] * WORLD


def test_cfcml_prototypes_are_global_and_gradients_equal_one_process(ranks):
    ref = reference(ranks, "cfcml")
    for step in range(STEPS):
        for key in ("cfcml_l_sam", "cfcml_l_up", "cfcml_l_cp"):
            # every rank computes the HRM terms on the gathered batch: the value one process gets
            values = [float(r["cfcml"]["outputs"][step][key]) for r in ranks]
            assert values[0] == values[1], (step, key)
            if step == 0:  # same weights in both runs: the exact one-process value
                assert values[0] == pytest.approx(float(ref["outputs"][0][key]), rel=1e-5), key
    ce = [float(r["cfcml"]["outputs"][0]["cfcml_ce"]) for r in ranks]
    assert sum(ce) / WORLD == pytest.approx(float(ref["outputs"][0]["cfcml_ce"]), rel=1e-5)
    gradients = [r["cfcml"]["gradients"] for r in ranks]
    assert gradients[0].keys() == gradients[1].keys() == ref["gradients"].keys()
    for name, value in ref["gradients"].items():
        assert torch.equal(gradients[0][name], gradients[1][name]), name
        assert torch.allclose(gradients[0][name], value, rtol=1e-3, atol=1e-7), name
    assert_identical_on_ranks(ranks, "cfcml", "final")
    assert_same_logs(ranks, "cfcml")


def test_cfcml_validation_is_split_and_gathered(ranks):
    validation = [r["cfcml"]["validation"] for r in ranks]
    assert (validation[0] == validation[1]).all()
    ref = reference(ranks, "cfcml")["validation"]
    assert validation[0].shape == ref.shape and ref.shape[0] > 1
    # the final networks agree to rounding (Adam steps), so the probabilities do too
    assert abs(validation[0] - ref).max() < 1e-3


def test_cfcml_checkpoint_of_rank_0_resumes_on_one_rank(ranks):
    assert_resumed_exactly(ranks, "cfcml")
