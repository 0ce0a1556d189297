from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nnunet_ext.training.ema import ema_update


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.99, 1.0])
def test_parameters_follow_ema_and_buffers_are_copied(momentum):
    student = _net()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student(torch.randn(2, 1, 5, 5, 5))  # changes BN running statistics
    before = {k: v.clone() for k, v in teacher.named_parameters()}
    ema_update(teacher, student, momentum)
    for name, p in teacher.named_parameters():
        expected = momentum * before[name] + (1 - momentum) * dict(student.named_parameters())[name]
        torch.testing.assert_close(p, expected)
    for (_, b), (_, s) in zip(teacher.named_buffers(), student.named_buffers()):
        torch.testing.assert_close(b, s)


def test_unwraps_compiled_style_wrappers_and_needs_no_grad():
    student = _net()
    teacher = copy.deepcopy(student).requires_grad_(False)
    ema_update(teacher, student, 0.9)
    assert all(p.grad is None for p in student.parameters())


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_rejects_bad_momentum(momentum):
    with pytest.raises(ValueError, match="momentum"):
        ema_update(_net(), _net(), momentum)


def test_rejects_different_architectures():
    with pytest.raises(ValueError, match="same parameters"):
        ema_update(_net(), nn.Linear(2, 2), 0.9)
