"""Contrastive distillation with soft negatives (ACTION stages i and ii; ISD lineage).

The student reproduces the teacher's *relative* similarity profile of an embedding to a queue of teacher
embeddings of other images (no positive/negative binary: the paper's "soft labelling of negatives"):

    p_t[b, j] = softmax_j(sim(g_t[b], Q_j) / tau_t),   p_s[b, j] = softmax_j(sim(g_s[b], Q_j) / tau_s),
    L = (1/B) sum_b KL(p_t[b] || p_s[b])                                          (spec 4.2, ISD eq. 1-3)

The local variant applies the same loss to every window of pooled segmentation logits (spec 4.3, "clean form",
fix of official-code issue Q1: per-window vectors instead of arbitrary chunks of a re-chunked tensor).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F


def _check_temperature(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def similarity_kl(q_student: torch.Tensor, q_teacher: torch.Tensor, anchors: torch.Tensor, tau_s: float,
                  tau_t: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of ``KL(p_t || p_s)`` between softmaxed cosine-similarity profiles (computed in fp32).

    Args:
        q_student: ``[N, D]`` student embeddings (receive the gradient).
        q_teacher: ``[N, D]`` teacher embeddings (treated as constants: fix of official-code issue Q4, the KL
            target is detached).
        anchors: ``[K, D]`` queue of past teacher embeddings.
        tau_s: student temperature (0.1).
        tau_t: teacher temperature (0.01: sharp teacher; fix of issue Q5).
        weights: optional ``[N]`` non-negative row weights (0 drops a row, e.g. a window in padding); the result is
            the weighted mean (0 when all weights are 0).

    Returns:
        Scalar fp32 loss, >= 0.
    """
    _check_temperature("tau_s", tau_s)
    _check_temperature("tau_t", tau_t)
    if q_student.ndim != 2 or q_student.shape != q_teacher.shape or anchors.ndim != 2 \
            or anchors.shape[1] != q_student.shape[1]:
        raise ValueError(f"expected student/teacher [N, D] and anchors [K, D]; got {tuple(q_student.shape)}, "
                         f"{tuple(q_teacher.shape)}, {tuple(anchors.shape)}")
    anchors = F.normalize(anchors.detach().float(), dim=1)
    logits_s = F.normalize(q_student.float(), dim=1) @ anchors.T / tau_s
    logits_t = F.normalize(q_teacher.detach().float(), dim=1) @ anchors.T / tau_t
    log_p_t = F.log_softmax(logits_t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(logits_s, dim=1))).sum(1)
    if weights is None:
        return kl.mean()
    weights = weights.detach().float()
    return (kl * weights).sum() / weights.sum().clamp_min(1e-12)


def masked_average_pool(x: torch.Tensor, valid: torch.Tensor | None, kernel: Sequence[int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Average pooling with non-overlapping ``kernel`` that ignores invalid voxels.

    Args:
        x: ``[B, C, *S]`` (2 or 3 spatial axes).
        valid: ``[B, 1, *S]`` bool/float mask (None: all valid).
        kernel: pooling kernel per spatial axis (also the stride); trailing voxels that do not fill a cell are
            dropped, as ``avg_pool`` does.

    Returns:
        ``(pooled [B, C, *G], valid_fraction [B, 1, *G])``; cells without valid voxels are 0.
    """
    pool = {2: F.avg_pool2d, 3: F.avg_pool3d}.get(x.ndim - 2)
    if pool is None or len(kernel) != x.ndim - 2:
        raise ValueError(f"expected [B, C, *S] with 2 or 3 spatial axes and one kernel size per axis; got "
                         f"{tuple(x.shape)} and kernel {tuple(kernel)}")
    kernel = tuple(int(k) for k in kernel)
    if valid is None:
        pooled = pool(x, kernel, kernel)
        return pooled, torch.ones_like(pooled[:, :1])
    valid = valid.to(x.dtype)
    fraction = pool(valid, kernel, kernel)
    pooled = pool(x * valid, kernel, kernel) / fraction.clamp_min(1e-6)
    return pooled, fraction


def unfold_windows(grid: torch.Tensor, cells: Sequence[int], strides: Sequence[int]) -> torch.Tensor:
    """Every window of ``cells`` grid cells at ``strides`` as one flat vector.

    ``[B, C, *G] -> [B, N_w, C * prod(cells)]``; windows in row-major order of their positions, each vector in
    ``(C, *cells)`` order.
    """
    spatial = grid.ndim - 2
    if len(cells) != spatial or len(strides) != spatial:
        raise ValueError(f"need one cell count and stride per spatial axis of {tuple(grid.shape)}")
    out = grid
    for axis, (c, s) in enumerate(zip(cells, strides)):
        if c > grid.shape[2 + axis]:
            raise ValueError(f"window of {c} cells does not fit grid axis {axis} of size {grid.shape[2 + axis]}")
        out = out.unfold(2 + axis, int(c), int(s))
    # [B, C, W_1..W_n, c_1..c_n] -> [B, W_1..W_n, C, c_1..c_n]
    order = [0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial)]
    out = out.permute(order)
    batch, n_windows = out.shape[0], math.prod(out.shape[1:1 + spatial])
    return out.reshape(batch, n_windows, -1)


@dataclass(frozen=True)
class LocalWindowGeometry:
    """How a patch is cut into local windows (spec 4.3 step 7, 11.4).

    Windows of ``cells[d]`` pooled cells with stride ``strides[d]`` on a grid obtained by average pooling with
    ``kernel[d]``. With ``kernel = ceil(patch / (4 s))`` a window spans about a quarter of the patch with
    half-window stride (7 windows per axis when the patch is a multiple of 4 s), which reproduces ACTION's 64/32
    windows on 256^2 up to the inclusive last position. The spec's ``patch // (4 s)`` is rounded up here so that
    patches that are not multiples of 4 s never get more than 7 windows per axis (the cost of the local loss grows
    with the square of the window count). Thin axes (``patch < 2 s``) keep kernel 1 and use fewer cells.
    """

    kernel: tuple[int, ...]
    grid: tuple[int, ...]
    cells: tuple[int, ...]
    strides: tuple[int, ...]

    @classmethod
    def from_patch(cls, patch_size: Sequence[int], cells_per_axis: int) -> LocalWindowGeometry:
        if not isinstance(cells_per_axis, int) or cells_per_axis < 1:
            raise ValueError(f"local cells per axis must be a positive integer, got {cells_per_axis!r}")
        kernel, grid, cells, strides = [], [], [], []
        for p in patch_size:
            k = max(1, math.ceil(int(p) / (4 * cells_per_axis)))
            g = int(p) // k
            c = min(cells_per_axis, g)
            kernel.append(k)
            grid.append(g)
            cells.append(c)
            strides.append(max(1, c // 2))
        return cls(tuple(kernel), tuple(grid), tuple(cells), tuple(strides))

    @property
    def num_windows(self) -> int:
        return math.prod((g - c) // s + 1 for g, c, s in zip(self.grid, self.cells, self.strides))

    def vector_dim(self, channels: int) -> int:
        return channels * math.prod(self.cells)

    def pool(self, logits: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked pooling of full-resolution logits ``[B, C, *patch]`` to the cell grid (see masked_average_pool)."""
        return masked_average_pool(logits, valid, self.kernel)

    def windows(self, grid: torch.Tensor) -> torch.Tensor:
        """``[B, C, *G] -> [B, N_w, C * prod(cells)]``."""
        return unfold_windows(grid, self.cells, self.strides)
