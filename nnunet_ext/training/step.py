"""One optimise step for every nnunet-ext trainer.

nnU-Net's ``nnUNetTrainer.train_step`` interleaves data movement, autocast, loss computation and the
GradScaler/clipping/step block. Trainers that copy that body drift from upstream between versions, so the
optimisation part lives here once and every trainer calls it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import ContextManager

import torch


def autocast_context(device: torch.device) -> ContextManager:
    """Mixed precision on CUDA only, as nnU-Net does (autocast on CPU is slow and on MPS unsupported)."""
    if device.type == "cuda":
        return torch.autocast(device.type, enabled=True)
    return contextlib.nullcontext()


def fp32_context(device: torch.device) -> ContextManager:
    """Disable autocast for numerically sensitive terms (KL, softmax over similarities, InfoNCE, log-sum-exp).

    Callers must still cast their inputs with ``.float()``: leaving an autocast region does not convert tensors
    that were produced inside it.
    """
    if device.type == "cuda":
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def optimised_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """Every parameter the optimiser updates (network and any heads), each once."""
    seen: dict[int, torch.nn.Parameter] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen.setdefault(id(p), p)
    return list(seen.values())


def optimise_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    grad_scaler: torch.amp.GradScaler | None = None,
    parameters: Iterable[torch.nn.Parameter] | None = None,
    clip_norm: float = 12.0,
    synchronise_gradients: Callable[[], None] | None = None,
) -> float:
    """Backward, unscale, clip and step, exactly like nnU-Net's ``train_step`` but for all optimised parameters.

    Args:
        optimizer: the trainer's optimiser. Its gradients are zeroed first (``set_to_none=True``).
        loss: scalar loss of this step.
        grad_scaler: nnU-Net's ``trainer.grad_scaler`` (a ``GradScaler`` on CUDA, ``None`` otherwise).
        parameters: parameters to clip; defaults to every parameter in ``optimizer`` (network and heads,
            whereas nnU-Net clips only ``network.parameters()``).
        clip_norm: maximum total gradient norm (nnU-Net uses 12).
        synchronise_gradients: called after backward and before unscaling/clipping (multi-GPU: averages the
            gradients over ranks, so clipping and the GradScaler's inf check see the same values on every rank and
            all ranks skip the same steps). ``None`` (single process): nothing.

    Returns:
        The total gradient norm before clipping (``inf``/``nan`` when the scaler skips the step).

    Raises:
        ValueError: if ``loss`` is not a scalar.
    """
    if loss.ndim != 0:
        raise ValueError(f"optimise_step expects a scalar loss, got shape {tuple(loss.shape)}")
    params = optimised_parameters(optimizer) if parameters is None else list(parameters)
    optimizer.zero_grad(set_to_none=True)
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        if synchronise_gradients is not None:
            synchronise_gradients()
        grad_scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        loss.backward()
        if synchronise_gradients is not None:
            synchronise_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
    return float(grad_norm)
