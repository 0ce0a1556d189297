"""optimise_step equals nnU-Net's manual backward -> clip(12) -> step, over network and heads."""
from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from torch import nn

from nnunet_ext.training.step import autocast_context, fp32_context, optimise_step, optimised_parameters


def _model_and_heads(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), nn.Linear(3, 2)


def _loss(net: nn.Module, head: nn.Module, scale: float = 1.0) -> torch.Tensor:
    x = torch.linspace(-1, 1, 20).reshape(5, 4)
    return scale * head(net(x)).pow(2).sum()


@pytest.mark.parametrize("scale", [1.0, 1e4])  # 1e4 makes the norm exceed 12, so clipping is active
def test_matches_manual_update_including_heads(scale):
    net, head = _model_and_heads()
    net_ref, head_ref = copy.deepcopy(net), copy.deepcopy(head)
    opt = torch.optim.SGD([{"params": net.parameters()}, {"params": head.parameters()}], lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD([{"params": net_ref.parameters()}, {"params": head_ref.parameters()}], lr=0.1,
                              momentum=0.9)

    norm = optimise_step(opt, _loss(net, head, scale))

    loss_ref = _loss(net_ref, head_ref, scale)
    loss_ref.backward()
    norm_ref = torch.nn.utils.clip_grad_norm_(list(net_ref.parameters()) + list(head_ref.parameters()), 12)
    opt_ref.step()
    assert norm == pytest.approx(float(norm_ref))
    for p, q in zip(list(net.parameters()) + list(head.parameters()),
                    list(net_ref.parameters()) + list(head_ref.parameters())):
        torch.testing.assert_close(p, q)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in optimised_parameters(opt)])
    assert float(clipped) <= 12.0 + 1e-4


def test_with_grad_scaler_follows_scaler_protocol():
    net, head = _model_and_heads()
    net_ref, head_ref = copy.deepcopy(net), copy.deepcopy(head)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.1)
    opt_ref = torch.optim.SGD(list(net_ref.parameters()) + list(head_ref.parameters()), lr=0.1)
    scaler = mock.MagicMock()
    scaler.scale.side_effect = lambda loss: loss * 8.0
    scaler.unscale_.side_effect = lambda o: [p.grad.div_(8.0) for g in o.param_groups for p in g["params"]]
    scaler.step.side_effect = lambda o: o.step()

    optimise_step(opt, _loss(net, head), grad_scaler=scaler)

    _loss(net_ref, head_ref).backward()
    torch.nn.utils.clip_grad_norm_(list(net_ref.parameters()) + list(head_ref.parameters()), 12)
    opt_ref.step()
    assert [c[0] for c in scaler.method_calls] == ["scale", "unscale_", "step", "update"]
    for p, q in zip(list(net.parameters()) + list(head.parameters()),
                    list(net_ref.parameters()) + list(head_ref.parameters())):
        torch.testing.assert_close(p, q)


def test_zeroes_stale_gradients():
    net, head = _model_and_heads()
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.0)
    _loss(net, head, 1e3).backward()  # stale gradient that must not leak into the next step
    norm = optimise_step(opt, _loss(net, head))
    fresh, fresh_head = _model_and_heads()
    _loss(fresh, fresh_head).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in list(fresh.parameters()) + list(fresh_head.parameters())])
    assert norm == pytest.approx(float(expected))


def test_rejects_non_scalar_loss():
    net, head = _model_and_heads()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="scalar"):
        optimise_step(opt, head(net(torch.ones(2, 4))))


def test_optimised_parameters_are_unique():
    net, _ = _model_and_heads()
    opt = torch.optim.SGD([{"params": list(net.parameters())}], lr=0.1)
    assert len(optimised_parameters(opt)) == len(list(net.parameters()))


def test_contexts_are_noops_on_cpu():
    x = torch.ones(2, 2)
    with autocast_context(torch.device("cpu")), fp32_context(torch.device("cpu")):
        assert (x @ x).dtype == torch.float32
