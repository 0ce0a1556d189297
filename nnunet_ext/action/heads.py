"""Projection, predictor and representation heads of ACTION (all outside the inference network).

Shapes use ``B`` for the batch, ``C`` for channels and ``*S`` for 2 or 3 spatial axes. The original heads are
two linear maps without normalisation or activation (ISD/ACTION code); 1x1 convolutions are written as linear maps
over the channel axis, which is the same operation for any number of spatial axes.
"""
from __future__ import annotations

import torch
from torch import nn


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class TwoLinear(nn.Sequential):
    """``Linear(in, hidden) -> Linear(hidden, out)`` with no nonlinearity in between (as the original heads).

    Input ``[N, in_features]``, output ``[N, out_features]``.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        _check_positive(in_features=in_features, hidden_features=hidden_features, out_features=out_features)
        super().__init__(nn.Linear(in_features, hidden_features), nn.Linear(hidden_features, out_features))


class GlobalProjector(nn.Module):
    """Global projector Pi: masked global average pooling of the bottleneck, then two linear maps (spec 3.3).

    Args:
        in_channels: bottleneck channels ``C_b``.
        out_dim: embedding size ``D_g`` (512 in 2D, 128 in 3D in the original).

    Shapes: ``[B, C_b, *S]`` (+ optional weights ``[B, 1, *S]``) -> ``[B, D_g]``.
    """

    def __init__(self, in_channels: int, out_dim: int):
        super().__init__()
        self.mlp = TwoLinear(in_channels, in_channels, out_dim)

    def forward(self, bottleneck: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``weights`` (fraction of valid input voxels per bottleneck cell) excludes padded regions from the mean."""
        if weights is None:
            pooled = bottleneck.flatten(2).mean(-1)
        else:
            w = weights.flatten(2).to(bottleneck.dtype)
            pooled = (bottleneck.flatten(2) * w).sum(-1) / w.sum(-1).clamp_min(1e-6)
        return self.mlp(pooled)


class Predictor(TwoLinear):
    """Student-only predictor Psi on top of a projector: ``[N, D] -> [N, D]`` (two linear maps)."""

    def __init__(self, dim: int):
        super().__init__(dim, dim, dim)


class PointwiseMLP(nn.Module):
    """Two 1x1(x1) convolutions ``C -> hidden -> out`` on a grid ``[B, C, *S] -> [B, out, *S]`` (any dimension).

    Used as the local projector (``C -> 2C -> C``) and local predictor (``C -> C -> C``) on pooled logits.
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int):
        super().__init__()
        self.mlp = TwoLinear(in_channels, hidden_channels, out_channels)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.mlp(grid.movedim(1, -1)).movedim(-1, 1)


class RepresentationMLP(TwoLinear):
    """Representation head H_r of stage iii applied to sparsely gathered decoder features (spec 11.8).

    ``[N, sum of decoder channels] -> [N, D_r]``. The original applies conv3x3 -> conv1x1 densely to the upsampled,
    concatenated decoder maps; gathering at sampled voxels first makes 3D patches affordable, and the 3x3 becomes
    1x1 (documented deviation).
    """

    def __init__(self, in_features: int, dim: int):
        super().__init__(in_features, dim, dim)
