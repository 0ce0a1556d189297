"""``nnunet-ext configure caml``: store validated CAML setting overrides in a derived plans file.

Only the given overrides are stored (trainer variants keep their own class-attribute defaults for the rest); they are
validated against the defaults of ``CAMLTrainer`` so that a typo fails here, not at the start of a training run.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnunet_ext.caml.settings import CAML_DEFAULTS, validate_caml_settings
from nnunet_ext.plans import derive_validated_plans


def derive_plans(plans: dict, target_identifier: str, settings: Mapping[str, Any],
                 preprocessed_dataset_folder: str) -> dict:
    """Derived plans carrying ``settings`` under ``nnunet_ext.caml``.

    Raises:
        KeyError: unknown setting names.
        ValueError: invalid values.
    """
    return derive_validated_plans(plans, target_identifier, "caml", settings, CAML_DEFAULTS, validate_caml_settings)
