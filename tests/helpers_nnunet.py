"""Plain helper functions for tests that need nnU-Net folders and a tiny synthetic dataset.

Not a conftest: import it explicitly (``tests/`` must be on ``sys.path``). Everything here is deterministic and
CPU-only.

How nnU-Net reads its folders (nnunetv2 2.8.1): ``nnunetv2.paths.nnUNet_raw`` / ``nnUNet_preprocessed`` /
``nnUNet_results`` are ``_EnvPath`` objects that look ``os.environ`` up on *every* use (``os.fspath``, ``str``,
``bool``), so ``monkeypatch.setenv`` is enough, also for modules that did ``from nnunetv2.paths import ...``.
What *is* frozen at import time is ``nnunetv2.configuration``: ``default_num_processes`` (``nnUNet_def_n_proc``)
and ``default_n_proc_DA``. Code under test should call ``get_allowed_n_proc_DA()`` at run time instead.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

NNUNET_FOLDER_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def set_nnunet_paths(monkeypatch: pytest.MonkeyPatch, root: str | os.PathLike,
                     n_proc_da: int | None = None) -> dict[str, Path]:
    """Point nnU-Net's three folders at sub-folders of ``root`` (created if missing).

    Also sets ``nnUNet_compile=f`` and ``nnUNet_def_n_proc=1``. ``n_proc_da`` sets ``nnUNet_n_proc_DA``; leave it
    ``None`` while planning (2.8.1 planning calls ``torch.set_num_threads(get_allowed_n_proc_DA())``, which
    fails for 0) and pass 0 for training/loading tests.

    Args:
        monkeypatch: pytest's monkeypatch (function scope) or a ``pytest.MonkeyPatch()`` context.
        root: folder that receives ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``.
        n_proc_da: value for ``nnUNet_n_proc_DA`` or ``None`` to leave it unset.

    Returns:
        Mapping from variable name to the folder it now points at.
    """
    folders = {}
    for var in NNUNET_FOLDER_VARS:
        folder = Path(root) / var
        folder.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(folder))
        folders[var] = folder
    monkeypatch.setenv("nnUNet_compile", "f")
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    if n_proc_da is None:
        monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    else:
        monkeypatch.setenv("nnUNet_n_proc_DA", str(n_proc_da))
    return folders


def _write_nifti(array_zyx: np.ndarray, path: Path, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(image, str(path))


def _synthetic_case(rng: np.random.Generator, shape: Sequence[int], n_channels: int,
                    zero_border: int) -> tuple[list[np.ndarray], np.ndarray]:
    """One noisy multi-channel image with two labelled blobs. Shapes: images ``[*shape]`` each, seg ``[*shape]``."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=0)
    seg = np.zeros(shape, dtype=np.uint8)
    for label in (1, 2):
        centre = np.array([rng.integers(4, s - 4) for s in shape]).reshape(-1, 1, 1, 1)
        radius = rng.uniform(2.5, 4.0)
        seg[np.sqrt(((grid - centre) ** 2).sum(0)) < radius] = label
    images = []
    for c in range(n_channels):
        # channel 0 looks like CT (HU-like integers), the others like MRI (positive floats)
        if c == 0:
            img = rng.normal(-100.0, 30.0, shape) + 150.0 * (seg == 1) + 300.0 * (seg == 2)
            img = np.round(img).astype(np.int16)
        else:
            img = (rng.normal(100.0, 10.0, shape) + 40.0 * c * (seg > 0)).astype(np.float32)
        if zero_border:
            img[:zero_border] = 0
        images.append(img)
    if zero_border:
        seg[:zero_border] = 0
    return images, seg


