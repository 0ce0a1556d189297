"""ExtTrainerBase in process: heads join the optimiser, extra state survives a checkpoint round trip exactly, and a
save killed at any moment never prevents ``--c`` from resuming."""
from __future__ import annotations

import copy
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_nnunet import make_tiny_dataset, plan_and_preprocess, set_nnunet_paths
from nnunetv2.run.run_training import maybe_load_checkpoint
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunet_ext.compat import nnunet_checkpoint
from nnunet_ext.errors import InputError
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


# ---------------------------------------------------------------------- checkpoints written atomically (issue 17.7)
def _assert_same(a, b, where: str = "checkpoint") -> None:
    """Recursive equality of two loaded checkpoints (tensors and arrays exactly)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b or (a != a and b != b), where  # NaN == NaN for logged values


def test_checkpoint_holds_exactly_nnunets_dict_plus_our_key(make_trainer, tmp_path):
    trainer = make_trainer()
    trainer.train_step(_batch(trainer, 0))
    trainer.current_epoch = 3
    nnUNetTrainer.save_checkpoint(trainer, str(tmp_path / "stock.pth"))
    trainer.save_checkpoint(str(tmp_path / "ours.pth"))
    stock = torch.load(tmp_path / "stock.pth", weights_only=False)
    ours = torch.load(tmp_path / "ours.pth", weights_only=False)
    assert ours.pop("nnunet_ext")["family"] == "base"
    _assert_same(stock, ours)
    assert stock.keys() == nnunet_checkpoint(trainer).keys()


KILLED = 137  # exit code of the forked saver when killed at the kill point


def _kill_here() -> None:
    os._exit(KILLED)  # like SIGKILL: no exception handler, no finally, no clean-up runs


def _half_written_torch_save(obj, f, *args, **kwargs) -> None:
    buffer = io.BytesIO()
    torch.serialization.save(obj, buffer)
    data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    if isinstance(f, (str, os.PathLike)):
        Path(f).write_bytes(data)
    else:
        f.write(data)
        f.flush()
    _kill_here()


def _rename_then_die(src, dst) -> None:
    _REAL_REPLACE(src, dst)
    _kill_here()


_REAL_REPLACE = os.replace
#: kill point -> (module, attribute, replacement, does the new checkpoint survive)
KILL_POINTS = {
    "while torch.save writes": (torch, "save", _half_written_torch_save, False),
    "written, before fsync": (os, "fsync", lambda fd: _kill_here(), False),
    "fsynced, before the rename": (os, "replace", lambda src, dst: _kill_here(), False),
    "right after the rename": (os, "replace", _rename_then_die, True),
}


def _save_and_get_killed(trainer, filename: str, point: str) -> None:
    """``trainer.save_checkpoint(filename)`` in a forked process that dies at ``point``."""
    module, attribute, replacement, _ = KILL_POINTS[point]
    pid = os.fork()
    if pid == 0:  # the child: patch, save, never return into pytest
        code = 1
        try:
            setattr(module, attribute, replacement)
            trainer.save_checkpoint(filename)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == KILLED, f"the save never reached {point!r}"


def _snapshot(trainer) -> dict:
    return copy.deepcopy({"network": trainer.network.state_dict(), "extra": trainer.extra_modules.state_dict()})


def _assert_resumed_from(resumed, snapshot: dict, epoch: int) -> None:
    assert resumed.current_epoch == epoch
    _assert_same(snapshot, {"network": resumed.network.state_dict(), "extra": resumed.extra_modules.state_dict()})
    out = resumed.train_step(_batch(resumed, 7))  # training continues
    assert np.isfinite(out["loss"])


def _resume(make_trainer, folder: Path):
    resumed = make_trainer()
    resumed.output_folder = str(folder)
    maybe_load_checkpoint(resumed, continue_training=True, validation_only=False)
    return resumed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="simulates SIGKILL with a forked process")
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_c_resumes_after_a_save_killed_at_any_point(make_trainer, tmp_path, point):
    trainer = make_trainer()
    latest = str(tmp_path / "checkpoint_latest.pth")
    trainer.train_step(_batch(trainer, 0))
    trainer.current_epoch = 0
    trainer.save_checkpoint(latest)  # an intact checkpoint: resuming from it starts epoch 1
    before = _snapshot(trainer)
    trainer.train_step(_batch(trainer, 1))
    trainer.current_epoch = 1
    after = _snapshot(trainer)
    _save_and_get_killed(trainer, latest, point)

    new_checkpoint_survives = KILL_POINTS[point][3]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "checkpoint_latest.pth" and len(names) == (1 if new_checkpoint_survives else 2), names
    resumed = _resume(make_trainer, tmp_path)
    _assert_resumed_from(resumed, after if new_checkpoint_survives else before, 2 if new_checkpoint_survives else 1)
    resumed.save_checkpoint(latest)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]  # the killed save's file is gone


def _write_zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_our_state(path: Path) -> None:
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["nnunet_ext"]
    torch.save(checkpoint, path)


#: files as a killed save of nnunet-ext 0.1.0 (nnU-Net's write, then ours) could leave them
BROKEN = {
    "latest 0 bytes (killed in nnU-Net's write)": ("checkpoint_latest.pth", _write_zero_bytes, "best"),
    "latest truncated": ("checkpoint_latest.pth", _truncate, "best"),
    "latest without our state (killed between the writes)": ("checkpoint_latest.pth", _drop_our_state, "best"),
    "final truncated (killed in the last save)": ("checkpoint_final.pth", _truncate, "latest"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_c_falls_back_to_the_newest_intact_checkpoint_with_a_warning(make_trainer, tmp_path, capsys, case):
    broken, damage, expected = BROKEN[case]
    trainer = make_trainer()
    trainer.current_epoch = 0
    trainer.save_checkpoint(str(tmp_path / "checkpoint_best.pth"))
    snapshots = {"best": (_snapshot(trainer), 1)}
    trainer.train_step(_batch(trainer, 0))
    trainer.current_epoch = 1
    trainer.save_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    snapshots["latest"] = (_snapshot(trainer), 2)
    older = (tmp_path / "checkpoint_latest.pth").stat().st_mtime - 60
    os.utime(tmp_path / "checkpoint_best.pth", (older, older))  # "newest" is decided by modification time
    if broken == "checkpoint_final.pth":
        shutil.copy(tmp_path / "checkpoint_latest.pth", tmp_path / broken)
    damage(tmp_path / broken)
    capsys.readouterr()

    resumed = _resume(make_trainer, tmp_path)
    _assert_resumed_from(resumed, *snapshots[expected])
    warning = [line for line in capsys.readouterr().out.splitlines() if "resuming from" in line]
    assert len(warning) == 1 and str(tmp_path / broken) in warning[0]
    assert str(tmp_path / f"checkpoint_{expected}.pth") in warning[0]


def test_c_without_any_readable_checkpoint_is_a_clear_error(make_trainer, tmp_path):
    (tmp_path / "checkpoint_latest.pth").write_bytes(b"")
    (tmp_path / "checkpoint_best.pth").write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(InputError, match=r"checkpoint_latest.pth cannot be read \(EOFError.*"
                                         r"checkpoint_best.pth cannot be read"):
        _resume(make_trainer, tmp_path)


def test_an_explicit_checkpoint_path_is_never_swapped_for_another_file(make_trainer, tmp_path):
    trainer = make_trainer()
    trainer.save_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    (tmp_path / "mine.pth").write_bytes(b"")
    with pytest.raises(InputError, match="mine.pth cannot be read"):
        make_trainer().load_checkpoint(str(tmp_path / "mine.pth"))
