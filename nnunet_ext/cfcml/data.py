"""Whole-case classification inputs: a preprocessed case cropped/padded to the patch size.

CFCML's token compression has weights per spatial position, so the classification path sees exactly one patch
per case. Training draws nnU-Net's random (augmented) patches; validation and ``predict-cls`` take the patch at
the centre of the image (``crop="center"``) or of the foreground bounding box (``crop="lesion"``, training-time
validation only, where the segmentation exists). Both use :func:`crop_or_pad_to_patch`, so training-time
validation and ``predict-cls`` see identical inputs.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def crop_or_pad_to_patch(data: np.ndarray, patch_size: Sequence[int],
                         centre: Sequence[float] | None = None) -> np.ndarray:
    """Crop/zero-pad a preprocessed case ``[C, *spatial]`` to ``[C, *patch]`` around ``centre``.

    For a 2D configuration the preprocessed case is ``[C, Z, Y, X]`` with ``len(patch_size) == 2``: the middle
    slice is used (``Z == 1`` for natural 2D images).

    Args:
        data: preprocessed image, ``[C, *spatial]`` (3D spatial, or 2D).
        patch_size: the plans' patch size.
        centre: voxel coordinates of the patch centre in ``data``'s spatial axes (default: the image centre).

    Returns:
        ``[C, *patch_size]`` float32; outside the image is 0 (nnU-Net's padding value for normalised images).
    """
    patch = tuple(int(p) for p in patch_size)
    if data.ndim == len(patch) + 2:  # 2D configuration on a [C, Z, Y, X] case
        if centre is not None and len(centre) == len(patch) + 1:
            z, centre = int(round(centre[0])), centre[1:]
        else:
            z = data.shape[1] // 2
        data = data[:, z]
    if data.ndim != len(patch) + 1:
        raise ValueError(f"case of shape {data.shape} does not fit a patch of size {patch}")
    spatial = data.shape[1:]
    centre = [s / 2.0 for s in spatial] if centre is None else list(centre)
    out = np.zeros((data.shape[0], *patch), dtype=np.float32)
    src, dst = [slice(None)], [slice(None)]
    for size, p, c in zip(spatial, patch, centre):
        start = int(round(c - p / 2.0))
        lo, hi = max(start, 0), min(start + p, size)
        if hi <= lo:  # centre far outside: fall back to the image centre along this axis
            start = int(round(size / 2.0 - p / 2.0))
            lo, hi = max(start, 0), min(start + p, size)
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = data[tuple(src)]
    return out


def foreground_centre(seg: np.ndarray) -> list[float] | None:
    """Centre of the bounding box of ``seg > 0`` (``[1, *spatial]`` or ``[*spatial]``), or None if empty."""
    mask = seg[0] > 0 if seg.ndim > 1 and seg.shape[0] == 1 else seg > 0
    coords = np.argwhere(mask)
    if coords.size == 0:
        return None
    return [(lo + hi) / 2.0 for lo, hi in zip(coords.min(0), coords.max(0) + 1)]
