"""``nnunet_ext.planning.plan_dataset`` / ``nnunet-ext plan``: options that reach nnU-Net's planner."""
from __future__ import annotations

import json

import pytest
from helpers_nnunet import extract_fingerprint, make_tiny_dataset, set_nnunet_paths

from nnunet_ext.planning import plan_dataset


@pytest.mark.parametrize("spacing", [(1.0, 2.0), (1.0, 0.0, 2.0), (2.0, -1.0, 2.0)])
def test_bad_target_spacing_is_refused_before_planning(tmp_path, monkeypatch, spacing):
    set_nnunet_paths(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match="three positive spacings"):
        plan_dataset(991, overwrite_target_spacing=spacing)


def test_target_spacing_sets_2d_and_3d_spacing_under_its_own_plans_name(tmp_path, monkeypatch):
    folders = set_nnunet_paths(monkeypatch, tmp_path)
    make_tiny_dataset(folders["nnUNet_raw"], dataset_id=991, name="Spacing", n_labelled=3, n_unlabeled=0,
                      shape=(20, 24, 28))
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    extract_fingerprint(991)  # plan_dataset reuses it
    # isotropic, so nnU-Net's axis transposition cannot change the expected values
    identifier = plan_dataset(991, "CPUPlanner", num_processes=1, preprocess=False, verify_dataset_integrity=False,
                              overwrite_target_spacing=(2.0, 2.0, 2.0), overwrite_plans_name="nnUNetCPUPlans_2mm")
    assert identifier == "nnUNetCPUPlans_2mm"
    folder = folders["nnUNet_preprocessed"] / "Dataset991_Spacing"
    plans = json.loads((folder / "nnUNetCPUPlans_2mm.json").read_text())["configurations"]
    assert plans["3d_fullres"]["spacing"] == [2.0, 2.0, 2.0]
    assert plans["2d"]["spacing"] == [2.0, 2.0]
    assert not (folder / "nnUNetCPUPlans.json").exists()  # the default plans are not written
