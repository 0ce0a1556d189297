"""Stage iii losses: confidence-weighted pseudo-label cross-entropy and anatomical contrast L_anco.

Both follow ReCo (Liu et al., ICLR 2022), which ACTION's stage iii reuses (spec 5.4). Everything here runs in fp32.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def confidence_weighted_ce(logits: torch.Tensor, pseudo_labels: torch.Tensor, confidence: torch.Tensor,
                           threshold: float = 0.97) -> tuple[torch.Tensor, torch.Tensor]:
    """ReCo's unsupervised loss: per-image weight times pixel-wise CE, averaged over pixels with positive loss.

    ``omega_b = |{i valid : c_b,i >= threshold}| / |{i valid}|`` (valid = pseudo-label >= 0), ``l_b,i =
    CE(z_b,i, y~_b,i)`` with -1 ignored, ``L = mean over {l_b,i > 0} of omega_b * l_b,i`` (spec 5.4; no per-pixel
    threshold inside the CE, no ramp-up).

    Args:
        logits: ``[B, C, *S]`` student logits on the mixed unlabeled batch.
        pseudo_labels: ``[B, *S]`` long, -1 = ignore (padding, CutOut).
        confidence: ``[B, *S]`` teacher max-probability, mixed like the pseudo-labels.
        threshold: delta_s (0.97).

    Returns:
        ``(loss, omega)``: scalar fp32 loss and the per-image weights ``[B]``.
    """
    if pseudo_labels.shape != confidence.shape or logits.shape[0] != pseudo_labels.shape[0] \
            or logits.shape[2:] != pseudo_labels.shape[1:]:
        raise ValueError(f"expected logits [B, C, *S] and pseudo-labels/confidence [B, *S]; got "
                         f"{tuple(logits.shape)}, {tuple(pseudo_labels.shape)}, {tuple(confidence.shape)}")
    valid = pseudo_labels >= 0
    confident = (confidence >= threshold) & valid
    dims = tuple(range(1, pseudo_labels.ndim))
    omega = confident.sum(dims).float() / valid.sum(dims).clamp_min(1).float()
    pixel_loss = F.cross_entropy(logits.float(), pseudo_labels.long(), ignore_index=-1, reduction="none")
    weighted = omega.view(-1, *([1] * len(dims))) * pixel_loss
    positive = pixel_loss > 0
    if not positive.any():
        return (logits.float() * 0).sum(), omega
    return weighted[positive].mean(), omega


def sample_negatives(class_probabilities: torch.Tensor, pool_sizes: torch.Tensor, num_queries: int,
                     num_negatives: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised negative sampler (spec 11.8 step 6).

    Args:
        class_probabilities: ``[K]`` probability of drawing each pool (0 for the query's own class).
        pool_sizes: ``[K]`` number of voxels in each class pool (pools concatenated in this order).
        num_queries / num_negatives: N_q and N_k.

    Returns:
        ``(classes, index)``, both ``[N_q, N_k]`` long: the pool drawn for each negative and the row in the
        concatenated pools (uniform within the drawn pool).
    """
    classes = torch.multinomial(class_probabilities.float(), num_queries * num_negatives, replacement=True)
    classes = classes.view(num_queries, num_negatives)
    offsets = torch.cumsum(pool_sizes, 0) - pool_sizes
    within = (torch.rand(classes.shape, device=classes.device) * pool_sizes[classes]).long()
    within = torch.minimum(within, pool_sizes[classes] - 1)
    return classes, offsets[classes] + within


class AnatomicalContrastLoss(nn.Module):
    """ACTION's anatomical contrast on sparsely sampled representations (ReCo regional contrast; spec 5.4).

    For every valid class c with hard queries r_q (low-confidence voxels of c), positive key the detached class
    prototype mu_c (mean representation of c) and N_k negatives drawn from the other classes' pools with class
    probability softmax_{j != c}(cos(mu_c, mu_j) / tau) (the paper's semantic relation graph):

        L_c = (1/N_q) sum_q -log[ exp(cos(r_q, mu_c)/tau) /
                                  (exp(cos(r_q, mu_c)/tau) + sum_k exp(cos(r_q, r-_q,k)/tau)) ]
        L_anco = (1 / #valid classes) sum_{c with hard queries} L_c        (0 with fewer than two valid classes)

    Gradients reach only the queries (prototypes and negatives are detached).

    Args:
        num_negatives: N_k per query (512).
        temperature: tau (0.5); can be overridden per call (ACTION++ temperature schedule).

    ``forward(prototype_features, query_features)`` takes, per valid class in the same order, the representations
    of its prototype subset ``[n_c, D]`` and of its queries ``[N_q or 0, D]``.
    """

    def __init__(self, num_negatives: int = 512, temperature: float = 0.5):
        super().__init__()
        if not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"num_negatives must be a positive integer, got {num_negatives!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.num_negatives = num_negatives
        self.temperature = temperature

    def forward(self, prototype_features: Sequence[torch.Tensor], query_features: Sequence[torch.Tensor],
                temperature: float | None = None) -> torch.Tensor:
        tau = self.temperature if temperature is None else temperature
        if not tau > 0:
            raise ValueError(f"temperature must be positive, got {tau}")
        if len(prototype_features) != len(query_features):
            raise ValueError("need one prototype set and one query set per valid class")
        if any(p.shape[0] == 0 for p in prototype_features):
            raise ValueError("every valid class needs at least one prototype voxel")
        n_valid = len(prototype_features)
        device = prototype_features[0].device if n_valid else torch.device("cpu")
        zero = sum((q.float().sum() * 0 for q in query_features), torch.zeros((), device=device))
        if n_valid < 2:
            return zero
        pools = [F.normalize(p.detach().float(), dim=1) for p in prototype_features]
        prototypes = F.normalize(torch.stack([p.detach().float().mean(0) for p in prototype_features]), dim=1)
        pool_all = torch.cat(pools)
        pool_sizes = torch.tensor([p.shape[0] for p in pools], device=device)
        pool_ends = torch.cumsum(pool_sizes, 0).tolist()
        relation = prototypes @ prototypes.T / tau
        total = zero
        for c, queries in enumerate(query_features):
            if queries.shape[0] == 0:
                continue  # no hard queries: adds 0 but still counts in the denominator
            q = F.normalize(queries.float(), dim=1)
            others = relation[c].clone()
            others[c] = float("-inf")
            _, index = sample_negatives(torch.softmax(others, 0), pool_sizes, q.shape[0], self.num_negatives)
            # the own pool is never drawn: similarities to the other pools only (the largest pool is often the
            # query's own background), indices after the own pool shifted down by its size
            start, end = pool_ends[c] - prototype_features[c].shape[0], pool_ends[c]
            other_pools = torch.cat([pool_all[:start], pool_all[end:]])
            index = torch.where(index >= end, index - (end - start), index)
            positive = (q @ prototypes[c]) / tau                         # [N_q]
            negative = torch.gather(q @ other_pools.T / tau, 1, index)   # [N_q, N_k]
            logits = torch.cat([positive.unsqueeze(1), negative], 1)
            target = torch.zeros(q.shape[0], dtype=torch.long, device=device)
            total = total + F.cross_entropy(logits, target)
        return total / n_valid
