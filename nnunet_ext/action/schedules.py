"""Stage schedule, per-stage poly learning rate and ACTION++'s cosine temperature schedule."""
from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim.lr_scheduler import _LRScheduler

NUM_STAGES = 3

#: what ACTION++'s cosine temperature schedule (ATS) can drive: the distillation temperatures of stage i and of
#: stage ii, the anatomical-contrast temperature and the SAACL temperature of stage iii
ATS_TARGETS = ("distillation_i", "distillation_ii", "anco", "saacl")


def resolve_stage_epochs(stage_epochs: Sequence[int], num_epochs: int) -> tuple[int, int, int]:
    """Epochs of stages (i, ii, iii) for a run of ``num_epochs``.

    ``stage_epochs`` is used as given when it sums to ``num_epochs``; otherwise it is read as proportions and
    scaled (largest remainder, ties to later stages) so that any nnU-Net budget, e.g. a 10-epoch demo trainer,
    keeps the schedule's shape. Zero-length stages are allowed (e.g. an ablation without stage ii).

    Raises:
        ValueError: wrong length, negative entries, all zero, or ``num_epochs < 1``.
    """
    stage_epochs = tuple(int(e) for e in stage_epochs)
    if len(stage_epochs) != NUM_STAGES or any(e < 0 for e in stage_epochs) or sum(stage_epochs) == 0:
        raise ValueError(f"stage_epochs must be three non-negative integers with a positive sum, got {stage_epochs}")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be positive, got {num_epochs}")
    total = sum(stage_epochs)
    if total == num_epochs:
        return stage_epochs  # type: ignore[return-value]
    exact = [e * num_epochs / total for e in stage_epochs]
    scaled = [math.floor(x) for x in exact]
    by_remainder = sorted(range(NUM_STAGES), key=lambda i: (exact[i] - scaled[i], i), reverse=True)
    for i in by_remainder[: num_epochs - sum(scaled)]:
        scaled[i] += 1
    return tuple(scaled)  # type: ignore[return-value]


def stage_starts(stage_epochs: Sequence[int]) -> tuple[int, ...]:
    """First epoch of each stage."""
    starts, position = [], 0
    for e in stage_epochs:
        starts.append(position)
        position += e
    return tuple(starts)


def stage_of_epoch(epoch: int, stage_epochs: Sequence[int]) -> int:
    """Stage index (0, 1, 2) of ``epoch``; epochs past the end belong to the last non-empty stage."""
    position = 0
    last_non_empty = max(i for i, e in enumerate(stage_epochs) if e > 0)
    for stage, e in enumerate(stage_epochs):
        position += e
        if epoch < position:
            return stage
    return last_non_empty


class StagePolyLRScheduler(_LRScheduler):
    """nnU-Net's poly schedule restarted at every stage: ``lr = lr0 (1 - e_stage / E_stage)^exponent``.

    Same interface as nnU-Net's ``PolyLRScheduler`` (``step(current_epoch)``), which spans all epochs instead.
    """

    def __init__(self, optimizer, initial_lr: float, stage_epochs: Sequence[int], exponent: float = 0.9):
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.stage_epochs = tuple(stage_epochs)
        self.exponent = exponent
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, epoch: int) -> float:
        stage = stage_of_epoch(epoch, self.stage_epochs)
        within = min(epoch - stage_starts(self.stage_epochs)[stage], self.stage_epochs[stage] - 1)
        return self.initial_lr * (1 - within / self.stage_epochs[stage]) ** self.exponent

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr


def cosine_temperature(t: float, period: float, low: float, high: float) -> float:
    """ACTION++'s anatomical-aware temperature scheduler (ATS):
    ``tau(t) = low + (high - low) (1 + cos(2 pi t / period)) / 2`` — ``high`` at t = 0, ``low`` at period/2,
    ``high`` again at ``period``.

    Raises:
        ValueError: non-positive period or temperatures, or ``low > high``.
    """
    if period <= 0 or low <= 0 or high < low:
        raise ValueError(f"need period > 0 and 0 < low <= high, got period={period}, low={low}, high={high}")
    return low + 0.5 * (high - low) * (1 + math.cos(2 * math.pi * t / period))
