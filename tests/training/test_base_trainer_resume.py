"""ExtTrainerBase in process: heads join the optimiser, extra state survives a checkpoint round trip exactly."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers_nnunet import make_tiny_dataset, plan_and_preprocess, set_nnunet_paths
from torch import nn

from nnunet_ext.training.base_trainer import ExtTrainerBase
from nnunet_ext.training.ema import ema_update

DATASET = 993


class _HeadTrainer(ExtTrainerBase):
    """A frozen EMA teacher and a trainable projection head: the two kinds of extra modules."""

    extra_log_keys = ("test_head",)

    def build_extra_modules(self):
        channels = self.label_manager.num_segmentation_heads
        return {"teacher": copy.deepcopy(self.network).requires_grad_(False),
                "head": nn.Conv3d(channels, 4, 1)}

    def compute_loss(self, batch):
        output = self.network(batch["data"])
        head = self.extra_modules["head"](output[0]).pow(2).mean()
        return self.loss(output, batch["target"]) + 0.1 * head, {"test_head": head.detach()}

    def after_optimizer_step(self):
        ema_update(self.extra_modules["teacher"], self.network, 0.5)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as mp:
        folders = set_nnunet_paths(mp, root)
        make_tiny_dataset(folders["nnUNet_raw"], dataset_id=DATASET, name="Resume", n_labelled=5, n_unlabeled=0)
        plan_and_preprocess(DATASET)
    return root


@pytest.fixture
def make_trainer(planned, monkeypatch):
    set_nnunet_paths(monkeypatch, planned, n_proc_da=0)
    folder = planned / "nnUNet_preprocessed" / f"Dataset{DATASET:03d}_Resume"
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())

    def make(cls=_HeadTrainer):
        p = copy.deepcopy(plans)
        p["continue_training"] = False
        trainer = cls(p, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
        trainer.initialize()
        return trainer

    return make


def _batch(trainer, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    data = torch.randn((2, trainer.num_input_channels, *patch), generator=g)
    with torch.no_grad():
        shapes = [o.shape[2:] for o in trainer.network(data)]
    target = [torch.randint(0, 3, (2, 1, *s), generator=g).float() for s in shapes]
    return {"data": data, "target": target, "keys": ["a", "b"]}


def test_trainable_heads_join_the_optimiser_and_teachers_do_not(make_trainer):
    trainer = make_trainer()
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in optimised for p in trainer.extra_modules["head"].parameters())
    assert not any(id(p) in optimised for p in trainer.extra_modules["teacher"].parameters())
    head_before = [p.clone() for p in trainer.extra_modules["head"].parameters()]
    out = trainer.train_step(_batch(trainer, 0))
    assert set(out) == {"loss", "test_head"}
    assert any(not torch.equal(a, b) for a, b in zip(head_before, trainer.extra_modules["head"].parameters()))


def test_checkpoint_round_trip_is_exact(make_trainer, tmp_path):
    trainer = make_trainer()
    for step in range(2):
        trainer.train_step(_batch(trainer, step))
    trainer.on_train_epoch_end([trainer.train_step(_batch(trainer, 2))])
    trainer.current_epoch = 1
    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)

    resumed = make_trainer()
    resumed.load_checkpoint(path)
    for (name, a), (_, b) in zip(trainer.extra_modules.state_dict().items(),
                                 resumed.extra_modules.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.current_epoch == 2  # nnU-Net stores current_epoch + 1
    logged = resumed.logger.get_value("test_head", step=None)
    # epoch 0 was logged; epoch 1 never ran its end hook here, so it is padded to keep one entry per epoch
    assert logged[0] == trainer.logger.get_value("test_head", step=0) and len(logged) == resumed.current_epoch
    batch = _batch(trainer, 3)
    assert trainer.train_step(batch)["loss"] == resumed.train_step(batch)["loss"]
    for a, b in zip(trainer.extra_modules.parameters(), resumed.extra_modules.parameters()):
        assert torch.equal(a, b)


def test_stock_checkpoint_loads_with_fresh_extra_state_and_padded_keys(make_trainer, tmp_path):
    trainer = make_trainer()
    trainer.current_epoch = 2
    path = str(tmp_path / "stock.pth")
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["nnunet_ext"]
    del checkpoint["logging"]["test_head"]
    torch.save(checkpoint, path)
    resumed = make_trainer()
    resumed.load_checkpoint(path)
    assert len(resumed.logger.get_value("test_head", step=None)) == 3


def test_load_checkpoint_rejects_dicts(make_trainer):
    with pytest.raises(TypeError, match="file path"):
        make_trainer().load_checkpoint({"network_weights": {}})


def test_unregistered_loss_components_are_an_error(make_trainer):
    class _Sloppy(_HeadTrainer):
        extra_log_keys = ()

    with pytest.raises(KeyError, match="extra_log_keys"):
        make_trainer(_Sloppy).train_step(_batch(make_trainer(_Sloppy), 0))
