"""CFCML fine stage: batch class prototypes and the hierarchical anchor-based contrastive losses (HRM).

Follows the official implementation (IsDling/CFCML, ``CFCML/CFCML.py``); notation of the design spec §2.5/§3:
``M`` modalities (image groups + table), ``B`` samples, ``K`` classes, ``d`` feature width, τ = 0.07.

The original multi-positive term for an anchor ``a`` with positives 𝒫 and negatives 𝒩 is

    ℓ(a; 𝒫, 𝒩) = −log( Σ_p e^{(s(a,p)+1)/τ} / (Σ_p e^{(s(a,p)+1)/τ} + Σ_n e^{(s(a,n)+1)/τ}) + ε ),

which overflows in fp16 (e^{2/0.07} ≈ 2.6e12). The "+1" cancels, so we compute the equivalent log-sum-exp form
ℓ = −[LSE_𝒫(s/τ) − LSE_{𝒫∪𝒩}(s/τ)] = softplus(LSE_𝒩 − LSE_𝒫) in fp32 (relative difference ~1e-6 from the
dropped ε). Fix applied: a class absent from the batch gives a NaN prototype in the original (it only prints a
warning); here absent classes are masked out as anchors, positives and negatives, so they contribute nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Masked logits: finite, so rows without any valid entry stay finite (and are then multiplied by 0), yet
# exp(_MASKED - max) underflows to exactly 0 in fp32 next to any real logit (|s/τ| <= 1/τ).
_MASKED = -1.0e4


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unimodal and crossmodal class prototypes of one batch (spec §2.5), with gradients.

    p[m,k] = n̂((1/n_k) Σ_{i: y_i=k} n̂(f_i[m]));  c[k] = n̂((1/(M n_k)) Σ_m Σ_{i: y_i=k} n̂(f_i[m])).

    Args:
        features: ``[M, B, d]`` per-modality features.
        labels: ``[B]`` int64 class indices in ``[0, num_classes)``.
        num_classes: K.

    Returns:
        ``(P [M, K, d], C [K, d], present [K] bool)``; rows of absent classes are zero vectors (not NaN).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [M, B, d], got shape {tuple(features.shape)}")
    if labels.shape != features.shape[1:2]:
        raise ValueError(f"labels must be [B] = [{features.shape[1]}], got shape {tuple(labels.shape)}")
    onehot = F.one_hot(labels, num_classes).to(features.dtype)  # [B, K]
    counts = onehot.sum(0)  # [K]
    present = counts > 0
    normalised = F.normalize(features, dim=-1)
    safe = counts.clamp_min(1.0)
    unimodal = F.normalize(torch.einsum("mbd,bk->mkd", normalised, onehot) / safe[None, :, None], dim=-1)
    modalities = features.shape[0]
    crossmodal = F.normalize(torch.einsum("mbd,bk->kd", normalised, onehot) / (modalities * safe)[:, None], dim=-1)
    return unimodal, crossmodal, present


def _anchor_term(positive_logits: torch.Tensor, negative_logits: torch.Tensor) -> torch.Tensor:
    """−(LSE(pos) − LSE(pos ∪ neg)) along the last axis (masked entries already set to ``_MASKED``).

    Computed as ``softplus(LSE(neg) − LSE(pos))`` (= log(1 + Σ_neg/Σ_pos)), which avoids the cancellation of two
    numbers of size ~1/τ when the loss is small.
    """
    return F.softplus(torch.logsumexp(negative_logits, -1) - torch.logsumexp(positive_logits, -1))


class HierarchicalAnchorLoss(nn.Module):
    """HRM losses L_sam, L_up, L_cp of CFCML (spec §3), in fp32, mask-based (no boolean indexing).

    1. Sample-anchored: anchor f_i[m] of class k; positives {c[k]} ∪ {p[m',k]}_m'; negatives same-modality
       features of other-class samples. ``L_sam = Σ_m Σ_k (1/n_k) Σ_{i: y_i=k} ℓ`` (summed over classes and
       modalities, as the official code).
    2. Unimodal-prototype-anchored: anchor p[m,k]; positive c[k]; negatives {p[m',l]: l≠k}.
       ``L_up = (1/M) Σ_m Σ_k ℓ``.
    3. Crossmodal-prototype-anchored: anchor c[k]; positives {p[m,k]}_m; negatives {c[l]: l≠k}.
       ``L_cp = (1/K) Σ_k ℓ``.

    With a single class in the batch every term is exactly 0 (no negatives).

    Args:
        temperature: τ (CFCML: 0.07).
        cross_modal_negatives: also use other modalities' features of other-class samples as L_sam negatives
            (not in the original; ablation option).

    Shapes:
        forward(features ``[M, B, d]``, labels ``[B]``, num_classes) -> three scalars.
    """

    def __init__(self, temperature: float = 0.07, cross_modal_negatives: bool = False):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.cross_modal_negatives = bool(cross_modal_negatives)

    def forward(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.tolist()}")
        features = features.float()
        tau = self.temperature
        modalities, batch, _ = features.shape
        unimodal, crossmodal, present = class_prototypes(features, labels, num_classes)
        onehot = F.one_hot(labels, num_classes).float()  # [B, K]
        counts = onehot.sum(0)
        normalised = F.normalize(features, dim=-1)

        # ---- L_sam: positives [M, B, 1 + M], negatives [M, B, B] (or [M, B, M*B])
        to_cross = torch.einsum("mbd,kd->mbk", normalised, crossmodal)
        pos_cross = (to_cross * onehot[None]).sum(-1, keepdim=True)
        to_unimodal = torch.einsum("mbd,nkd->mbnk", normalised, unimodal)
        pos_unimodal = (to_unimodal * onehot[None, :, None, :]).sum(-1)
        positives = torch.cat([pos_cross, pos_unimodal], -1) / tau
        other_class = labels[:, None] != labels[None, :]  # [B, B]
        if self.cross_modal_negatives:
            similarity = torch.einsum("mbd,njd->mbnj", normalised, normalised).reshape(modalities, batch, -1)
            negative_mask = other_class[None, :, None, :].expand(modalities, batch, modalities, batch)
            negative_mask = negative_mask.reshape(modalities, batch, -1)
        else:
            similarity = torch.einsum("mbd,mjd->mbj", normalised, normalised)
            negative_mask = other_class[None].expand(modalities, batch, batch)
        negatives = torch.where(negative_mask, similarity / tau, torch.full_like(similarity, _MASKED))
        # anchors without any negative contribute exactly 0 (both LSEs coincide; avoid round-off)
        per_sample = _anchor_term(positives, negatives) * negative_mask.any(-1)  # [M, B]
        weight = 1.0 / counts.clamp_min(1.0)[labels]  # 1/n_{y_i}
        l_sam = (per_sample * weight[None]).sum()

        # ---- L_up: anchors P[m,k]; positive C[k]; negatives P[m',l], l != k, both present
        up_positive = (torch.einsum("mkd,kd->mk", unimodal, crossmodal) / tau)[..., None]  # [M, K, 1]
        proto_similarity = torch.einsum("mkd,nld->mknl", unimodal, unimodal) / tau  # [M, K, M, K]
        eye = torch.eye(num_classes, dtype=torch.bool, device=features.device)
        valid_pair = (~eye) & present[:, None] & present[None, :]  # [K, L]
        up_mask = valid_pair[None, :, None, :].expand(modalities, num_classes, modalities, num_classes)
        up_negatives = torch.where(up_mask, proto_similarity, torch.full_like(proto_similarity, _MASKED))
        up_terms = _anchor_term(up_positive, up_negatives.reshape(modalities, num_classes, -1))  # [M, K]
        has_negative = valid_pair.any(-1)  # [K]: anchor class present and another class present
        l_up = (up_terms * has_negative[None].float()).sum() / modalities

        # ---- L_cp: anchors C[k]; positives P[m,k]; negatives C[l], l != k, both present
        cp_positive = torch.einsum("kd,mkd->km", crossmodal, unimodal) / tau  # [K, M]
        cross_similarity = crossmodal @ crossmodal.T / tau  # [K, K]
        cp_negatives = torch.where(valid_pair, cross_similarity, torch.full_like(cross_similarity, _MASKED))
        cp_terms = _anchor_term(cp_positive, cp_negatives)  # [K]
        l_cp = (cp_terms * has_negative.float()).sum() / num_classes
        return l_sam, l_up, l_cp
