"""HRM losses and class prototypes (spec §3, acceptance checks 1-4)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ext.cfcml.losses import HierarchicalAnchorLoss, class_prototypes


def original_hrm(features: torch.Tensor, labels: torch.Tensor, num_classes: int, tau: float, eps: float = 1e-8):
    """Direct loop transcription of the official formula ((s+1)/τ, ε inside the log), in float64, all classes
    present. Written from the spec's equations, independently of the vectorised implementation."""
    features = features.double()
    modalities, batch, _ = features.shape
    n = [int((labels == k).sum()) for k in range(num_classes)]
    fn = F.normalize(features, dim=-1)
    protos = torch.stack([torch.stack([F.normalize(fn[m][labels == k].mean(0), dim=0) for k in range(num_classes)])
                          for m in range(modalities)])
    cross = torch.stack([F.normalize(fn[:, labels == k].sum((0, 1)) / (modalities * n[k]), dim=0)
                         for k in range(num_classes)])

    def ell(anchor, positives, negatives):
        e = lambda v: torch.exp((F.cosine_similarity(anchor, v, dim=0) + 1) / tau)  # noqa: E731
        pos = sum(e(p) for p in positives)
        neg = sum((e(q) for q in negatives), torch.zeros((), dtype=torch.float64))
        return -torch.log(pos / (pos + neg) + eps)

    l_sam = 0.0
    for m in range(modalities):
        for i in range(batch):
            k = int(labels[i])
            positives = [cross[k]] + [protos[mm, k] for mm in range(modalities)]
            negatives = [features[m, j] for j in range(batch) if labels[j] != k]
            l_sam = l_sam + ell(features[m, i], positives, negatives) / n[k]
    l_up = sum(ell(protos[m, k], [cross[k]], [protos[mm, ll] for mm in range(modalities) for ll in range(num_classes)
                                              if ll != k]) for m in range(modalities) for k in range(num_classes))
    l_up = l_up / modalities
    l_cp = sum(ell(cross[k], [protos[m, k] for m in range(modalities)], [cross[ll] for ll in range(num_classes)
                                                                        if ll != k]) for k in range(num_classes))
    return l_sam, l_up, l_cp / num_classes


@pytest.mark.parametrize("modalities,batch,num_classes,tau", [(2, 6, 2, 0.07), (3, 9, 3, 0.07), (2, 8, 4, 0.5)])
def test_lse_form_equals_the_original_formula(modalities, batch, num_classes, tau):
    torch.manual_seed(0)
    features = torch.randn(modalities, batch, 16)
    labels = torch.arange(batch) % num_classes
    ours = HierarchicalAnchorLoss(tau)(features, labels, num_classes)
    reference = original_hrm(features, labels, num_classes, tau)
    for a, b in zip(ours, reference):
        assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_known_values_on_orthogonal_features():
    # one modality, two samples: f0 = e1 (class 0), f1 = e2 (class 1) -> every prototype is its sample's vector
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    labels = torch.tensor([0, 1])
    tau = 1.0
    l_sam, l_up, l_cp = HierarchicalAnchorLoss(tau)(features, labels, 2)
    e = math.exp(1.0 / tau)
    # sample anchor: positives c[k], p[0,k] (cos 1 each); negative: the other sample (cos 0)
    per_sample = math.log(2 * e + 1) - math.log(2 * e)
    assert float(l_sam) == pytest.approx(2 * per_sample, rel=1e-6)
    # prototype anchors: one positive (cos 1), one negative (cos 0)
    per_prototype = math.log(e + 1) - math.log(e)
    assert float(l_up) == pytest.approx(2 * per_prototype, rel=1e-6)  # (1/M) Σ_m Σ_k, M = 1
    assert float(l_cp) == pytest.approx(per_prototype, rel=1e-6)  # (1/K) Σ_k, K = 2


def test_single_class_batch_gives_exactly_zero():
    torch.manual_seed(1)
    losses = HierarchicalAnchorLoss()(torch.randn(2, 5, 8), torch.zeros(5, dtype=torch.long), 3)
    assert all(float(v) == 0.0 for v in losses)


