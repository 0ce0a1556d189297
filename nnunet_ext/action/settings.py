"""Checks of ACTION / ACTION++ setting values, shared by ``nnunet-ext configure action`` and the trainers.

The trainers' class attributes are the defaults; a plans block overrides them (``ActionTrainerBase.__init__``).
Values that would only fail when training starts are checked here, so ``configure`` refuses them up front.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnunet_ext.action.schedules import resolve_stage_epochs
from nnunet_ext.action.views import MIXING_MODES


def validate_action_settings(settings: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming the setting and ``where`` it came from for an invalid ``mixing`` or
    ``stage_epochs`` (settings absent from ``settings`` are not checked)."""
    mixing = settings.get("mixing")
    if mixing is not None and mixing not in MIXING_MODES:
        raise ValueError(f"ACTION setting mixing={mixing!r} in {where}: expected one of {MIXING_MODES} or null")
    if "stage_epochs" in settings:
        stage_epochs = settings["stage_epochs"]
        if not isinstance(stage_epochs, (list, tuple)) or not all(
                isinstance(e, int) and not isinstance(e, bool) for e in stage_epochs):
            raise ValueError(f"ACTION setting stage_epochs={stage_epochs!r} in {where}: expected three integers")
        try:
            resolve_stage_epochs(stage_epochs, num_epochs=1)  # the structural checks of the training-time call
        except ValueError as error:
            raise ValueError(f"ACTION setting in {where}: {error}") from None
