"""Experiment planner for training nnU-Net on a CPU (tests, demos, laptops).

nnU-Net's default planner sizes patch and batch to fill a GPU memory target. On two CPU cores the default
network (32 to 320 features) needs 2.6 s for one training iteration on a 56x64x48 patch, so even a smoke run
takes minutes. :class:`CPUPlanner` keeps nnU-Net's planning logic (spacing, transposition, normalisation, topology,
patch-shape reduction) and only caps three things: network width, patch voxels and batch size.

Use it through ``nnunet-ext plan -d D`` or :func:`nnunet_ext.planning.plan_dataset`; nnU-Net's own ``-pl`` only
finds planners inside the installed ``nnunetv2`` tree. Training then uses the stock command::

    nnUNetv2_train D 3d_fullres 0 -p nnUNetCPUPlans -device cpu
"""
from __future__ import annotations

import math

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner


class CPUPlanner(ExperimentPlanner):
    """nnU-Net's default planner with width, patch and batch caps sized for under a second per iteration.

    The caps were chosen by timing stock ``nnUNetTrainer`` iterations on two CPU cores (torch 2.14, nnunetv2
    2.8.1, ``nnUNet_n_proc_DA=0`` so augmentation runs in the main process, ``OMP_NUM_THREADS=2``), median wall
    time per iteration including data loading:

    ==========================  ===================  =====  ================  ===========
    dataset                     configuration        batch  patch             s/iteration
    ==========================  ===================  =====  ================  ===========
    BraTS 240x240x155, 2 ch.    3d_fullres           2      56x64x48          0.69
    Hippocampus ~36x50x35       3d_fullres           2      40x56x40          0.36
    BraTS, 2 channels           2d                   12     128x128           0.48
    ==========================  ===================  =====  ================  ===========

    nnU-Net's default widths (32 to 320 features) take 2.6 s on the same BraTS 3D patch. The 3D caps leave
    headroom below one second for trainers that run several networks per step. Override the class attributes
    in a subclass to trade speed for capacity.

    Attributes:
        base_num_features: Features of the first stage; each further stage doubles them (nnU-Net default: 32).
        max_features_3d: Upper bound on features per stage of 3D networks (nnU-Net default: 320).
        max_features_2d: Upper bound on features per stage of 2D networks (nnU-Net default: 512).
        max_patch_voxels_3d: Largest 3D patch in voxels (48x64x64). Larger patches are shrunk by nnU-Net's own
            reduction loop, which keeps the aspect ratio close to the median image shape and every axis divisible
            by the pooling factors.
        max_patch_voxels_2d: Largest 2D patch in pixels (128x128).
        max_batch_size_3d: Upper bound on the 3D batch size. nnU-Net's lower bound of 2 still applies.
        max_batch_size_2d: Upper bound on the 2D batch size: nnU-Net's reference 2D batch, since a 2D batch of
            two would take only 0.1 s and give very noisy gradients.
    """

    base_num_features: int = 16
    max_features_3d: int = 128
    max_features_2d: int = 256
    max_patch_voxels_3d: int = 48 * 64 * 64
    max_patch_voxels_2d: int = 128 * 128
    max_batch_size_3d: int = 2
    max_batch_size_2d: int = 12

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "nnUNetCPUPlans",
                 overwrite_target_spacing: list[float] | tuple[float, ...] | None = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        # The base class sets these as instance attributes in __init__, so they can only be changed afterwards.
        self.UNet_base_num_features = self.base_num_features
        self.UNet_max_features_3d = self.max_features_3d
        self.UNet_max_features_2d = self.max_features_2d

    @classmethod
    def static_estimate_VRAM_usage(cls, patch_size: tuple[int, ...], input_channels: int, output_channels: int,
                                   arch_class_name: str, arch_kwargs: dict,
                                   arch_kwargs_req_import: tuple[str, ...]) -> float:
        """nnU-Net's memory estimate, infinite for patches above the voxel budget.

        ``get_plans_for_configuration`` shrinks the patch for as long as the estimate exceeds its reference, so an
        infinite estimate makes nnU-Net's own reduction loop enforce the budget. A classmethod (instead of the base
        class's staticmethod) so that subclasses can change the budget through class attributes; it is still
        called with the same arguments.
        """
        budget = cls.max_patch_voxels_3d if len(patch_size) == 3 else cls.max_patch_voxels_2d
        if np.prod(patch_size, dtype=np.int64) > budget:
            return math.inf
        return ExperimentPlanner.static_estimate_VRAM_usage(patch_size, input_channels, output_channels,
                                                            arch_class_name, arch_kwargs, arch_kwargs_req_import)

    def get_plans_for_configuration(self, spacing: np.ndarray | tuple[float, ...] | list[float],
                                    median_shape: np.ndarray | tuple[int, ...], data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        """Plans one configuration like nnU-Net, then caps the batch size.

        Without the cap, the narrow network's small memory estimate would let nnU-Net raise the batch size up to
        5 % of the dataset, which costs CPU time linearly.
        """
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        max_batch_size = self.max_batch_size_3d if len(spacing) == 3 else self.max_batch_size_2d
        plan["batch_size"] = min(plan["batch_size"], max_batch_size)
        return plan
