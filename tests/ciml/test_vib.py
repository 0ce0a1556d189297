"""Gaussian KL of the messages and the beta warm-up."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_ext.ciml.vib import BetaSchedule, gaussian_kl, kl_density


def test_kl_of_the_prior_is_exactly_zero():
    mu, logvar = torch.zeros(2, 3, 4, 4, 4), torch.zeros(2, 3, 4, 4, 4)
    assert gaussian_kl(mu, logvar).item() == 0.0
    assert gaussian_kl(mu, logvar, reduction="sum").item() == 0.0


@pytest.mark.parametrize("mu, logvar, expected", [
    (1.0, 0.0, 0.5),                                  # 0.5 * mu^2
    (0.0, math.log(2.0), 0.5 * (2.0 - math.log(2.0) - 1.0)),
    (2.0, -1.0, 0.5 * (4.0 + math.exp(-1.0) + 1.0 - 1.0)),
])
def test_kl_known_values(mu, logvar, expected):
    for shape in ((1, 1, 3, 3), (1, 2, 3, 3, 3)):  # 2D and 3D
        value = gaussian_kl(torch.full(shape, mu), torch.full(shape, logvar))
        assert value.item() == pytest.approx(expected, rel=1e-6)


def test_kl_matches_formula_and_reductions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    per_element = 0.5 * (mu ** 2 + logvar.exp() - logvar - 1)
    torch.testing.assert_close(gaussian_kl(mu, logvar, "none"), per_element)
    torch.testing.assert_close(gaussian_kl(mu, logvar), per_element.mean())
    torch.testing.assert_close(gaussian_kl(mu, logvar, "sum"), per_element.sum())
    torch.testing.assert_close(kl_density(mu, logvar), per_element.sum(1, keepdim=True))
    torch.testing.assert_close(kl_density(mu, None), 0.5 * (mu ** 2).sum(1, keepdim=True))


def test_kl_gradient_wrt_mu_is_mu_over_n():
    mu = torch.randn(2, 3, 4, 4, requires_grad=True)
    gaussian_kl(mu, torch.zeros_like(mu)).backward()
    torch.testing.assert_close(mu.grad, mu.detach() / mu.numel())


def test_kl_is_fp32_and_finite_for_fp16_and_extreme_logvar():
    mu = torch.full((1, 2, 3, 3), 3.0, dtype=torch.float16)
    for extreme in (50.0, -50.0):
        logvar = torch.full((1, 2, 3, 3), extreme, dtype=torch.float16)
        value = gaussian_kl(mu, logvar, logvar_clamp=10.0)
        assert value.dtype == torch.float32 and torch.isfinite(value)
        clamped = torch.full((1, 2, 3, 3), math.copysign(10.0, extreme))
        torch.testing.assert_close(value, gaussian_kl(mu.float(), clamped))


@pytest.mark.parametrize("kwargs, match", [
    ({"reduction": "max"}, "reduction"),
    ({"logvar_clamp": 0.0}, "logvar_clamp"),
])
def test_kl_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gaussian_kl(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), **kwargs)


def test_kl_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        gaussian_kl(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2))


@pytest.mark.parametrize("epoch, num_epochs, expected", [
    (0, 100, 0.0), (5, 100, 0.5e-3), (10, 100, 1e-3), (99, 100, 1e-3), (1, 1000, 1e-5),
])
def test_beta_warmup(epoch, num_epochs, expected):
    assert BetaSchedule(1e-3, 0.1)(epoch, num_epochs) == pytest.approx(expected)


def test_beta_without_warmup_and_bad_options():
    assert BetaSchedule(2e-3, 0.0)(0, 10) == 2e-3
    with pytest.raises(ValueError, match="beta"):
        BetaSchedule(-1.0)
    with pytest.raises(ValueError, match="warmup"):
        BetaSchedule(1e-3, 1.5)
    with pytest.raises(ValueError, match="num_epochs"):
        BetaSchedule(1e-3)(0, 0)
