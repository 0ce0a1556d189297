"""Helpers for the CIML tests: small nnU-Net configurations and dataset.json dicts (no files needed)."""
from __future__ import annotations

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

LABELS_DATASET = {"channel_names": {"0": "FLAIR", "1": "T1c"}, "labels": {"background": 0, "oedema": 1, "core": 2},
                  "file_ending": ".nii.gz"}
BRATS_DATASET = {
    "channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"},
    "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
    "regions_class_order": [1, 2, 3], "file_ending": ".nii.gz",
}
THREE_CHANNEL_LABELS = {"channel_names": {"0": "A", "1": "B", "2": "C"},
                        "labels": {"background": 0, "x": 1, "y": 2}, "file_ending": ".nii.gz"}


def configuration(dim: int = 3, patch: int = 16, features: tuple[int, ...] = (4, 8, 8),
                  architecture: str = "PlainConvUNet") -> ConfigurationManager:
    """A tiny plain U-Net configuration as nnU-Net plans store it (instance norm, LeakyReLU, stride-2 stages)."""
    n = len(features)
    conv = f"torch.nn.modules.conv.Conv{dim}d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    kwargs = {"n_stages": n, "features_per_stage": list(features), "conv_op": conv,
              "kernel_sizes": [[3] * dim] * n, "strides": [[1] * dim] + [[2] * dim] * (n - 1),
              "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True, "norm_op": norm,
              "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    if architecture == "PlainConvUNet":
        kwargs["n_conv_per_stage"] = [1] * n
    else:
        kwargs["n_blocks_per_stage"] = [1] * n
    return ConfigurationManager({
        "patch_size": [patch] * dim,
        "architecture": {"network_class_name": f"dynamic_network_architectures.architectures.unet.{architecture}",
                         "arch_kwargs": kwargs,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
    })


@pytest.fixture(autouse=True)
def single_torch_thread():
    """One intra-op thread: tiny networks run ~10x faster that way on the shared 2-core machine (use with
    ``from ciml_testing import single_torch_thread  # noqa: F401``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
