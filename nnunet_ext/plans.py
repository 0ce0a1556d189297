"""Per-dataset method settings stored in (derived) nnU-Net plans files.

nnU-Net's predictor sees only ``plans.json``, ``dataset.json`` and the checkpoint, and calls the trainer's
``build_network_architecture`` on the class, without a trainer instance. Settings the network depends on
(CIML's task decomposition, CFCML's tabular schema) must therefore live in the plans. They go under the
top-level key ``nnunet_ext`` of a derived plans file written by ``nnunet-ext configure``; nnU-Net tolerates
extra keys and copies the plans into the results folder.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

PLANS_KEY = "nnunet_ext"
PLANS_BLOCK_VERSION = 1
METHOD_FAMILIES = ("ciml", "caml", "action", "cfcml")


def _plans_dict(plans: dict | PlansManager) -> dict:
    return plans.plans if isinstance(plans, PlansManager) else plans


def method_settings(plans: dict | PlansManager, method: str) -> dict[str, Any]:
    """The settings block of ``method`` in ``plans`` (a copy), or ``{}`` when the plans have none."""
    if method not in METHOD_FAMILIES:
        raise ValueError(f"unknown method family {method!r}; expected one of {METHOD_FAMILIES}")
    block = _plans_dict(plans).get(PLANS_KEY, {})
    return copy.deepcopy(block.get(method, {}))


def merge_settings(defaults: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``defaults`` updated with ``overrides``; a key that ``defaults`` does not know is an error.

    Raises:
        KeyError: naming the unknown keys, the known ones and ``where`` the overrides came from.
    """
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise KeyError(f"unknown setting(s) {unknown} in {where}; known settings: {sorted(defaults)}")
    merged = dict(copy.deepcopy(defaults))
    merged.update(copy.deepcopy(dict(overrides)))
    return merged


def derive_plans(plans: dict, target_identifier: str, method: str, settings: Mapping[str, Any]) -> dict:
    """A copy of ``plans`` named ``target_identifier`` that carries ``settings`` for ``method``.

    Every configuration, and so every ``data_identifier``, is kept: training with the derived plans reuses
    the preprocessed data. ``plans_name`` must equal the file identifier because nnU-Net names the results
    folder after it while the predictor locates that folder from ``-p``.
    """
    if method not in METHOD_FAMILIES:
        raise ValueError(f"unknown method family {method!r}; expected one of {METHOD_FAMILIES}")
    json.dumps(settings)  # fail early on settings that cannot be stored in plans.json
    derived = copy.deepcopy(plans)
    derived["plans_name"] = target_identifier
    block = derived.setdefault(PLANS_KEY, {"version": PLANS_BLOCK_VERSION})
    block["version"] = PLANS_BLOCK_VERSION
    block[method] = copy.deepcopy(dict(settings))
    return derived


def derive_validated_plans(plans: dict, target_identifier: str, method: str, settings: Mapping[str, Any],
                           defaults: Mapping[str, Any], validate: Callable[[dict[str, Any], str], None]) -> dict:
    """:func:`derive_plans` storing only the user's ``settings``, after checking them merged into ``defaults``
    with ``validate(merged, where)``, so that a typo or a bad value fails at configure time, not at training start.

    Raises:
        KeyError: unknown setting names.
        ValueError: invalid values (as raised by ``validate``).
    """
    where = f"the {method.upper()} settings for {target_identifier}"
    validate(merge_settings(defaults, settings, where), where)
    return derive_plans(plans, target_identifier, method, dict(settings))


# What a method's own ``nnunet_ext.<method>.configure.derive_plans`` receives: the source plans (a dict to copy, not
# to modify), the target identifier, the user's settings and the dataset's nnUNet_preprocessed folder (for
# dataset.json, sidecar files, splits). It validates and resolves the settings and returns the derived plans.
PlansDeriver = Callable[[dict, str, Mapping[str, Any], str], dict]


def method_plans_deriver(method: str) -> PlansDeriver | None:
    """``nnunet_ext.<method>.configure.derive_plans`` when the method defines one (validation, resolved settings,
    sidecar files), else ``None`` (settings are stored as given by :func:`derive_plans`)."""
    if method not in METHOD_FAMILIES:
        raise ValueError(f"unknown method family {method!r}; expected one of {METHOD_FAMILIES}")
    module_name = f"nnunet_ext.{method}.configure"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name in (module_name, f"nnunet_ext.{method}"):
            return None
        raise
    return module.derive_plans


def write_derived_plans(
    preprocessed_dataset_folder: str,
    source_identifier: str,
    target_identifier: str,
    method: str,
    settings: Mapping[str, Any],
    overwrite: bool = False,
) -> str:
    """Write ``<target_identifier>.json`` next to the source plans; returns its path.

    The method's own :func:`method_plans_deriver` validates and resolves the settings when it exists.

    Raises:
        FileNotFoundError: the source plans do not exist (plan the dataset first).
        FileExistsError: the target exists and ``overwrite`` is False.
        ValueError: source and target identifiers are equal (the source plans are never modified).
    """
    if source_identifier == target_identifier:
        raise ValueError("the derived plans need their own identifier; the source plans are never modified")
    source = os.path.join(preprocessed_dataset_folder, source_identifier + ".json")
    target = os.path.join(preprocessed_dataset_folder, target_identifier + ".json")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"plans file {source} not found; plan the dataset first (nnunet-ext plan)")
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    with open(source) as f:
        plans = json.load(f)
    deriver = method_plans_deriver(method)
    if deriver is None:
        derived = derive_plans(plans, target_identifier, method, settings)
    else:
        derived = deriver(plans, target_identifier, settings, preprocessed_dataset_folder)
    with open(target, "w") as f:
        json.dump(derived, f, indent=4)
    return target
