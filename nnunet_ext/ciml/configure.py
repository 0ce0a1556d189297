"""``nnunet-ext configure ciml``: validate a task decomposition and store it, resolved, in derived plans.

Called by :func:`nnunet_ext.plans.write_derived_plans`. The settings file may name a preset (``{"preset":
"brats"}``), declare ``subtasks`` and set hyper-parameters; an empty file (or no ``--config``) stores the automatic
default. See :mod:`nnunet_ext.ciml.decomposition` for the format.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from typing import Any

from nnunet_ext.ciml.decomposition import MessageConfig, resolve_settings
from nnunet_ext.plans import derive_plans as derive_method_plans


def derive_plans(plans: dict, target_identifier: str, settings: Mapping[str, Any],
                 preprocessed_dataset_folder: str) -> dict:
    """Derived plans named ``target_identifier`` carrying the resolved CIML block.

    Raises:
        FileNotFoundError: ``dataset.json`` is missing from the preprocessed dataset folder.
        ValueError: the decomposition names a modality or label the dataset lacks, or is otherwise invalid (the
            message names the subtask and the offending entry).
    """
    dataset_json_file = os.path.join(preprocessed_dataset_folder, "dataset.json")
    if not os.path.isfile(dataset_json_file):
        raise FileNotFoundError(f"{dataset_json_file} not found; plan and preprocess the dataset first")
    with open(dataset_json_file) as f:
        dataset_json = json.load(f)
    block = resolve_settings(settings, dataset_json, where="the CIML settings file")
    check_message_stages(block, plans)
    return derive_method_plans(plans, target_identifier, "ciml", block)


def check_message_stages(block: Mapping[str, Any], plans: dict) -> None:
    """Every configuration's network must have the encoder stages ``message_stages`` names.

    The network applies the same check when it is built (:meth:`MessageConfig.stage_indices`); doing it here
    stops ``configure`` instead of the first training run.

    Raises:
        ValueError: naming the configuration, its stages and the stage indices it lacks.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    messages = MessageConfig.from_settings(block)
    if not messages.enabled:
        return
    plans_manager = PlansManager(copy.deepcopy(plans))
    for name in plans_manager.available_configurations:
        num_stages = plans_manager.get_configuration(name).network_arch_init_kwargs.get("n_stages")
        if isinstance(num_stages, int):  # architectures without n_stages are refused when the network is built
            try:
                messages.stage_indices(num_stages)
            except ValueError as error:
                raise ValueError(f"configuration {name!r}: {error}") from None
