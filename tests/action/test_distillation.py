"""Soft-negative similarity distillation and the local window geometry."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from nnunet_ext.action.distillation import (
    LocalWindowGeometry,
    masked_average_pool,
    similarity_kl,
    unfold_windows,
)


def _profiles(sims_t, sims_s, tau_t, tau_s):
    p_t = torch.softmax(torch.tensor(sims_t) / tau_t, 0)
    p_s = torch.softmax(torch.tensor(sims_s) / tau_s, 0)
    return float((p_t * (p_t.log() - p_s.log())).sum())


def test_known_similarity_profiles():
    # anchors are the unit axes, so each embedding's cosine profile is its normalised coordinates
    anchors = torch.eye(3)
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
    student = torch.tensor([[0.0, 1.0, 0.0], [0.6, 0.8, 0.0]])
    expected = (_profiles([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], 0.5, 0.25)
                + _profiles([0.6, 0.8, 0.0], [0.6, 0.8, 0.0], 0.5, 0.25)) / 2
    assert math.isclose(float(similarity_kl(student, teacher, anchors, 0.25, 0.5)), expected, rel_tol=1e-5)


def test_zero_when_identical_and_equal_temperatures_and_nonnegative_otherwise():
    torch.manual_seed(0)
    x, anchors = torch.randn(5, 8), torch.randn(7, 8)
    assert float(similarity_kl(x, x, anchors, 0.2, 0.2)) == pytest.approx(0.0, abs=1e-6)
    for _ in range(5):
        assert float(similarity_kl(torch.randn(5, 8), torch.randn(5, 8), anchors, 0.1, 0.01)) >= 0.0


def test_sharp_teacher_gives_one_hot_target_on_the_nearest_anchor():
    anchors = torch.eye(4)
    teacher = torch.tensor([[0.1, 0.9, 0.2, 0.0]])
    student = torch.randn(1, 4)
    loss = similarity_kl(student, teacher, anchors, tau_s=0.3, tau_t=1e-4)
    cross_entropy = -F.log_softmax(F.normalize(student, dim=1) @ anchors.T / 0.3, 1)[0, 1]
    assert float(loss) == pytest.approx(float(cross_entropy), rel=1e-4)


def test_permutation_invariant_fp32_finite_and_teacher_gets_no_gradient():
    torch.manual_seed(1)
    s = torch.randn(6, 8, requires_grad=True)
    t = torch.randn(6, 8, requires_grad=True)
    anchors = torch.randn(10, 8)
    perm = torch.randperm(6)
    a = similarity_kl(s, t, anchors, 0.1, 0.01)
    b = similarity_kl(s[perm], t[perm], anchors, 0.1, 0.01)
    assert torch.allclose(a, b, atol=1e-6)
    half = similarity_kl(s.half(), t.half(), anchors.half(), 0.1, 0.01)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    a.backward()
    assert s.grad is not None and t.grad is None


def test_row_weights_drop_rows():
    torch.manual_seed(2)
    s, t, anchors = torch.randn(4, 5), torch.randn(4, 5), torch.randn(6, 5)
    weighted = similarity_kl(s, t, anchors, 0.1, 0.05, weights=torch.tensor([1.0, 0.0, 1.0, 0.0]))
    kept = similarity_kl(s[[0, 2]], t[[0, 2]], anchors, 0.1, 0.05)
    assert torch.allclose(weighted, kept, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"tau_s": 0.0, "tau_t": 0.1}, "tau_s"),
    ({"tau_s": 0.1, "tau_t": float("nan")}, "tau_t"),
])
def test_bad_temperatures(kwargs, message):
    with pytest.raises(ValueError, match=message):
        similarity_kl(torch.randn(2, 3), torch.randn(2, 3), torch.randn(4, 3), **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="anchors"):
        similarity_kl(torch.randn(2, 3), torch.randn(2, 3), torch.randn(4, 5), 0.1, 0.1)


@pytest.mark.parametrize("patch, cells", [((32, 32), 4), ((24, 16, 32), 2), ((64, 48), 8), ((16, 32, 32), 4)])
def test_pool_then_unfold_equals_adaptive_pooling_of_every_window(patch, cells):
    """Spec acceptance check 1: per-window AdaptiveAvgPool(s) == one pool + unfold (and pointwise heads commute)."""
    torch.manual_seed(0)
    geometry = LocalWindowGeometry.from_patch(patch, cells)
    x = torch.randn(2, 3, *patch)
    pooled, fraction = geometry.pool(x, None)
    assert torch.equal(fraction, torch.ones_like(fraction))
    windows = geometry.windows(pooled)
    assert windows.shape == (2, geometry.num_windows, geometry.vector_dim(3))
    adaptive = F.adaptive_avg_pool2d if len(patch) == 2 else F.adaptive_avg_pool3d
    k = geometry.kernel
    window_sizes = [c * kk for c, kk in zip(geometry.cells, k)]
    steps = [s * kk for s, kk in zip(geometry.strides, k)]
    positions = torch.cartesian_prod(*[torch.arange(0, (g - c) // s + 1) for g, c, s in
                                       zip(geometry.grid, geometry.cells, geometry.strides)])
    positions = positions.view(-1, len(patch))
    for w, pos in enumerate(positions.tolist()):
        slices = tuple(slice(p * st, p * st + ws) for p, st, ws in zip(pos, steps, window_sizes))
        direct = adaptive(x[(slice(None), slice(None), *slices)], geometry.cells).flatten(1)
        assert torch.allclose(windows[:, w], direct, atol=1e-6)
    # a pointwise (1x1) head applied on the pooled grid equals the head applied per window cell
    weight = torch.randn(3, 3)
    head_then_unfold = geometry.windows(torch.einsum("oc,bc...->bo...", weight, pooled))
    unfold_then_head = torch.einsum("oc,bwc...->bwo...", weight,
                                    windows.view(2, -1, 3, *geometry.cells)).flatten(2)
    assert torch.allclose(head_then_unfold, unfold_then_head, atol=1e-5)


def test_geometry_of_typical_patches():
    assert LocalWindowGeometry.from_patch((128, 128, 128), 4).num_windows == 7 ** 3
    assert LocalWindowGeometry.from_patch((256, 256), 8).num_windows == 7 ** 2
    thin = LocalWindowGeometry.from_patch((6, 64, 64), 4)
    assert thin.kernel[0] == 1 and thin.cells[0] == 4 and thin.num_windows == 2 * 7 * 7
    with pytest.raises(ValueError, match="positive integer"):
        LocalWindowGeometry.from_patch((32, 32), 0)


def test_masked_pool_ignores_invalid_voxels():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    valid = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    valid[..., :2, :1] = True  # two voxels of the top-left cell: values 0 and 4
    pooled, fraction = masked_average_pool(x, valid, (2, 2))
    assert pooled[0, 0, 0, 0] == 2.0 and fraction[0, 0, 0, 0] == 0.5
    assert pooled[0, 0, 1, 1] == 0.0 and fraction[0, 0, 1, 1] == 0.0
    with pytest.raises(ValueError, match="kernel"):
        masked_average_pool(x, None, (2,))


def test_unfold_rejects_windows_larger_than_the_grid():
    with pytest.raises(ValueError, match="does not fit"):
        unfold_windows(torch.zeros(1, 1, 3, 8), (4, 4), (2, 2))
