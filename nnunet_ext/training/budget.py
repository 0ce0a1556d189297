"""Setting a trainer's training budget, the one thing every budget variant of a trainer changes.

nnU-Net expresses budgets as subclasses that overwrite a few attributes after ``super().__init__``
(``nnUNetTrainer_5epochs``). The benchmark's generated trainers and the test-only trainers call
:func:`set_budget` from their ``__init__`` instead of repeating those assignments.
"""
from __future__ import annotations

from typing import Any


def set_budget(trainer: Any, *, epochs: int, iterations: int, val_iterations: int | None = None,
               save_every: int | None = None) -> None:
    """Set ``num_epochs``, ``num_iterations_per_epoch`` and optionally ``num_val_iterations_per_epoch`` and
    ``save_every`` (epochs between intermediate checkpoints) of an nnU-Net trainer, in place.

    Call it in ``__init__`` after ``super().__init__``: nnU-Net sets its defaults there and reads the values from
    ``on_train_start`` on. ``None`` keeps the trainer's own value.

    Raises:
        ValueError: a value that is not a positive integer (nnU-Net would train zero epochs or divide by zero).
    """
    values = {"num_epochs": epochs, "num_iterations_per_epoch": iterations,
              "num_val_iterations_per_epoch": val_iterations, "save_every": save_every}
    values = {attribute: value for attribute, value in values.items() if value is not None}
    for attribute, value in values.items():  # all checked first: a bad value leaves the trainer unchanged
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{attribute} must be a positive integer, got {value!r}")
    for attribute, value in values.items():
        setattr(trainer, attribute, value)
