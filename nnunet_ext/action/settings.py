"""Checks of ACTION / ACTION++ setting values, shared by ``nnunet-ext configure action`` and the trainers.

The trainers' class attributes are the defaults; a plans block overrides them (``ActionTrainerBase.__init__``).
Values that would only fail when training starts are checked here, so ``configure`` refuses them up front.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnunet_ext.action.saacl import CENTROID_INITS
from nnunet_ext.action.schedules import ATS_TARGETS, resolve_stage_epochs
from nnunet_ext.action.views import MIXING_MODES

BOOL_SETTINGS = ("saacl_count_centre", "saacl_mask_empty_slots")


def validate_action_settings(settings: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming the setting and ``where`` it came from for an invalid ``mixing``,
    ``stage_epochs``, ``ats_targets``, ``saacl_centroid_init`` or SAACL switch (settings absent from ``settings``
    are not checked)."""
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
    if "ats_targets" in settings:
        targets = settings["ats_targets"]
        if (not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) and t in ATS_TARGETS for t in targets)
                or len(set(targets)) != len(targets)):
            raise ValueError(f"ACTION++ setting ats_targets={targets!r} in {where}: expected a list of distinct names "
                             f"from {ATS_TARGETS} (may be empty)")
    if "saacl_centroid_init" in settings and settings["saacl_centroid_init"] not in CENTROID_INITS:
        raise ValueError(f"ACTION++ setting saacl_centroid_init={settings['saacl_centroid_init']!r} in {where}: "
                         f"expected one of {CENTROID_INITS}")
    for name in BOOL_SETTINGS:
        if name in settings and not isinstance(settings[name], bool):
            raise ValueError(f"ACTION++ setting {name}={settings[name]!r} in {where}: expected true or false")
