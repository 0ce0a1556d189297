"""Exponential moving average of a student network (mean-teacher style teachers)."""
from __future__ import annotations

import torch
from torch import nn

from nnunet_ext.compat import unwrap


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student`` for parameters; buffers are copied.

    Buffers (BatchNorm statistics, counters) are copied rather than averaged, as in the mean-teacher reference
    implementations. Both modules may be wrapped in DDP or ``torch.compile``.

    Raises:
        ValueError: if ``momentum`` is outside [0, 1] or the two modules have different parameter names.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    teacher, student = unwrap(teacher), unwrap(student)
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("teacher and student must have the same parameters (build the teacher as a deep copy)")
    for name, t in t_params.items():
        t.mul_(momentum).add_(s_params[name].detach(), alpha=1.0 - momentum)
    s_buffers = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        b.copy_(s_buffers[name])
