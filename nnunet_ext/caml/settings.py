"""CAML's settings: defaults are the trainer's class attributes, a ``caml`` block in the plans overrides them.

CAML needs no dataset-specific configuration (it trains with stock plans); the block exists for experiments
(``nnunet-ext configure caml --config settings.json``). All settings affect training only: the inference network
is nnU-Net's planned network, independent of them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnunet_ext.caml.attention import CMA_MODES
from nnunet_ext.caml.losses import OCC_LOG_FORMS
from nnunet_ext.caml.networks import AUX_UPSAMPLING_MODES
from nnunet_ext.plans import merge_settings

CAML_SETTING_NAMES = (
    "cma_stage", "cma_max_tokens", "cma_heads", "cma_ffn_mult", "cma_dropout", "cma_mode", "aux_upsampling",
    "feat_dim", "memory_per_class", "memory_cap", "memory_slots", "num_filtered", "occ_temperature",
    "occ_normalize", "occ_log_form", "heads_before_filter", "sharpen_temperature", "detach_targets", "w_sup",
    "lambda_c", "lambda_o", "rampup_fraction", "rampup_iterations", "rampup_quantum", "split_planned_batch",
)

#: ``CAMLTrainer``'s class-attribute values (a test keeps them equal); used to validate plans blocks without importing
#: the trainer file (nnU-Net imports trainer files as top-level modules).
CAML_DEFAULTS: dict[str, Any] = {
    "cma_stage": None, "cma_max_tokens": 4096, "cma_heads": 4, "cma_ffn_mult": 4, "cma_dropout": 0.5,
    "cma_mode": "intra+inter", "aux_upsampling": "interp", "feat_dim": 32, "memory_per_class": 256,
    "memory_cap": 4096, "memory_slots": None, "num_filtered": 12800, "occ_temperature": 0.1,
    "occ_normalize": False, "occ_log_form": "eps", "heads_before_filter": False, "sharpen_temperature": 0.1,
    "detach_targets": False, "w_sup": 1.0, "lambda_c": 1.0, "lambda_o": 0.05, "rampup_fraction": 0.4,
    "rampup_iterations": None, "rampup_quantum": 1,
    "split_planned_batch": False,
}

_POSITIVE_INTS = ("cma_max_tokens", "cma_heads", "cma_ffn_mult", "feat_dim", "memory_per_class", "memory_cap",
                  "num_filtered", "rampup_quantum")
_POSITIVE_FLOATS = ("occ_temperature", "sharpen_temperature")
_NON_NEGATIVE_FLOATS = ("w_sup", "lambda_c", "lambda_o", "rampup_fraction")
_BOOLS = ("occ_normalize", "heads_before_filter", "detach_targets", "split_planned_batch")
_CHOICES = {"cma_mode": CMA_MODES, "aux_upsampling": AUX_UPSAMPLING_MODES, "occ_log_form": OCC_LOG_FORMS}


def validate_caml_settings(settings: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming the setting and ``where`` it came from for any invalid value."""

    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"CAML setting {name}={settings[name]!r} in {where}: expected {expected}")

    for name in _POSITIVE_INTS:
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(name, "an integer >= 1")
    for name in _POSITIVE_FLOATS + _NON_NEGATIVE_FLOATS:
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(name, "a number")
        if name in _POSITIVE_FLOATS and not value > 0:
            raise bad(name, "a number > 0")
        if name in _NON_NEGATIVE_FLOATS and value < 0:
            raise bad(name, "a number >= 0")
    for name in _BOOLS:
        if not isinstance(settings[name], bool):
            raise bad(name, "true or false")
    for name, choices in _CHOICES.items():
        if settings[name] not in choices:
            raise bad(name, f"one of {list(choices)}")
    if not 0.0 <= settings["cma_dropout"] < 1.0:
        raise bad("cma_dropout", "a number in [0, 1)")
    if settings["cma_stage"] is not None and (isinstance(settings["cma_stage"], bool)
                                              or not isinstance(settings["cma_stage"], int)):
        raise bad("cma_stage", "null or an integer stage index")
    iterations = settings["rampup_iterations"]
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, (int, float))
                                   or iterations < 0):
        raise bad("rampup_iterations", "null or a number >= 0")
    slots = settings["memory_slots"]
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise bad("memory_slots", "null (one slot per labeled case) or an integer >= 1")
    if settings["memory_cap"] < settings["memory_per_class"]:
        raise bad("memory_cap", f"an integer >= memory_per_class ({settings['memory_per_class']})")


def caml_defaults(trainer_class: type) -> dict[str, Any]:
    """The class attributes of a CAML trainer (class or subclass) that are settings."""
    return {name: getattr(trainer_class, name) for name in CAML_SETTING_NAMES}


def resolve_caml_settings(trainer_class: type, overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Class-attribute defaults updated with ``overrides``, validated.

    Raises:
        KeyError: unknown setting names (listing the known ones).
        ValueError: invalid values.
    """
    settings = merge_settings(caml_defaults(trainer_class), overrides, where)
    validate_caml_settings(settings, where)
    return settings
