"""``nnunet-ext configure action``: store validated ACTION / ACTION++ setting overrides in a derived plans file.

Only the given overrides are stored (trainer variants keep their own class-attribute defaults for the rest). Both
trainers read the same ``action`` block, so a name of either is accepted; a typo or an invalid value fails here,
not at the start of a training run.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnunet_ext.action.settings import validate_action_settings
from nnunet_ext.plans import derive_validated_plans


def action_defaults() -> dict[str, Any]:
    """Every ACTION / ACTION++ setting name with its class-attribute default (ACTION++ adds to ACTION's names)."""
    from nnunet_ext.action.trainer import ActionPlusPlusTrainerBase

    return {name: getattr(ActionPlusPlusTrainerBase, name) for name in ActionPlusPlusTrainerBase.setting_names}


def derive_plans(plans: dict, target_identifier: str, settings: Mapping[str, Any],
                 preprocessed_dataset_folder: str) -> dict:
    """Derived plans carrying ``settings`` under ``nnunet_ext.action``.

    Raises:
        KeyError: unknown setting names.
        ValueError: invalid values.
    """
    return derive_validated_plans(plans, target_identifier, "action", settings, action_defaults(),
                                  validate_action_settings)
