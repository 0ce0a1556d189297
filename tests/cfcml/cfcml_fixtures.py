"""Planned tiny 2D classification datasets shared by the CFCML integration tests (built once per session).

Not a conftest (a folder's own ``conftest.py`` would be one more module named ``conftest``): test modules define
their fixtures with :func:`writable_planned_root`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cfcml_data import write_classification_dataset
from helpers_nnunet import set_nnunet_paths

PLANS = "nnUNetCPUPlans"
_ROOTS: dict[tuple, Path] = {}


def plan_2d_with_cpu_planner(dataset_id: int) -> None:
    """Fingerprint (1e5 sampled voxels instead of nnU-Net's fixed 1e8), plan with CPUPlanner, preprocess 2d."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    from nnunet_ext_planners.cpu_planner import CPUPlanner

    class FastFingerprintExtractor(DatasetFingerprintExtractor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = 1e5

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_n_proc_DA", "1")
        extract_fingerprint_dataset(dataset_id, FastFingerprintExtractor, num_processes=1,
                                    check_dataset_integrity=False, clean=True, verbose=False)
        plan_experiment_dataset(dataset_id, CPUPlanner)
        preprocess_dataset(dataset_id, PLANS, ("2d",), [1], verbose=False)


def planned_classification_root(base: Path, dataset_id: int, masks: bool) -> Path:
    key = (str(base), dataset_id, masks)
    if key not in _ROOTS:
        root = base / f"cfcml_{dataset_id}_{'masks' if masks else 'roi'}"
        with pytest.MonkeyPatch.context() as mp:
            folders = set_nnunet_paths(mp, root)
            write_classification_dataset(folders["nnUNet_raw"], dataset_id, masks=masks)
            plan_2d_with_cpu_planner(dataset_id)
        _ROOTS[key] = root
    return _ROOTS[key]


def writable_planned_root(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch, masks: bool = True) -> Path:
    """A writable copy of planned dataset 801 (lesion masks) or 802 (mask-free, label map all "roi");
    nnU-Net's variables point at it (``nnUNet_n_proc_DA=0``). Call it from a module-level fixture."""
    dataset_id = 801 if masks else 802
    source = planned_classification_root(tmp_path_factory.getbasetemp(), dataset_id, masks=masks)
    root = Path(shutil.copytree(source, tmp_path / "root"))
    set_nnunet_paths(monkeypatch, root, n_proc_da=0)
    return root
