"""Stage iii: confidence-weighted pseudo-label CE, hard-pixel sampler, negative sampler, anatomical contrast."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from nnunet_ext.action.anco import AnatomicalContrastLoss, confidence_weighted_ce, sample_negatives
from nnunet_ext.action.sampling import HardPixelSampler, gather_decoder_features, sample_pixels_per_class


# ------------------------------------------------------------------ confidence-weighted CE
@pytest.mark.parametrize("spatial", [(4, 5), (3, 4, 5)])
def test_omega_is_the_confident_fraction_and_ignored_pixels_get_no_gradient(spatial):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, *spatial, requires_grad=True)
    pseudo = torch.randint(0, 3, (2, *spatial))
    pseudo[0].view(-1)[:3] = -1
    confidence = torch.rand(2, *spatial)
    confidence[1].view(-1)[:5] = 0.99
    loss, omega = confidence_weighted_ce(logits, pseudo, confidence, threshold=0.97)
    for b in range(2):
        valid = pseudo[b] >= 0
        assert float(omega[b]) == pytest.approx(float(((confidence[b] >= 0.97) & valid).sum() / valid.sum()))
    per_pixel = F.cross_entropy(logits, pseudo, ignore_index=-1, reduction="none")
    weighted = omega.view(-1, *([1] * len(spatial))) * per_pixel
    assert float(loss.detach()) == pytest.approx(float(weighted[per_pixel > 0].mean().detach()), rel=1e-5)
    loss.backward()
    ignored = (pseudo == -1).unsqueeze(1).expand_as(logits)
    assert torch.all(logits.grad[ignored] == 0)


def test_all_ignored_gives_zero_loss():
    logits = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss, omega = confidence_weighted_ce(logits, torch.full((1, 3, 3), -1), torch.ones(1, 3, 3))
    assert float(loss.detach()) == 0.0 and float(omega[0]) == 0.0
    loss.backward()


def test_confidence_ce_shape_errors():
    with pytest.raises(ValueError, match="pseudo-labels"):
        confidence_weighted_ce(torch.randn(1, 2, 3, 3), torch.zeros(1, 3, 4, dtype=torch.long), torch.ones(1, 3, 4))


# ------------------------------------------------------------------ pixel sampler
@pytest.mark.parametrize("spatial", [(6, 7), (4, 5, 6)])
def test_sampler_returns_only_low_confidence_queries_and_respects_caps(spatial):
    torch.manual_seed(0)
    labels = torch.randint(-1, 3, (2, *spatial))
    probability = torch.rand(2, *spatial)
    sampler = HardPixelSampler(num_queries=16, max_prototype_pixels=10, strong_threshold=0.5)
    samples = sampler(labels, probability, num_classes=4)
    assert [s.class_id for s in samples] == [c for c in range(4) if (labels == c).any()]
    flat_labels, flat_prob = labels.reshape(-1), probability.reshape(-1)
    for s in samples:
        members = int((labels == s.class_id).sum())
        assert s.prototype_index.numel() == min(10, members)
        assert s.prototype_index.unique().numel() == s.prototype_index.numel()  # no duplicates
        assert bool((flat_labels[s.prototype_index] == s.class_id).all())
        assert s.query_index.numel() == 16
        assert bool((flat_labels[s.query_index] == s.class_id).all())
        assert bool((flat_prob[s.query_index] < 0.5).all())


def test_sampler_class_without_hard_pixels_has_no_queries():
    labels = torch.tensor([[0, 0, 1, 1]])
    probability = torch.tensor([[0.99, 0.99, 0.2, 0.99]])
    samples = HardPixelSampler(num_queries=8, strong_threshold=0.97)(labels, probability, 2)
    assert samples[0].query_index.numel() == 0
    assert samples[1].query_index.tolist() == [2] * 8


@pytest.mark.parametrize("kwargs", [{"num_queries": 0}, {"max_prototype_pixels": -3}, {"strong_threshold": 0.0}])
def test_sampler_bad_options(kwargs):
    with pytest.raises(ValueError):
        HardPixelSampler(**kwargs)


def test_sample_pixels_per_class():
    labels = torch.tensor([[[0, 2], [2, -1]]])
    index, classes = sample_pixels_per_class(labels, 5, 3)
    assert classes.tolist() == [0] * 5 + [2] * 5
    assert bool((labels.reshape(-1)[index] == classes).all())


@pytest.mark.parametrize("spatial", [(8, 8), (4, 8, 8)])
def test_gather_decoder_features_reads_the_containing_cell(spatial):
    full = torch.randn(2, 3, *spatial)
    half = torch.randn(2, 5, *[s // 2 for s in spatial])
    flat = torch.tensor([0, 17, int(torch.tensor(spatial).prod()) + 9])
    out = gather_decoder_features([full, half], flat, (2, *spatial))
    assert out.shape == (3, 8)
    for row, index in enumerate(flat.tolist()):
        coords = torch.unravel_index(torch.tensor(index), (2, *spatial))
        b, rest = int(coords[0]), [int(c) for c in coords[1:]]
        assert torch.equal(out[row, :3], full[(b, slice(None), *rest)])
        assert torch.equal(out[row, 3:], half[(b, slice(None), *[c // 2 for c in rest])])
    with pytest.raises(ValueError, match="does not match"):
        gather_decoder_features([torch.randn(3, 1, *spatial)], flat, (2, *spatial))


# ------------------------------------------------------------------ negatives
def test_negative_sampler_frequencies_match_the_class_distribution():
    torch.manual_seed(0)
    probabilities = torch.tensor([0.0, 0.2, 0.5, 0.3])
    sizes = torch.tensor([4, 3, 10, 2])
    classes, index = sample_negatives(probabilities, sizes, num_queries=200, num_negatives=500)
    counts = torch.bincount(classes.flatten(), minlength=4).float()
    assert counts[0] == 0  # never the query's own class
    expected = probabilities[1:] * classes.numel()
    chi_square = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi_square < 13.8  # 99.9 % quantile of chi2 with 2 degrees of freedom
    offsets = torch.cumsum(sizes, 0) - sizes
    assert bool(((index >= offsets[classes]) & (index < offsets[classes] + sizes[classes])).all())


# ------------------------------------------------------------------ anatomical contrast
def _toy(separation: float, n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    pools = [centres[c] * separation + torch.randn(n, 3, generator=g) for c in range(3)]
    return pools


def test_anco_known_value_with_one_negative_class():
    # two classes; prototypes are the axes; one query per class; all negatives come from the other class's pool
    prototypes = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    queries = [torch.tensor([[1.0, 1.0]]), torch.zeros(0, 2)]
    loss = AnatomicalContrastLoss(num_negatives=3, temperature=0.5)(prototypes, queries)
    cos = 1 / math.sqrt(2)
    per_query = -math.log(math.exp(cos / 0.5) / (math.exp(cos / 0.5) + 3 * math.exp(cos / 0.5)))
    # class 1 has no hard query: contributes 0 but counts in the denominator
    assert float(loss) == pytest.approx(per_query / 2, rel=1e-5)


def _dense_anco_reference(prototype_features, query_features, num_negatives, tau):
    """L_anco with similarities to every pool row, gathered at the sampled negatives (the draws of
    ``sample_negatives`` in the same order as the loss, so the same global RNG state gives the same negatives)."""
    pools = [F.normalize(p.float(), dim=1) for p in prototype_features]
    prototypes = F.normalize(torch.stack([p.float().mean(0) for p in prototype_features]), dim=1)
    pool_all, sizes = torch.cat(pools), torch.tensor([p.shape[0] for p in pools])
    relation, total = prototypes @ prototypes.T / tau, 0.0
    for c, queries in enumerate(query_features):
        if queries.shape[0] == 0:
            continue
        q = F.normalize(queries.float(), dim=1)
        others = relation[c].clone()
        others[c] = float("-inf")
        _, index = sample_negatives(torch.softmax(others, 0), sizes, q.shape[0], num_negatives)
        logits = torch.cat([((q @ prototypes[c]) / tau).unsqueeze(1), torch.gather(q @ pool_all.T / tau, 1, index)], 1)
        total = total + F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))
    return total / len(prototype_features)


@pytest.mark.parametrize("sizes, with_queries", [
    ((30, 7, 12), (True, True, True)), ((5, 40, 9, 3), (False, True, True, True)), ((8, 8), (True, False))])
def test_anco_equals_the_dense_similarity_formulation_in_value_and_gradient(sizes, with_queries):
    generator = torch.Generator().manual_seed(len(sizes))
    prototypes = [torch.randn(n, 6, generator=generator) for n in sizes]
    queries = [torch.randn(5 if keep else 0, 6, generator=generator).requires_grad_(True) for keep in with_queries]
    torch.manual_seed(3)
    loss = AnatomicalContrastLoss(num_negatives=20, temperature=0.4)(prototypes, queries)
    grads = torch.autograd.grad(loss, [q for q in queries if q.shape[0]])
    torch.manual_seed(3)
    reference = _dense_anco_reference(prototypes, queries, 20, 0.4)
    reference_grads = torch.autograd.grad(reference, [q for q in queries if q.shape[0]])
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    for grad, reference_grad in zip(grads, reference_grads):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-6)


def test_anco_is_zero_with_one_valid_class_and_gradients_reach_only_queries():
    q = torch.randn(4, 3, requires_grad=True)
    assert float(AnatomicalContrastLoss()([torch.randn(5, 3)], [q])) == 0.0
    prototypes = [p.requires_grad_() for p in _toy(3.0)]
    queries = [torch.randn(8, 3, requires_grad=True) for _ in range(3)]
    loss = AnatomicalContrastLoss(num_negatives=16)(prototypes, queries)
    loss.backward()
    assert all(p.grad is None for p in prototypes)
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in queries)


def test_anco_decreases_when_queries_move_towards_their_prototype():
    torch.manual_seed(0)
    pools = _toy(4.0)
    far = [torch.randn(16, 3) for _ in range(3)]
    near = [p.mean(0, keepdim=True).repeat(16, 1) + 0.05 * torch.randn(16, 3) for p in pools]
    loss_fn = AnatomicalContrastLoss(num_negatives=64)
    torch.manual_seed(1)
    loss_far = float(loss_fn(pools, far))
    torch.manual_seed(1)
    loss_near = float(loss_fn(pools, near))
    assert loss_near < loss_far


def test_anco_bad_options():
    with pytest.raises(ValueError):
        AnatomicalContrastLoss(num_negatives=0)
    with pytest.raises(ValueError):
        AnatomicalContrastLoss(temperature=0.0)
    with pytest.raises(ValueError, match="one prototype set"):
        AnatomicalContrastLoss()([torch.randn(2, 3)], [])
