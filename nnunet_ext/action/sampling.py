"""Sparse pixel sampling for stage iii (ACTION spec 5.4, 11.8): locations first, features only where sampled.

A 3D nnU-Net patch has millions of voxels; a dense representation head on the concatenated decoder maps does not
fit in memory (official-code issue Q14). The sampler picks, per class, a bounded prototype subset and the hard
(low-confidence) queries from labels and detached probabilities alone; :func:`gather_decoder_features` then reads
the decoder maps at those voxels only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class ClassSample:
    """Sampled voxels of one class. Indices are flat over ``[B, *S]`` (``numel`` of the label map).

    Attributes:
        class_id: the class.
        prototype_index: up to ``max_prototype_pixels`` distinct voxels of the class's valid set V_c (all if fewer);
            their mean representation is the prototype and they are this class's negative pool.
        query_index: ``num_queries`` voxels drawn with replacement from the hard set H_c = {i in V_c : p_c,i <
            threshold}, or empty when H_c is empty.
    """

    class_id: int
    prototype_index: torch.Tensor
    query_index: torch.Tensor


class HardPixelSampler:
    """Per class: a bounded prototype subset of V_c and ``num_queries`` low-confidence queries from H_c.

    Args:
        num_queries: queries per class (ReCo/ACTION: 256).
        max_prototype_pixels: cap of the prototype subset per class (8192; the subset mean is an unbiased estimate
            of the class mean).
        strong_threshold: a voxel is hard when the detached probability of its class is below this (0.97).

    Call with ``labels`` ``[B, *S]`` (long; -1 = not valid: ignore label, padding, low-confidence pseudo-label)
    and ``class_probability`` ``[B, *S]`` (detached student probability of each voxel's label); returns one
    :class:`ClassSample` per class with a non-empty V_c, in increasing class order.
    """

    def __init__(self, num_queries: int = 256, max_prototype_pixels: int = 8192, strong_threshold: float = 0.97):
        for name, value in (("num_queries", num_queries), ("max_prototype_pixels", max_prototype_pixels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 < strong_threshold <= 1.0:
            raise ValueError(f"strong_threshold must be in (0, 1], got {strong_threshold}")
        self.num_queries = num_queries
        self.max_prototype_pixels = max_prototype_pixels
        self.strong_threshold = strong_threshold

    @torch.no_grad()
    def __call__(self, labels: torch.Tensor, class_probability: torch.Tensor, num_classes: int) -> list[ClassSample]:
        if labels.shape != class_probability.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and class_probability {tuple(class_probability.shape)} "
                             f"must have the same shape [B, *S]")
        labels, probability = labels.reshape(-1), class_probability.reshape(-1)
        samples = []
        for c in range(num_classes):
            members = torch.nonzero(labels == c).squeeze(1)
            if members.numel() == 0:
                continue
            if members.numel() > self.max_prototype_pixels:
                pick = torch.randperm(members.numel())[: self.max_prototype_pixels].to(members.device)
                prototype = members[pick]
            else:
                prototype = members
            hard = members[probability[members] < self.strong_threshold]
            if hard.numel() == 0:
                queries = hard
            else:
                queries = hard[torch.randint(hard.numel(), (self.num_queries,)).to(hard.device)]
            samples.append(ClassSample(c, prototype, queries))
        return samples


def gather_decoder_features(features: Sequence[torch.Tensor], flat_index: torch.Tensor,
                            full_shape: Sequence[int]) -> torch.Tensor:
    """Concatenated decoder features at full-resolution voxels.

    Args:
        features: decoder stage outputs ``[B, C_s, *S_s]`` (any resolutions; ``S_s`` divides the patch).
        flat_index: ``[N]`` flat indices over ``full_shape`` = ``(B, *S)``.
        full_shape: ``(B, *S)`` of the full-resolution label map.

    Returns:
        ``[N, sum C_s]``: for each stage the feature of the cell containing the voxel (nearest, integer division by
        the stage's stride), concatenated in the order of ``features``.
    """
    full_shape = tuple(int(s) for s in full_shape)
    coords = torch.unravel_index(flat_index, full_shape)
    batch_index, spatial = coords[0], coords[1:]
    gathered = []
    for f in features:
        if f.shape[0] != full_shape[0] or f.ndim != len(full_shape) + 1:
            raise ValueError(f"feature map {tuple(f.shape)} does not match label map {full_shape}")
        stage_coords = [c * s // full for c, s, full in zip(spatial, f.shape[2:], full_shape[1:])]
        gathered.append(f.movedim(1, -1)[(batch_index, *stage_coords)])
    return torch.cat(gathered, dim=1)


@torch.no_grad()
def sample_pixels_per_class(labels: torch.Tensor, per_class: int, num_classes: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` voxels (uniform, with replacement) of every class present in ``labels`` ``[B, *S]`` (-1 ignored).

    Returns:
        ``(flat_index [n], class_of_index [n])`` with ``n = per_class * #present classes`` (ACTION++'s 256 labelled
        pixels per class for SAACL).
    """
    flat = labels.reshape(-1)
    indices, classes = [], []
    for c in range(num_classes):
        members = torch.nonzero(flat == c).squeeze(1)
        if members.numel() == 0:
            continue
        indices.append(members[torch.randint(members.numel(), (per_class,)).to(members.device)])
        classes.append(torch.full((per_class,), c, dtype=torch.long, device=flat.device))
    if not indices:
        empty = torch.zeros(0, dtype=torch.long, device=flat.device)
        return empty, empty
    return torch.cat(indices), torch.cat(classes)
