"""Variational-information-bottleneck terms of CIML's messages.

A message z ~ N(mu, diag sigma^2) from an auxiliary modality is regularised towards the prior N(0, I); the KL
divergence upper-bounds the information the message carries about its sender, I(X_a; Z) <= E KL(q(z|x) || p(z))
(Alemi et al., "Deep variational information bottleneck", ICLR 2017, eq. 13; CIML spec section 4).
"""
from __future__ import annotations

import torch

_REDUCTIONS = ("mean", "sum", "none")


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "mean",
                logvar_clamp: float | None = None) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per element, 0.5 * (mu^2 + exp(logvar) - logvar - 1), in fp32.

    Args:
        mu: means ``[B, C, *spatial]`` (any shape), any float dtype.
        logvar: log-variances, same shape as ``mu``.
        reduction: ``"mean"`` over all elements (CIML's per-pair KL), ``"sum"``, or ``"none"`` (per element).
        logvar_clamp: if given, ``logvar`` is clamped to ``[-logvar_clamp, logvar_clamp]`` first (fp16 safety).

    Returns:
        fp32 tensor: a scalar for ``"mean"``/``"sum"``, otherwise the shape of ``mu``.

    Raises:
        ValueError: unknown reduction, mismatching shapes or a non-positive clamp.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape, got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    if logvar_clamp is not None and logvar_clamp <= 0:
        raise ValueError(f"logvar_clamp must be positive, got {logvar_clamp}")
    # exp() of fp16 log-variances overflows; compute in fp32 and outside autocast
    with torch.autocast(device_type=mu.device.type, enabled=False):
        mu32, logvar32 = mu.float(), logvar.float()
        if logvar_clamp is not None:
            logvar32 = logvar32.clamp(-logvar_clamp, logvar_clamp)
        kl = 0.5 * (mu32.square() + logvar32.exp() - logvar32 - 1.0)
        if reduction == "mean":
            return kl.mean()
        if reduction == "sum":
            return kl.sum()
        return kl


def kl_density(mu: torch.Tensor, logvar: torch.Tensor | None, logvar_clamp: float | None = None) -> torch.Tensor:
    """Per-voxel KL in nats summed over channels, ``[B, 1, *spatial]`` fp32 (how much a message sends, where).

    With ``logvar=None`` (deterministic messages) only the 0.5 * mu^2 part exists.
    """
    if logvar is None:
        return 0.5 * mu.float().square().sum(1, keepdim=True)
    return gaussian_kl(mu, logvar, reduction="none", logvar_clamp=logvar_clamp).sum(1, keepdim=True)


class BetaSchedule:
    """Weight of the KL term: ``beta(e) = beta * min(1, e / (warmup_fraction * num_epochs))`` (linear warm-up).

    The value depends only on the epoch, so it is the same on every DDP rank and after ``--c``. ``beta(0) = 0``
    lets the decoders learn to use messages before the bottleneck starts closing them.

    Args:
        beta: final weight (CIML default 1e-3 with the mean-reduced KL).
        warmup_fraction: fraction of the epochs over which beta ramps up; 0 disables the warm-up.

    Raises:
        ValueError: negative beta or a warm-up fraction outside [0, 1].
    """

    def __init__(self, beta: float, warmup_fraction: float = 0.1) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"beta_warmup_fraction must be in [0, 1], got {warmup_fraction}")
        self.beta = float(beta)
        self.warmup_fraction = float(warmup_fraction)

    def __call__(self, epoch: int, num_epochs: int) -> float:
        if num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
        warmup_epochs = self.warmup_fraction * num_epochs
        if warmup_epochs <= 0:
            return self.beta
        return self.beta * min(1.0, max(0, epoch) / warmup_epochs)
