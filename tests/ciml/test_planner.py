"""CIML planners: the memory proxy counts the extra encoders/messages, so planning shrinks patch or batch."""
from __future__ import annotations

import json

import pytest
from ciml_testing import single_torch_thread  # noqa: F401
from helpers_nnunet import make_tiny_dataset, plan_and_preprocess, set_nnunet_paths
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_ext.planning import find_planner_class
from nnunet_ext_planners.ciml_planner import CIMLCPUPlanner, CIMLPlanner, ciml_feature_map_size

ARCH = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
KWARGS = {"n_stages": 4, "features_per_stage": [32, 64, 128, 256], "conv_op": "torch.nn.modules.conv.Conv3d",
          "kernel_sizes": [[3, 3, 3]] * 4, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3, "n_conv_per_stage": [2] * 4,
          "n_conv_per_stage_decoder": [2] * 3, "conv_bias": True,
          "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
          "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
          "nonlin_kwargs": {"inplace": True}}
REQ = ("conv_op", "norm_op", "dropout_op", "nonlin")


@pytest.mark.parametrize("channels", [2, 4])
def test_ciml_estimate_exceeds_the_plain_unet_and_grows_with_modalities(channels):
    patch = (64, 64, 64)
    plain = ExperimentPlanner.static_estimate_VRAM_usage(patch, channels, 3, ARCH, KWARGS, REQ)
    ciml = CIMLPlanner.static_estimate_VRAM_usage(patch, channels, 3, ARCH, KWARGS, REQ)
    # M encoders at least: the plain encoder (about half of the plain estimate) repeated per modality
    assert ciml > plain * (1 + 0.5 * (channels - 1))
    assert ciml_feature_map_size(patch, channels + 1, 3, ARCH, KWARGS, REQ) > ciml


def test_cpu_variant_keeps_the_voxel_budget():
    too_big = (64, 64, 64)
    assert CIMLCPUPlanner.static_estimate_VRAM_usage(too_big, 2, 3, ARCH, KWARGS, REQ) == float("inf")
    small = (32, 32, 32)
    assert CIMLCPUPlanner.static_estimate_VRAM_usage(small, 2, 3, ARCH, KWARGS, REQ) == \
        CIMLPlanner.static_estimate_VRAM_usage(small, 2, 3, ARCH, KWARGS, REQ)


def test_planners_are_found_by_name():
    assert find_planner_class("CIMLPlanner").__name__ == "CIMLPlanner"
    assert find_planner_class("CIMLCPUPlanner").__name__ == "CIMLCPUPlanner"


def test_planning_with_a_small_memory_target_gives_a_smaller_patch_than_stock(tmp_path, monkeypatch):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

    folders = set_nnunet_paths(monkeypatch, tmp_path)
    make_tiny_dataset(folders["nnUNet_raw"], dataset_id=983, name="CimlPlan", n_labelled=3, n_unlabeled=0,
                      shape=(48, 56, 64))
    plan_and_preprocess(983, configurations=())  # fingerprint + stock plans (nnUNetPlans)
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    plan_experiment_dataset(983, CIMLPlanner, gpu_memory_target_in_gb=0.5)
    plan_experiment_dataset(983, ExperimentPlanner, gpu_memory_target_in_gb=0.5,
                            overwrite_plans_name="nnUNetPlansSmall")
    folder = folders["nnUNet_preprocessed"] / "Dataset983_CimlPlan"
    ciml = json.loads((folder / "nnUNetCIMLPlans.json").read_text())["configurations"]["3d_fullres"]
    stock = json.loads((folder / "nnUNetPlansSmall.json").read_text())["configurations"]["3d_fullres"]
    ciml_voxels = ciml["batch_size"] * ciml["patch_size"][0] * ciml["patch_size"][1] * ciml["patch_size"][2]
    stock_voxels = stock["batch_size"] * stock["patch_size"][0] * stock["patch_size"][1] * stock["patch_size"][2]
    assert ciml_voxels < stock_voxels
