from __future__ import annotations

import math
import os
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch
from nnunetv2.training.logging.nnunet_logger import LocalLogger, MetaLogger

from nnunet_ext.training.checkpoint import (
    CHECKPOINT_KEY,
    make_extra_payload,
    read_extra_state,
    write_checkpoint_atomically,
)
from nnunet_ext.training.logging import ExtLocalLogger, log_epoch_values, register_log_keys


def _trainer(epoch: int, local=None):
    logger = MetaLogger("/nonexistent", resume=False)
    logger.local_logger = local or ExtLocalLogger(["x_a", "x_b"])
    return SimpleNamespace(logger=logger, current_epoch=epoch)


def test_register_is_idempotent_and_pads_with_nan():
    trainer = _trainer(epoch=3)
    register_log_keys(trainer, ["x_a"])
    register_log_keys(trainer, ["x_a"])
    values = trainer.logger.local_logger.my_fantastic_logging["x_a"]
    assert len(values) == 3 and all(math.isnan(v) for v in values)


def test_one_value_per_epoch_nan_when_missing():
    trainer = _trainer(epoch=0)
    register_log_keys(trainer, ["x_a", "x_b"])
    for epoch in range(3):
        trainer.current_epoch = epoch
        log_epoch_values(trainer, {"x_a": epoch}, ["x_a", "x_b"])
    log = trainer.logger.local_logger.my_fantastic_logging
    assert log["x_a"] == [0.0, 1.0, 2.0]
    assert len(log["x_b"]) == 3 and all(math.isnan(v) for v in log["x_b"])


def _fill(logger: LocalLogger, epochs: int) -> None:
    for e in range(epochs):
        for key in ("mean_fg_dice", "dice_per_class_or_region", "train_losses", "val_losses", "lrs",
                    "epoch_start_timestamps"):
            logger.log(key, 0.1 * e, e)
        logger.log("ema_fg_dice", 0.1 * e, e)
        logger.log("epoch_end_timestamps", 0.1 * e + 1, e)


def test_progress_png_gains_a_panel_with_extra_keys(tmp_path):
    stock, ext = LocalLogger(), ExtLocalLogger(["x_a"])
    for logger, folder in ((stock, tmp_path / "stock"), (ext, tmp_path / "ext")):
        folder.mkdir()
        _fill(logger, 3)
    ext.my_fantastic_logging["x_a"] = [1.0, 0.5, 0.25]
    stock.plot_progress_png(str(tmp_path / "stock"))
    ext.plot_progress_png(str(tmp_path / "ext"))
    a, b = plt.imread(tmp_path / "stock" / "progress.png"), plt.imread(tmp_path / "ext" / "progress.png")
    assert b.shape[1] == a.shape[1] and b.shape[0] > a.shape[0]
    # the stock part is drawn by nnU-Net itself, unchanged
    assert abs(b[: a.shape[0]] - a).max() < 1e-2


def test_extra_state_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    checkpoint = {"network_weights": {"w": torch.ones(2)}, "current_epoch": 3}
    write_checkpoint_atomically(checkpoint, path)
    assert read_extra_state(path, "caml") is None
    checkpoint[CHECKPOINT_KEY] = make_extra_payload("caml", {"bank": torch.arange(4)})
    write_checkpoint_atomically(checkpoint, path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["current_epoch"] == 3 and checkpoint[CHECKPOINT_KEY]["family"] == "caml"
    assert torch.equal(read_extra_state(path, "caml")["bank"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
    with pytest.raises(ValueError, match="family 'caml'"):
        read_extra_state(path, "action")
    checkpoint[CHECKPOINT_KEY]["format"] = 99
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="format"):
        read_extra_state(path, "caml")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_latest.pth"
    write_checkpoint_atomically({"current_epoch": 1}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_checkpoint_atomically({"current_epoch": 2}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]
    assert torch.load(path, weights_only=False) == {"current_epoch": 1}


def test_next_save_removes_temporary_files_of_killed_saves_and_nothing_else(tmp_path):
    leftovers = ["checkpoint_best.pth.k3j2_x.tmp", "checkpoint_latest.pth.tmp", "checkpoint_final.pth.a1.tmp"]
    kept = ["checkpoint_best.pth", "notes.tmp", "training_log.txt"]
    for name in leftovers + kept:
        (tmp_path / name).write_bytes(b"x")
    write_checkpoint_atomically({"current_epoch": 1}, tmp_path / "checkpoint_latest.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["checkpoint_latest.pth"])


def test_checkpoint_gets_the_usual_permissions_not_a_private_temporary_files(tmp_path):
    umask = os.umask(0o022)
    try:
        write_checkpoint_atomically({"current_epoch": 1}, tmp_path / "checkpoint_latest.pth")
    finally:
        os.umask(umask)
    assert (tmp_path / "checkpoint_latest.pth").stat().st_mode & 0o777 == 0o644
