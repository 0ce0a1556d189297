"""Experiment planners that size patch and batch for CIML's extra encoders, decoders and messages.

nnU-Net fits patch and batch size to a GPU memory target with ``static_estimate_VRAM_usage``, a feature-map-size
proxy of the plain U-Net. CIML runs one encoder per modality, one decoder per subtask and message tensors at
every message stage, so the plain estimate is several times too low. These planners return the proxy of the
``CIMLNet`` that the trainer builds with the automatic default decomposition (one subtask, every other modality
an auxiliary sender, messages at all stages but the first), which is the heaviest layout for a given dataset
apart from one decoder per output; nnU-Net's own shrinking loop then does the rest.

Use through ``nnunet-ext plan -d D -pl CIMLPlanner`` (GPU, plans ``nnUNetCIMLPlans``) or ``-pl CIMLCPUPlanner``
(CPU caps of :class:`CPUPlanner`, plans ``nnUNetCIMLCPUPlans``), then train with ``-p`` set to that identifier
(optionally after ``nnunet-ext configure ciml -p nnUNetCIMLPlans``).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_ext.ciml.decomposition import MessageConfig, automatic_resolution, validate_resolved
from nnunet_ext.ciml.network import CIMLNet, resolve_arch_kwargs
from nnunet_ext_planners.cpu_planner import CPUPlanner


def ciml_feature_map_size(patch_size: tuple[int, ...], input_channels: int, output_channels: int,
                          arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import: tuple[str, ...]) -> float:
    """nnU-Net's memory proxy (feature-map voxels) for the automatic-default ``CIMLNet`` of this plan."""
    configuration = SimpleNamespace(network_arch_class_name=arch_class_name, network_arch_init_kwargs=arch_kwargs,
                                    network_arch_init_kwargs_req_import=arch_kwargs_req_import)
    encoder_class, encoder_kwargs, decoder_n_conv = resolve_arch_kwargs(configuration)
    subtasks = validate_resolved(automatic_resolution(input_channels, output_channels), input_channels,
                                 output_channels)
    net = CIMLNet(encoder_kwargs, decoder_n_conv, input_channels, subtasks, MessageConfig(), "direct",
                  output_channels, deep_supervision=True, encoder_class=encoder_class)
    return float(net.compute_conv_feature_map_size(patch_size))


class CIMLPlanner(ExperimentPlanner):
    """nnU-Net's default planner with the CIML memory proxy (see the module docstring)."""

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnUNetCIMLPlans",
                 overwrite_target_spacing: list[float] | tuple[float, ...] | None = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)

    @staticmethod
    def static_estimate_VRAM_usage(patch_size: tuple[int, ...], input_channels: int, output_channels: int,
                                   arch_class_name: str, arch_kwargs: dict,
                                   arch_kwargs_req_import: tuple[str, ...]) -> float:
        return ciml_feature_map_size(patch_size, input_channels, output_channels, arch_class_name, arch_kwargs,
                                     arch_kwargs_req_import)


class CIMLCPUPlanner(CPUPlanner):
    """:class:`CPUPlanner`'s width, patch and batch caps with the CIML memory proxy (plans ``nnUNetCIMLCPUPlans``)."""

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnUNetCIMLCPUPlans",
                 overwrite_target_spacing: list[float] | tuple[float, ...] | None = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)

    @classmethod
    def static_estimate_VRAM_usage(cls, patch_size: tuple[int, ...], input_channels: int, output_channels: int,
                                   arch_class_name: str, arch_kwargs: dict,
                                   arch_kwargs_req_import: tuple[str, ...]) -> float:
        budget = cls.max_patch_voxels_3d if len(patch_size) == 3 else cls.max_patch_voxels_2d
        if np.prod(patch_size, dtype=np.int64) > budget:
            return math.inf
        return ciml_feature_map_size(patch_size, input_channels, output_channels, arch_class_name, arch_kwargs,
                                     arch_kwargs_req_import)
