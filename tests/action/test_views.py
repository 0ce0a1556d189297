"""Student perturbations and CutMix/ClassMix masks."""
from __future__ import annotations

import pytest
import torch

from nnunet_ext.action.views import (
    StudentPerturbation,
    classmix_keep_mask,
    cutmix_keep_mask,
    gaussian_blur,
    mix_with_partner,
    partner_indices,
)


@pytest.mark.parametrize("shape", [(3, 2, 16, 16), (2, 1, 8, 10, 12)])
def test_perturbation_keeps_shape_and_input(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    original = x.clone()
    out = StudentPerturbation(p=1.0)(x)
    assert out.shape == x.shape and torch.equal(x, original) and not torch.allclose(out, x)
    assert torch.equal(StudentPerturbation(p=0.0)(x), x)


def test_brightness_only_scales_each_sample():
    torch.manual_seed(0)
    x = torch.rand(4, 2, 6, 6) + 1
    out = StudentPerturbation(p=1.0, contrast=(1.0, 1.0), blur_sigma=(1e-3, 1e-3))(x)
    ratio = out / x
    for b in range(4):
        assert torch.allclose(ratio[b], ratio[b].flatten()[0].expand_as(ratio[b]), atol=1e-4)
        assert 0.75 - 1e-4 <= float(ratio[b].flatten()[0]) <= 1.25 + 1e-4


def test_gaussian_blur_preserves_constants_and_mass():
    constant = torch.full((1, 12, 12, 12), 3.0)
    blurred = gaussian_blur(constant, 1.0)
    assert torch.allclose(blurred[:, 4:8, 4:8, 4:8], constant[:, 4:8, 4:8, 4:8], atol=1e-5)
    impulse = torch.zeros(1, 15, 15)
    impulse[0, 7, 7] = 1.0
    assert float(gaussian_blur(impulse, 0.8).sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kwargs", [{"p": 1.5}, {"brightness": (1.2, 0.8)}, {"blur_sigma": (0.0, 1.0)}])
def test_bad_perturbation_options(kwargs):
    with pytest.raises(ValueError):
        StudentPerturbation(**kwargs)


def test_partner_is_next_sample():
    assert partner_indices(4).tolist() == [1, 2, 3, 0]


@pytest.mark.parametrize("shape", [(64, 40, 48), (32, 30, 64, 64)])
def test_cutmix_box_covers_about_half_the_plane(shape):
    torch.manual_seed(0)
    keep = cutmix_keep_mask(shape, depth_span=20)
    h, w = shape[-2:]
    for b in range(shape[0]):
        box = ~keep[b]
        if len(shape) == 4:
            slices = box.any(-1).any(-1)
            assert int(slices.sum()) == min(20, shape[1])
            box = box[slices.nonzero()[0, 0]]
        rows, cols = box.any(1), box.any(0)
        box_h, box_w = int(rows.sum()), int(cols.sum())
        assert int(box.sum()) == box_h * box_w  # a rectangle
        assert w // 2 + 1 <= box_w < w
        assert abs(box_h * box_w - h * w / 2) <= box_w  # rounding of the height only


def test_classmix_keeps_half_of_the_present_classes():
    torch.manual_seed(0)
    pseudo = torch.tensor([[[0, 1, 2, 3], [0, 1, 2, -1]], [[1, 1, 1, 1], [1, 1, -1, -1]]])
    keep = classmix_keep_mask(pseudo)
    chosen = torch.unique(pseudo[0][keep[0]])
    assert chosen.numel() == 2 and bool((chosen >= 0).all())
    # the mask is exactly the union of the chosen classes
    assert torch.equal(keep[0], torch.isin(pseudo[0], chosen))
    assert not keep[1].any()  # one present class: floor(1/2) = 0 kept, everything from the partner


def test_mixing_uses_the_same_mask_and_partner_for_all_tensors():
    images = torch.arange(2 * 1 * 4, dtype=torch.float32).view(2, 1, 4)
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    confidence = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    keep = torch.tensor([[True, False, True, False], [False, False, True, True]])
    mixed_images, mixed_labels, mixed_conf = mix_with_partner(keep, images, labels, confidence)
    assert mixed_images[0, 0].tolist() == [0.0, 5.0, 2.0, 7.0]
    assert mixed_labels[1].tolist() == [0, 0, 2, 2]
    assert mixed_conf[0].tolist() == pytest.approx([0.1, 0.6, 0.3, 0.8])
    with pytest.raises(ValueError, match="cannot mix"):
        mix_with_partner(keep, torch.zeros(2, 1, 1, 4))