def test_absent_class_contributes_nothing():
    torch.manual_seed(2)
    features = torch.randn(3, 6, 8)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    with_absent = HierarchicalAnchorLoss()(features, labels, 3)  # class 2 absent
    two_classes = HierarchicalAnchorLoss()(features, labels, 2)
    assert all(torch.isfinite(v) for v in with_absent)
    assert float(with_absent[0]) == pytest.approx(float(two_classes[0]), rel=1e-6)
    assert float(with_absent[1]) == pytest.approx(float(two_classes[1]), rel=1e-6)
    # L_cp is averaged over all K classes: (1/3) vs (1/2) of the same sum
    assert 3 * float(with_absent[2]) == pytest.approx(2 * float(two_classes[2]), rel=1e-6)


def test_permutation_invariance_and_gradients():
    torch.manual_seed(3)
    features = torch.randn(2, 8, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss = HierarchicalAnchorLoss()
    perm = torch.randperm(8)
    for a, b in zip(loss(features, labels, 3), loss(features[:, perm], labels[perm], 3)):
        assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-5)
    total = sum(loss(features, labels, 3))
    total.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


def test_finite_for_half_precision_features():
    torch.manual_seed(4)
    features = (torch.randn(2, 6, 8) * 50).half()  # as produced under fp16 autocast
    losses = HierarchicalAnchorLoss()(features, torch.arange(6) % 2, 2)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses)


def test_clustered_features_give_lower_losses_than_random():
    torch.manual_seed(5)
    labels = torch.arange(9) % 3
    random = torch.randn(2, 9, 3)
    clustered = F.one_hot(labels, 3).float()[None].repeat(2, 1, 1)  # same-class identical, classes orthogonal
    loss = HierarchicalAnchorLoss()
    for low, high in zip(loss(clustered, labels, 3), loss(random, labels, 3)):
        assert float(low) < float(high)


def test_prototypes_unit_norm_absent_zero_and_crossmodal_mean():
    torch.manual_seed(6)
    features = torch.randn(3, 6, 4)
    labels = torch.tensor([0, 0, 1, 1, 0, 1])  # class 2 absent; equal counts for 0 and 1
    unimodal, crossmodal, present = class_prototypes(features, labels, 3)
    assert unimodal.shape == (3, 3, 4) and crossmodal.shape == (3, 4)
    assert present.tolist() == [True, True, False]
    assert torch.allclose(unimodal[:, :2].norm(dim=-1), torch.ones(3, 2), atol=1e-6)
    assert torch.allclose(crossmodal[:2].norm(dim=-1), torch.ones(2), atol=1e-6)
    assert torch.equal(unimodal[:, 2], torch.zeros(3, 4)) and torch.equal(crossmodal[2], torch.zeros(4))
    fn = F.normalize(features, dim=-1)
    for k in (0, 1):
        class_means = fn[:, labels == k].mean(1)  # un-normalised per-modality means [M, d]
        assert torch.allclose(crossmodal[k], F.normalize(class_means.mean(0), dim=0), atol=1e-6)


@pytest.mark.parametrize("kwargs,call,message", [
    ({"temperature": 0.0}, None, "temperature"),
    ({}, (torch.randn(2, 4, 3), torch.tensor([0, 1, 2, 0]), 2), "labels must lie"),
    ({}, (torch.randn(2, 4, 3), torch.tensor([0, 0, 0, 0]), 1), "num_classes"),
])
def test_bad_options(kwargs, call, message):
    with pytest.raises(ValueError, match=message):
        loss = HierarchicalAnchorLoss(**kwargs)
        loss(*call)


def test_bad_shapes():
    with pytest.raises(ValueError, match="features must be"):
        class_prototypes(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="labels must be"):
        class_prototypes(torch.randn(2, 4, 3), torch.zeros(5, dtype=torch.long), 2)
