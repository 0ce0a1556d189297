"""CAML's loss terms: sharpening, mutual consistency L_c and omni-correlation consistency L_o."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_ext.caml.losses import (
    ForegroundDiceLoss,
    correlation_consistency,
    correlation_logits,
    mutual_consistency_loss,
    omni_correlation_loss,
    sharpen,
    sharpen_logits,
)

SHAPES = [(2, 2, 5, 6), (2, 3, 4, 5, 3)]  # 2D and 3D, K = 2 and K = 3


def _logits(shape, seed=0, scale=2.0):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ sharpening
def test_sharpen_two_classes_equals_official_formula_and_softmax():
    logits = _logits((3, 2, 4, 4))
    p = torch.softmax(logits, 1)
    official = p ** 10 / (p ** 10 + (1 - p) ** 10)
    torch.testing.assert_close(sharpen(p, 0.1), official, atol=1e-6, rtol=0)
    torch.testing.assert_close(sharpen_logits(logits, 0.1), official, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_sharpen_is_a_distribution_with_uniform_fixed_point(shape):
    p = torch.softmax(_logits(shape), 1)
    s = sharpen(p, 0.1)
    torch.testing.assert_close(s.sum(1), torch.ones_like(s.sum(1)))
    assert (s.max(1).values >= p.max(1).values - 1e-6).all()  # sharper
    uniform = torch.full(shape, 1.0 / shape[1])
    torch.testing.assert_close(sharpen(uniform, 0.1), uniform)
    torch.testing.assert_close(sharpen(p, 1.0), p)


def test_sharpen_handles_exact_zeros():
    p = torch.tensor([[1.0, 0.0, 0.0]]).reshape(1, 3, 1)
    torch.testing.assert_close(sharpen(p, 0.1), p)


# ------------------------------------------------------------------ L_c
@pytest.mark.parametrize("shape", SHAPES)
def test_consistency_zero_at_fixed_points(shape):
    one_hot = 1e4 * torch.nn.functional.one_hot(torch.randint(0, shape[1], (shape[0], *shape[2:])),
                                                shape[1]).movedim(-1, 1).float()
    assert float(mutual_consistency_loss(one_hot, one_hot.clone())) < 1e-7
    uniform = torch.zeros(shape)
    assert float(mutual_consistency_loss(uniform, uniform.clone())) < 1e-7


@pytest.mark.parametrize("shape", SHAPES)
def test_consistency_positive_for_identical_soft_outputs_and_symmetric(shape):
    z_v, z_a = _logits(shape, 1), _logits(shape, 2)
    assert float(mutual_consistency_loss(z_v, z_v.clone())) > 1e-3
    torch.testing.assert_close(mutual_consistency_loss(z_v, z_a), mutual_consistency_loss(z_a, z_v))


def test_consistency_known_value_two_classes():
    # one voxel, p_v = (0.5, 0.5) -> S(p_v) = p_v; p_a = softmax((0, log 3)) = (0.25, 0.75)
    z_v = torch.zeros(1, 2, 1)
    z_a = torch.tensor([0.0, math.log(3.0)]).reshape(1, 2, 1)
    s_a = torch.tensor([0.25 ** 10, 0.75 ** 10]) / (0.25 ** 10 + 0.75 ** 10)
    expected = ((torch.tensor([0.5, 0.5]) - s_a) ** 2).mean() + ((torch.tensor([0.25, 0.75]) - 0.5) ** 2).mean()
    assert float(mutual_consistency_loss(z_v, z_a)) == pytest.approx(float(expected), rel=1e-6)


def test_consistency_gradients_through_prediction_and_sharpened_target():
    z_a = _logits((2, 3, 4, 4), 4)
    grads = {}
    for detach in (False, True):
        z_v = _logits((2, 3, 4, 4), 3).requires_grad_()
        mutual_consistency_loss(z_v, z_a, detach_targets=detach).backward()
        grads[detach] = z_v.grad
    # with detached targets only the prediction term MSE(P_v, S(P_a)) reaches z_v
    z_v = _logits((2, 3, 4, 4), 3).requires_grad_()
    ((torch.softmax(z_v, 1) - sharpen_logits(z_a, 0.1)) ** 2).mean().backward()
    torch.testing.assert_close(grads[True], z_v.grad)
    # officially S(P_v) is not detached: the target path adds a non-zero gradient
    assert float((grads[False] - grads[True]).abs().sum()) > 1e-6


def test_consistency_mask_excludes_voxels_and_averages_over_all_samples():
    z_v, z_a = _logits((2, 3, 4, 4), 5), _logits((2, 3, 4, 4), 6)
    full = mutual_consistency_loss(z_v, z_a)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    torch.testing.assert_close(mutual_consistency_loss(z_v, z_a, mask=mask), full)
    mask[1] = False  # only sample 0 counts
    torch.testing.assert_close(mutual_consistency_loss(z_v, z_a, mask=mask),
                               mutual_consistency_loss(z_v[:1], z_a[:1]))
    z_v = z_v.clone().requires_grad_()
    mutual_consistency_loss(z_v, z_a, mask=mask).backward()
    assert float(z_v.grad[1].abs().sum()) == 0.0
    assert float(mutual_consistency_loss(z_v.detach(), z_a, mask=torch.zeros_like(mask))) == 0.0


def test_consistency_fp16_inputs_give_finite_fp32():
    z_v = (1e4 * _logits((2, 3, 4, 4), 7)).half()
    z_a = (1e4 * _logits((2, 3, 4, 4), 8)).half()
    loss = mutual_consistency_loss(z_v, z_a)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ------------------------------------------------------------------ L_o on maps
def _rows(r, m, seed=0):
    return torch.softmax(3 * torch.randn(r, m, generator=torch.Generator().manual_seed(seed)), 1)


def test_correlation_consistency_properties():
    one_hot = torch.eye(6)[torch.tensor([0, 3, 5, 1])]
    assert abs(float(correlation_consistency(one_hot, one_hot))) < 1e-6
    soft = _rows(5, 6)
    entropy = float((-(soft * soft.log()).sum(1)).mean())
    assert float(correlation_consistency(soft, soft)) == pytest.approx(entropy, abs=1e-4)
    assert entropy > 0.1  # not zero when both maps agree on soft rows
    target = _rows(5, 6, 1)
    base = float(correlation_consistency(target, target))
    for seed in range(20):
        perturbed = torch.softmax(target.log() + 0.5 * torch.randn(5, 6, generator=torch.Generator().manual_seed(seed)),
                                  1)
        assert float(correlation_consistency(perturbed, target)) >= base - 1e-4
        assert float(correlation_consistency(perturbed, target)) >= -1e-6
    assert float(correlation_consistency(soft, target)) != pytest.approx(float(correlation_consistency(target, soft)))


def test_correlation_consistency_caps_a_row_at_minus_log_eps():
    c_v = torch.tensor([[1.0, 0.0]])
    c_a = torch.tensor([[0.0, 1.0]])
    assert float(correlation_consistency(c_v, c_a)) == pytest.approx(-math.log(1e-8), rel=1e-5)


def test_correlation_consistency_of_fp16_rows_with_zeros_is_finite():
    c = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]).half()
    loss = correlation_consistency(c, c)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ------------------------------------------------------------------ L_o from features
def test_correlation_logits_dot_product_and_cosine():
    u = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    q = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    torch.testing.assert_close(correlation_logits(u, q, 0.1), (u @ q.t()) / 0.1)
    cosine = correlation_logits(u, q, 0.5, normalize=True)
    assert float(cosine.abs().max()) <= 2.0 + 1e-6


def test_omni_correlation_loss_matches_maps_and_reaches_both_sides():
    g = torch.Generator().manual_seed(0)
    u_v = torch.randn(7, 4, generator=g).requires_grad_()
    u_a = torch.randn(7, 4, generator=g).requires_grad_()
    memory = torch.randn(10, 4, generator=g)
    loss = omni_correlation_loss(u_v, u_a, memory)
    expected = correlation_consistency(torch.softmax(u_v @ memory.t() / 0.1, 1),
                                       torch.softmax(u_a @ memory.t() / 0.1, 1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert u_v.grad.abs().sum() > 0 and u_a.grad.abs().sum() > 0
    u_a.grad = None
    omni_correlation_loss(u_v, u_a, memory, detach_targets=True).backward()
    assert u_a.grad is None or float(u_a.grad.abs().sum()) == 0.0


def test_omni_correlation_log_softmax_form_is_uncapped():
    u_v = torch.tensor([[10.0, 0.0]])
    u_a = torch.tensor([[0.0, 10.0]])
    memory = torch.eye(2)
    capped = float(omni_correlation_loss(u_v, u_a, memory))
    uncapped = float(omni_correlation_loss(u_v, u_a, memory, log_form="log_softmax"))
    assert capped == pytest.approx(-math.log(1e-8), rel=1e-3)
    assert uncapped == pytest.approx(100.0, rel=1e-3)


def test_omni_correlation_fp16_features_are_finite():
    u = (100 * torch.randn(4, 8)).half()
    memory = (100 * torch.randn(6, 8)).half()
    loss = omni_correlation_loss(u, u.clone(), memory.float())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ------------------------------------------------------------------ supervised Dice (paper recipe)
def test_foreground_dice_matches_the_official_binary_dice_over_the_batch():
    logits = _logits((2, 2, 4, 5), 9)
    target = torch.randint(0, 2, (2, 1, 4, 5), generator=torch.Generator().manual_seed(3))
    p = torch.softmax(logits, 1)[:, 1]
    y = (target[:, 0] == 1).float()
    official = 1 - (2 * (p * y).sum() + 1e-8) / (p.sum() + y.sum() + 1e-8)
    torch.testing.assert_close(ForegroundDiceLoss()(logits, target), official)


def test_foreground_dice_averages_classes_and_masks_the_ignore_label():
    logits = _logits((2, 3, 4, 5), 10)
    target = torch.randint(0, 3, (2, 1, 4, 5), generator=torch.Generator().manual_seed(4))
    p = torch.softmax(logits, 1)
    per_class = [1 - (2 * (p[:, c] * (target[:, 0] == c)).sum() + 1e-8) / (p[:, c].sum() + (target[:, 0] == c).sum()
                                                                         + 1e-8) for c in (1, 2)]
    torch.testing.assert_close(ForegroundDiceLoss()(logits, target), torch.stack(per_class).mean())
    ignored = target.clone()
    ignored[:, :, 0] = 3
    masked = logits.clone().requires_grad_()
    ForegroundDiceLoss(ignore_label=3)(masked, ignored).backward()
    assert float(masked.grad[:, :, 0].abs().sum()) == 0.0 and float(masked.grad.abs().sum()) > 0


@pytest.mark.parametrize("call, message", [
    (lambda: ForegroundDiceLoss(smooth=0), "smooth"),
    (lambda: ForegroundDiceLoss()(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3)), "2 output channels"),
    (lambda: sharpen(torch.ones(1, 2, 1), 0.0), "temperature"),
    (lambda: mutual_consistency_loss(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3)), "shapes differ"),
    (lambda: mutual_consistency_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), mask=torch.ones(1, 2, 3)), "mask"),
    (lambda: correlation_consistency(torch.ones(2, 3), torch.ones(2, 4)), "equal shape"),
    (lambda: correlation_consistency(torch.ones(0, 3), torch.ones(0, 3)), "non-empty"),
    (lambda: correlation_logits(torch.ones(2, 3), torch.ones(4, 2)), "expected features"),
    (lambda: omni_correlation_loss(torch.ones(2, 3), torch.ones(2, 3), torch.ones(4, 3), log_form="x"), "log form"),
    (lambda: omni_correlation_loss(torch.ones(2, 3), torch.ones(2, 3), torch.ones(4, 3, requires_grad=True)),
     "detached"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