def make_tiny_dataset(raw_root: str | os.PathLike, dataset_id: int = 990, name: str = "Tiny",
                      n_labelled: int = 6, n_unlabeled: int = 3, shape: Sequence[int] = (20, 24, 28),
                      n_channels: int = 2, copy_labelled_to_unlabeled: dict[str, str] | None = None,
                      seed: int = 0) -> Path:
    """Write a tiny 3D raw nnU-Net dataset (labels ``background``, ``a``, ``b``) with an ``imagesUnlabeled`` folder.

    Labelled cases are ``tr_000 ...`` (the first two get a 2-voxel zero border so cropping to non-zero has
    something to do), unlabeled cases ``unl_000 ...``. Spacing is 1 mm, files are ``.nii.gz``; channel 0 is
    named ``CT`` (CT normalisation with dataset statistics), the others ``MRI`` (z-score).

    Args:
        raw_root: the ``nnUNet_raw`` folder.
        dataset_id: three-digit dataset ID.
        name: dataset name suffix.
        n_labelled: number of cases in ``imagesTr``/``labelsTr``.
        n_unlabeled: number of synthetic cases in ``imagesUnlabeled`` (0 creates no folder unless
            ``copy_labelled_to_unlabeled`` is given).
        shape: image shape in numpy (z, y, x) order.
        n_channels: channels per case.
        copy_labelled_to_unlabeled: ``{labelled_case: new_unlabeled_case}``; copies the labelled images
            byte-for-byte into ``imagesUnlabeled`` under the new name.
        seed: random seed.

    Returns:
        The raw dataset folder ``<raw_root>/DatasetXXX_<name>``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    ending = ".nii.gz"
    for i in range(n_labelled):
        images, seg = _synthetic_case(rng, shape, n_channels, zero_border=2 if i < 2 else 0)
        for c, img in enumerate(images):
            _write_nifti(img, folder / "imagesTr" / f"tr_{i:03d}_{c:04d}{ending}")
        _write_nifti(seg, folder / "labelsTr" / f"tr_{i:03d}{ending}")
    if n_unlabeled or copy_labelled_to_unlabeled:
        (folder / "imagesUnlabeled").mkdir(exist_ok=True)
    for i in range(n_unlabeled):
        images, _ = _synthetic_case(rng, shape, n_channels, zero_border=0)
        for c, img in enumerate(images):
            _write_nifti(img, folder / "imagesUnlabeled" / f"unl_{i:03d}_{c:04d}{ending}")
    for source, target in (copy_labelled_to_unlabeled or {}).items():
        for c in range(n_channels):
            data = (folder / "imagesTr" / f"{source}_{c:04d}{ending}").read_bytes()
            (folder / "imagesUnlabeled" / f"{target}_{c:04d}{ending}").write_bytes(data)
    channel_names = {str(c): ("CT" if c == 0 else "MRI") for c in range(n_channels)}
    dataset_json = {
        "channel_names": channel_names,
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": n_labelled,
        "file_ending": ending,
        "name": name,
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


def extract_fingerprint(dataset_id: int, fast: bool = True) -> None:
    """nnU-Net's dataset fingerprint with one process; ``fast`` samples 1e5 instead of 1e8 foreground voxels.

    nnU-Net's extractor samples a fixed 1e8 voxels in total *with replacement*, whatever the dataset size, which
    costs ~20 s even for six tiny cases; the statistics stay representative for the tiny test datasets.
    """
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    class _FastFingerprintExtractor(DatasetFingerprintExtractor):
        # only the number of samples changes; the worker function (a static method of the base) is what is pickled
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = 1e5

    extractor = _FastFingerprintExtractor if fast else DatasetFingerprintExtractor
    extract_fingerprint_dataset(dataset_id, extractor, num_processes=1, check_dataset_integrity=False, clean=True,
                                verbose=False, show_progress_bar=False)


def plan_and_preprocess(dataset_id: int, configurations: Sequence[str] = ("3d_fullres",),
                        plans_identifier: str = "nnUNetPlans", fast_fingerprint: bool = True) -> None:
    """Fingerprint, plan and preprocess through nnU-Net's Python API with one process.

    The nnU-Net folder variables must already be set. ``nnUNet_n_proc_DA`` is forced to 1 for the duration (0
    breaks 2.8.1 planning, see :func:`set_nnunet_paths`).

    Args:
        dataset_id: dataset ID in ``nnUNet_raw``.
        configurations: configurations whose labelled data is preprocessed (all are planned anyway).
        plans_identifier: plans to preprocess with.
        fast_fingerprint: the fast fingerprint of :func:`extract_fingerprint`.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset, preprocess_dataset

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_n_proc_DA", "1")
        extract_fingerprint(dataset_id, fast_fingerprint)
        plan_experiment_dataset(dataset_id)
        preprocess_dataset(dataset_id, plans_identifier, tuple(configurations), [1] * len(configurations),
                           verbose=False, show_progress_bar=False)


def hash_tree(folder: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every file below ``folder``, keyed by relative path (to prove a tree was not modified)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


_PLANNED_ROOTS: dict[tuple, Path] = {}


def planned_tiny_root(base_dir: str | os.PathLike, dataset_id: int = 990,
                      configurations: Sequence[str] = ("3d_fullres",), **dataset_kwargs) -> Path:
    """Build (once per process and argument set) a tiny dataset and plan + preprocess it.

    Meant for session-scoped fixtures: pass ``tmp_path_factory.getbasetemp()``. The result is shared, so treat
    it as read-only and :func:`clone_root` it before writing. Environment variables are restored afterwards.

    Args:
        base_dir: where the root folder is created.
        dataset_id: dataset ID.
        configurations: configurations whose labelled data is preprocessed.
        **dataset_kwargs: forwarded to :func:`make_tiny_dataset`.

    Returns:
        The root folder holding ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results``.
    """
    key = (str(base_dir), dataset_id, tuple(configurations), json.dumps(dataset_kwargs, sort_keys=True))
    if key not in _PLANNED_ROOTS:
        root = Path(base_dir) / f"planned_{dataset_id}_{len(_PLANNED_ROOTS)}"
        with pytest.MonkeyPatch.context() as mp:
            folders = set_nnunet_paths(mp, root)
            make_tiny_dataset(folders["nnUNet_raw"], dataset_id=dataset_id, **dataset_kwargs)
            plan_and_preprocess(dataset_id, configurations)
        _PLANNED_ROOTS[key] = root
    return _PLANNED_ROOTS[key]


def clone_root(source_root: str | os.PathLike, target_root: str | os.PathLike) -> Path:
    """Copy a root made by :func:`planned_tiny_root` (tiny files, fast) so a test can modify it freely."""
    import shutil

    shutil.copytree(source_root, target_root, dirs_exist_ok=True)
    return Path(target_root)


def benchmark_settings_from_command_line(monkeypatch: pytest.MonkeyPatch, arguments: Sequence[str]):
    """The ``BenchmarkSettings`` that ``nnunet-ext benchmark ARGUMENTS`` builds, with the benchmark itself faked
    (it only writes the report the command prints)."""
    import argparse

    from nnunet_ext.benchmark import commands, runner

    seen = {}

    def fake_benchmark(settings):
        seen["settings"] = settings
        (settings.output / "report.md").parent.mkdir(parents=True, exist_ok=True)
        (settings.output / "report.md").write_text("report")
        return {"runs": []}

    monkeypatch.setattr(runner, "run_benchmark", fake_benchmark)
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["benchmark", *arguments])
    assert args.func(args) == 0
    return seen["settings"]
