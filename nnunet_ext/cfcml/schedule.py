"""CFCML's learning-rate schedule with nnU-Net's ``scheduler.step(epoch)`` interface.

Official code: a 5-epoch gradual warm-up wrapping ``StepLR(step_size=5, gamma=0.8)``, stepped once per epoch and
created before training, so the first epoch runs with lr 0 (factors 0, 0.2, 0.4, 0.6, 0.8, then 1.0 for epochs
6-11, 0.8 for 12-16, ... 0.168 for 47-50, 1-indexed). Our default shifts this by one epoch so training never runs
at lr 0; ``faithful=True`` reproduces the original table.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import _LRScheduler


def cfcml_lr_factor(epoch: int, faithful: bool = False, warmup_epochs: int = 5, step_size: int = 5,
                    gamma: float = 0.8) -> float:
    """Multiplier of the base lr at 0-indexed ``epoch``.

    Default: ``(e + 1) / 5`` for ``e < 4``, else ``0.8 ** floor(max(0, e - 5) / 5)``.
    Faithful: ``e / 5`` for ``e < 5``, else ``0.8 ** floor(max(0, e - 6) / 5)``.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    shift = 0 if faithful else 1
    if epoch + shift < warmup_epochs:
        return (epoch + shift) / warmup_epochs
    return gamma ** math.floor(max(0, epoch + shift - warmup_epochs - 1) / step_size)


class CFCMLLRScheduler(_LRScheduler):
    """Sets every parameter group's lr to ``initial_lr * cfcml_lr_factor(epoch)`` on ``step(epoch)``."""

    def __init__(self, optimizer: Optimizer, initial_lr: float, faithful: bool = False):
        self.initial_lr = initial_lr
        self.faithful = faithful
        super().__init__(optimizer, -1)

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.last_epoch + 1
        self.last_epoch = current_step
        lr = self.initial_lr * cfcml_lr_factor(current_step, self.faithful)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)
