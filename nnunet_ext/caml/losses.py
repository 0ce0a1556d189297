"""CAML's loss terms as pure functions (Gao et al., "Correlation-Aware Mutual Learning for Semi-supervised Medical
Image Segmentation", MICCAI 2023, arXiv:2307.06312; details follow the official code ``Herschel555/CAML``).

* :func:`mutual_consistency_loss`: L_c, cross MSE between each sub-model's probabilities and the other's
  sharpened probabilities (MC-Net style; the paper calls it cross pseudo supervision).
* :func:`correlation_consistency` / :func:`omni_correlation_loss`: L_o, cross entropy between the two sub-models'
  omni-correlation maps (softmax over a memory bank of labeled features).
* :func:`caml_total_loss`: ``w_sup (L_sup_v + L_sup_a) + lambda_c r L_c + lambda_o r L_o``.

Every function casts its inputs to float32: p^(1/T), u.q / tau and 1e-8 are not representable in fp16. Callers run
them under :func:`nnunet_ext.training.step.fp32_context`.
"""
from __future__ import annotations

import torch

OCC_LOG_FORMS = ("eps", "log_softmax")


def _check_temperature(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def sharpen(probabilities: torch.Tensor, temperature: float = 0.1, dim: int = 1) -> torch.Tensor:
    """Sharpened distribution ``p_c^(1/T) / sum_k p_k^(1/T)`` along ``dim`` (CAML/MC-Net sharpening).

    For two classes this is the official per-channel ``p^(1/T) / (p^(1/T) + (1 - p)^(1/T))``; for more classes the
    official formula is not a distribution, the normalised power is. For softmax outputs it equals
    ``softmax(logits / T)`` (see :func:`sharpen_logits`, the form the losses use).

    Args:
        probabilities: ``[B, K, *spatial]`` (or any shape) with non-negative entries summing to 1 along ``dim``.
        temperature: T > 0 (official 0.1); T < 1 sharpens, T = 1 is the identity.

    Raises:
        ValueError: for T <= 0.
    """
    _check_temperature("sharpening temperature", temperature)
    # computed in the log domain: p^(1/T) underflows for small p and T = 0.1
    log_p = torch.log(probabilities.float().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.softmax(log_p / temperature, dim=dim)


def sharpen_logits(logits: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``sharpen(softmax(logits))`` computed stably as ``softmax(logits / T)`` over channel dim 1 (float32)."""
    _check_temperature("sharpening temperature", temperature)
    return torch.softmax(logits.float() / temperature, dim=1)


def mutual_consistency_loss(logits_v: torch.Tensor, logits_a: torch.Tensor, temperature: float = 0.1,
                            mask: torch.Tensor | None = None, detach_targets: bool = False) -> torch.Tensor:
    """L_c = MSE(P_v, S(P_a)) + MSE(P_a, S(P_v)) with P = softmax(z), S = sharpening at temperature T.

    Each MSE is a mean over samples, channels and voxels (official: all B labeled and unlabeled samples). With
    ``mask`` the mean runs over the masked voxels only (all channels), e.g. to leave out padded unlabeled voxels.
    Officially the sharpened targets are not detached, so gradients flow through both branches of each term.

    Args:
        logits_v: full-resolution logits of the vanilla model ``[B, K, *spatial]``.
        logits_a: same for the auxiliary model.
        temperature: sharpening temperature T (official 0.1).
        mask: optional ``[B, 1, *spatial]`` (bool or 0/1) weights of the voxels to average over.
        detach_targets: stop gradients through S(.) (not official; ablation switch).

    Returns:
        Scalar float32 loss; 0 when the mask is empty.

    Raises:
        ValueError: mismatching shapes or T <= 0.
    """
    if logits_v.shape != logits_a.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_v.shape)} vs {tuple(logits_a.shape)}")
    if mask is not None and (mask.shape[0] != logits_v.shape[0] or mask.shape[1] != 1
                             or mask.shape[2:] != logits_v.shape[2:]):
        raise ValueError(f"mask must be [B, 1, *spatial] = {(logits_v.shape[0], 1, *logits_v.shape[2:])}, got "
                         f"{tuple(mask.shape)}")
    p_v, p_a = torch.softmax(logits_v.float(), 1), torch.softmax(logits_a.float(), 1)
    s_v, s_a = sharpen_logits(logits_v, temperature), sharpen_logits(logits_a, temperature)
    if detach_targets:
        s_v, s_a = s_v.detach(), s_a.detach()
    squared = (p_v - s_a).pow(2) + (p_a - s_v).pow(2)
    if mask is None:
        return squared.mean()
    weights = mask.to(squared.dtype)
    denominator = weights.sum() * squared.shape[1]
    return (squared * weights).sum() / denominator.clamp_min(1.0)


def correlation_logits(features: torch.Tensor, memory: torch.Tensor, temperature: float = 0.1,
                       normalize: bool = False) -> torch.Tensor:
    """``u q^T / tau`` for rows u ``[R, D]`` and memory q ``[M, D]`` -> ``[R, M]`` (float32).

    Officially a raw dot product (``normalize=False``); ``normalize=True`` L2-normalises both (cosine similarity).
    """
    _check_temperature("correlation temperature", temperature)
    if features.ndim != 2 or memory.ndim != 2 or features.shape[1] != memory.shape[1]:
        raise ValueError(f"expected features [R, D] and memory [M, D], got {tuple(features.shape)} and "
                         f"{tuple(memory.shape)}")
    features, memory = features.float(), memory.float()
    if normalize:
        features = torch.nn.functional.normalize(features, dim=1)
        memory = torch.nn.functional.normalize(memory, dim=1)
    return features @ memory.t() / temperature


def correlation_consistency(correlation_v: torch.Tensor, correlation_a: torch.Tensor,
                            eps: float = 1e-8) -> torch.Tensor:
    """L_o on given correlation maps: ``(1/R) sum_r sum_j -C_a[r, j] log(C_v[r, j] + eps)``.

    Target C_a (auxiliary), prediction C_v (vanilla), as officially; not symmetric. Each row contributes at most
    ``-log(eps)`` (about 18.42 for 1e-8) and, when C_v = C_a, exactly the entropy of the row (0 only for one-hot
    rows).

    Args:
        correlation_v: ``[R, M]`` rows summing to 1.
        correlation_a: ``[R, M]`` rows summing to 1 (detach it beforehand to stop its gradient).

    Raises:
        ValueError: mismatching shapes, no rows, or eps <= 0.
    """
    if correlation_v.shape != correlation_a.shape or correlation_v.ndim != 2 or correlation_v.shape[0] == 0:
        raise ValueError(f"expected two non-empty [R, M] maps of equal shape, got {tuple(correlation_v.shape)} and "
                         f"{tuple(correlation_a.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return (-(correlation_a.float() * torch.log(correlation_v.float() + eps)).sum(1)).mean()


def omni_correlation_loss(features_v: torch.Tensor, features_a: torch.Tensor, memory: torch.Tensor,
                          temperature: float = 0.1, normalize: bool = False, log_form: str = "eps",
                          detach_targets: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """L_o from unlabeled row features and a memory bank sample (omni: softmax over the whole bank, all classes).

    ``C_s = softmax(u_s Q^T / tau)`` per row (tau = 0.1 officially); L_o = :func:`correlation_consistency`
    (``log_form="eps"``, official ``log(C_v + 1e-8)``) or the uncapped ``-sum C_a log_softmax`` form
    (``log_form="log_softmax"``). Row r of both inputs must be the same voxel. The memory must be detached.

    Args:
        features_v: ``pred_v(proj_v(e_v))`` of the selected unlabeled voxels ``[R, D]``.
        features_a: ``pred_a(proj_a(e_a))`` of the same voxels ``[R, D]``.
        memory: sampled labeled features ``[M, D]`` (``requires_grad`` False).
        temperature: tau.
        normalize: cosine instead of dot-product similarity (not official).
        log_form: ``"eps"`` or ``"log_softmax"``.
        detach_targets: stop the gradient through C_a (not official: officially both maps get gradients).
        eps: the official 1e-8 inside the log.

    Raises:
        ValueError: bad shapes/options, or a memory tensor that requires grad.
    """
    if log_form not in OCC_LOG_FORMS:
        raise ValueError(f"unknown log form {log_form!r}; expected one of {OCC_LOG_FORMS}")
    if memory.requires_grad:
        raise ValueError("the memory bank sample must be detached")
    if features_v.shape != features_a.shape:
        raise ValueError(f"row features differ in shape: {tuple(features_v.shape)} vs {tuple(features_a.shape)}")
    logits_v = correlation_logits(features_v, memory, temperature, normalize)
    logits_a = correlation_logits(features_a, memory, temperature, normalize)
    correlation_a = torch.softmax(logits_a, 1)
    if detach_targets:
        correlation_a = correlation_a.detach()
    if log_form == "eps":
        return correlation_consistency(torch.softmax(logits_v, 1), correlation_a, eps)
    return (-(correlation_a * torch.log_softmax(logits_v, 1)).sum(1)).mean()


def caml_total_loss(supervised_sum: torch.Tensor, consistency: torch.Tensor, correlation: torch.Tensor,
                    ramp: float, w_sup: float = 0.5, lambda_c: float = 1.0, lambda_o: float = 0.05) -> torch.Tensor:
    """``w_sup (L_sup_v + L_sup_a) + lambda_c r L_c + lambda_o r L_o`` (official weights 0.5, 1.0, 0.05).

    Args:
        supervised_sum: L_sup_v + L_sup_a.
        consistency: L_c.
        correlation: L_o.
        ramp: r in [0, 1] (:func:`nnunet_ext.caml.ramps.caml_rampup`).
    """
    if not 0.0 <= ramp <= 1.0:
        raise ValueError(f"ramp must be in [0, 1], got {ramp}")
    return w_sup * supervised_sum + lambda_c * ramp * consistency + lambda_o * ramp * correlation


class ForegroundDiceLoss(torch.nn.Module):
    """CAML's supervised loss: soft Dice over the whole labeled batch, foreground channels only, no cross entropy.

    ``1 - (2 sum p y + eps) / (sum p + sum y + eps)`` per foreground class (official: the single foreground class of LA,
    eps = 1e-8), averaged over classes; built on nnU-Net's ``MemoryEfficientSoftDiceLoss`` (``batch_dice=True``,
    ``do_bg=False``). Voxels with the ignore label are masked out.

    Args:
        ignore_label: nnU-Net's ignore label or None.
        smooth: eps of the Dice quotient.

    Shapes: logits ``[B, K, *spatial]``, target ``[B, 1, *spatial]`` (integer valued).
    """

    def __init__(self, ignore_label: int | None = None, smooth: float = 1e-8):
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        from nnunetv2.utilities.helpers import softmax_helper_dim1

        super().__init__()
        if not smooth > 0:
            raise ValueError(f"smooth must be > 0, got {smooth}")
        self.ignore_label = ignore_label
        self.dice = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=True, do_bg=False,
                                                smooth=smooth, ddp=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] < 2:
            raise ValueError(f"foreground Dice needs at least 2 output channels, got {logits.shape[1]}")
        mask = None
        if self.ignore_label is not None:
            mask = (target != self.ignore_label).float()
            target = torch.where(mask.bool(), target, torch.zeros_like(target))
        # nnU-Net's soft Dice returns the negative Dice coefficient
        return 1.0 + self.dice(logits, target, loss_mask=mask)
