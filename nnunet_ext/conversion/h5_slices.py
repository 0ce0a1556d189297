"""Rebuilding 3D volumes from SSL4MIS's 2D slice files (``data/slices/<case>_slice_<k>.h5``).

SSL4MIS distributes the ACDC training frames only as 2D slices: ``<case>_slice_<k>.h5`` holds ``image`` and
``label`` of slice ``k`` (0-based, the first axis of the z, y, x volume written with ``sitk.GetArrayFromImage``).
Stacking the slices in index order gives the volume back; a missing index is an error because the volume would
silently lose a slice.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from nnunet_ext.conversion.common import ConversionError, warn
from nnunet_ext.conversion.volumes import VolumeCase

SLICE_FILE = re.compile(r"^(?P<case>.+)_slice_(?P<index>\d+)\.h5$")


def find_slice_stacks(folder: Path) -> dict[str, dict[int, Path]]:
    """Case -> {slice index: file} of every ``<case>_slice_<k>.h5`` in ``folder`` (empty if it does not exist)."""
    stacks: dict[str, dict[int, Path]] = {}
    if not folder.is_dir():
        return stacks
    for path in sorted(folder.glob("*.h5")):
        match = SLICE_FILE.match(path.name)
        if match:
            stacks.setdefault(match["case"], {})[int(match["index"])] = path
    return stacks


def check_contiguous(case_id: str, slices: Mapping[int, Path]) -> list[Path]:
    """The slice files in index order; raises if an index between the first and the last is missing."""
    indexes = sorted(slices)
    missing = sorted(set(range(indexes[0], indexes[-1] + 1)) - set(indexes))
    if missing:
        folder = slices[indexes[0]].parent
        raise ConversionError(f"case {case_id}: slice file(s) {[f'{case_id}_slice_{i}.h5' for i in missing[:5]]} "
                              f"are missing in {folder} (found slices {indexes[0]}..{indexes[-1]}); the volume "
                              f"cannot be rebuilt")
    if indexes[0] != 0:  # SSL4MIS numbers slices from 0: a stack starting later has probably lost its first ones
        warn(f"case {case_id}: the first slice file is {case_id}_slice_{indexes[0]}.h5 (not _slice_0); the rebuilt "
             f"volume starts there")
    return [slices[i] for i in indexes]


def slice_stack_case(case_id: str, slices: Mapping[int, Path], spacing: tuple[float, float, float],
                     image_key: str = "image", label_key: str = "label") -> VolumeCase:
    """A :class:`VolumeCase` whose z, y, x volume is the stack of the 2D slice files (slice index = z)."""
    from nnunet_ext.conversion.hdf5 import _require_h5py, _to_sitk, h5_dataset_names

    h5py = _require_h5py()
    files = check_contiguous(case_id, slices)
    with_label = [label_key in h5_dataset_names(path, image_key) for path in files]
    if any(with_label) and not all(with_label):
        raise ConversionError(f"case {case_id}: only some slice files have a '{label_key}' dataset")
    where = f"{files[0].parent}/{case_id}_slice_*.h5"

    def stack(key: str) -> np.ndarray:
        planes = []
        for path in files:
            with h5py.File(path, "r") as f:
                plane = f[key][()]
            if plane.ndim != 2 or (planes and plane.shape != planes[0].shape):
                raise ConversionError(f"{path}: dataset '{key}' has shape {plane.shape}; every slice of case "
                                      f"{case_id} must be 2D with the shape {planes[0].shape if planes else '(y, x)'}")
            planes.append(plane)
        return np.stack(planes)  # slice index -> z: z, y, x like the SSL4MIS volumes

    def load(label_wanted: bool):
        image = _to_sitk(stack(image_key), "zyx", spacing, where, image_key)
        label = _to_sitk(stack(label_key), "zyx", spacing, where, label_key) if label_wanted else None
        return [image], label

    return VolumeCase(case_id, where, loader=load, has_label=all(with_label))
