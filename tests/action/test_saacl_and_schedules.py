"""ACTION++ (simplex centres, Hungarian allocation, SAACL, temperature schedule) and the stage schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from nnunet_ext.action.saacl import AdaptiveCentreAllocator, SupervisedAnatomicalContrastLoss, simplex_centres
from nnunet_ext.action.schedules import (
    StagePolyLRScheduler,
    cosine_temperature,
    resolve_stage_epochs,
    stage_of_epoch,
    stage_starts,
)


@pytest.mark.parametrize("k, d", [(2, 2), (3, 128), (4, 3), (5, 16), (14, 128)])
def test_simplex_centres_are_evenly_spread_unit_vectors(k, d):
    centres = simplex_centres(k, d, seed=3)
    assert centres.shape == (k, d)
    assert torch.allclose(centres.norm(dim=1), torch.ones(k), atol=1e-5)
    cosine = centres @ centres.T
    off_diagonal = cosine[~torch.eye(k, dtype=torch.bool)]
    assert torch.allclose(off_diagonal, torch.full_like(off_diagonal, -1 / (k - 1)), atol=1e-5)
    assert torch.equal(centres, simplex_centres(k, d, seed=3))
    assert not torch.allclose(centres, simplex_centres(k, d, seed=4))


def test_simplex_needs_enough_dimensions():
    with pytest.raises(ValueError, match="dim >= 4"):
        simplex_centres(5, 3)
    assert torch.allclose(simplex_centres(1, 4).norm(), torch.tensor(1.0))


def test_hungarian_assignment_recovers_a_permutation_of_the_centres():
    allocator = AdaptiveCentreAllocator(4, 8, momentum=0.0)
    permutation = torch.tensor([2, 0, 3, 1])
    features = allocator.centres[permutation].repeat_interleave(5, 0) + 0.01 * torch.randn(20, 8)
    labels = torch.arange(4).repeat_interleave(5)
    allocator.update(features, labels)
    assert allocator.assignment().tolist() == permutation.tolist()


def test_centroid_ema_and_unseen_classes():
    allocator = AdaptiveCentreAllocator(3, 4, momentum=0.9)
    allocator.update(torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([0]))
    assert torch.allclose(allocator.centroids[0], torch.tensor([1.0, 0, 0, 0]))
    allocator.update(torch.tensor([[0, 1.0, 0, 0]]), torch.tensor([0]))
    assert torch.allclose(allocator.centroids[0], F.normalize(torch.tensor([0.9, 0.1, 0, 0]), dim=0))
    assert torch.equal(allocator.centroids[1:], torch.zeros(2, 4))
    with pytest.raises(ValueError):
        AdaptiveCentreAllocator(3, 4, momentum=1.0)


def test_random_centroid_init_as_the_official_code():
    torch.manual_seed(5)
    allocator = AdaptiveCentreAllocator(3, 4, momentum=0.9, centroid_init="random")
    start = allocator.centroids.clone()
    assert torch.allclose(start.norm(dim=1), torch.ones(3), atol=1e-6) and not torch.equal(start, torch.zeros(3, 4))
    allocator.update(torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([0]))
    expected = F.normalize(0.9 * start[0] + 0.1 * torch.tensor([1.0, 0, 0, 0]), dim=0)
    assert torch.allclose(allocator.centroids[0], expected, atol=1e-6)
    assert torch.equal(allocator.centroids[1:], start[1:])  # unseen classes keep their random centroid
    with pytest.raises(ValueError, match="centroid init"):
        AdaptiveCentreAllocator(3, 4, centroid_init="ones")


@pytest.mark.parametrize("count_centre, mask_empty_slots", [(True, True), (False, True), (True, False),
                                                          (False, False)])
def test_saacl_known_value(count_centre, mask_empty_slots):
    # one voxel of class 0; queue: one entry of class 0, one of class 1, one empty slot; two centres
    f = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.6, 0.8]])
    queue_labels = torch.tensor([0, 1, -1])
    centres = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    assignment = torch.tensor([1, 0])  # class 0 -> centre 1 = [1, 0]
    tau, lam = 0.5, 0.2
    loss = SupervisedAnatomicalContrastLoss(lam, tau, count_centre=count_centre,
                                            mask_empty_slots=mask_empty_slots)(
        f, t, torch.tensor([0]), queue, queue_labels, centres, assignment)
    # softmax entries: teacher 0, queue class 0: 1, queue class 1: -1, [empty slot 0.6], centres 0 and 1
    logits = [0.0, 1.0, -1.0] + ([] if mask_empty_slots else [0.6]) + [0.0, 1.0]
    log_p = F.log_softmax(torch.tensor(logits) / tau, 0)
    positives = 3 if count_centre else 2  # teacher + one queue entry (+ the centre)
    expected = -(log_p[0] + log_p[1] + lam * log_p[-1]) / positives
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    # the official value for this case, by hand: log Z = log(e^0 + e^2 + e^-2 + e^1.2 + e^0 + e^2) at tau = 0.5
    if count_centre and not mask_empty_slots:
        log_z = math.log(1 + 2 * math.exp(2) + math.exp(-2) + math.exp(1.2) + 1)
        official = -((0 - log_z) + (2 - log_z) + lam * (2 - log_z)) / 3
        assert float(loss) == pytest.approx(official, rel=1e-6)


def _dense_saacl_reference(f, t, labels, queue, queue_labels, centres, assignment, lam, tau, count_centre=True,
                           mask_empty_slots=True):
    """ACTION++ eq. 3-4 as the official code computes it (TSC.py, TSC_3d.forward): the full softmax over
    [teacher, queue, centres] with [n, Q] positive masks, #positives = mask sum (teacher + same-class queue entries
    + the assigned centre); optionally without the centre in #positives and with empty slots masked out."""
    f, t = F.normalize(f, dim=1), F.normalize(t, dim=1)
    queue, centres = F.normalize(queue, dim=1), F.normalize(centres, dim=1)
    logit_queue = f @ queue.T / tau
    if mask_empty_slots:
        logit_queue = logit_queue.masked_fill((queue_labels < 0).unsqueeze(0), float("-inf"))
    log_p = F.log_softmax(torch.cat([(f * t).sum(1, keepdim=True) / tau, logit_queue, f @ centres.T / tau], 1), 1)
    same = (queue_labels.unsqueeze(0) == labels.unsqueeze(1)).float()
    positives = log_p[:, 1:1 + queue.shape[0]].masked_fill(same == 0, 0.0).sum(1)
    centre = log_p.gather(1, (1 + queue.shape[0] + assignment[labels]).unsqueeze(1)).squeeze(1)
    count = 1.0 + same.sum(1) + (1.0 if count_centre else 0.0)
    return (-(log_p[:, 0] + positives + lam * centre) / count).mean()


@pytest.mark.parametrize("count_centre, mask_empty_slots", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("queue_size, empty", [(40, 0), (40, 15), (7, 7), (1, 0)])
def test_saacl_equals_the_dense_softmax_formulation_in_value_and_gradient(queue_size, empty, count_centre,
                                                                          mask_empty_slots):
    generator = torch.Generator().manual_seed(queue_size + empty)
    n, d, k, lam, tau = 12, 8, 3, 0.2, 0.3
    student = torch.randn(n, d, generator=generator, dtype=torch.float64).float().requires_grad_(True)
    teacher = torch.randn(n, d, generator=generator)
    labels = torch.randint(0, k, (n,), generator=generator)
    queue = torch.randn(queue_size, d, generator=generator)
    queue_labels = torch.randint(0, k, (queue_size,), generator=generator)
    queue_labels[:empty] = -1
    centres, assignment = simplex_centres(k, d), torch.tensor([2, 0, 1])
    loss = SupervisedAnatomicalContrastLoss(lam, tau, count_centre=count_centre, mask_empty_slots=mask_empty_slots)(
        student, teacher, labels, queue, queue_labels, centres, assignment)
    (grad,) = torch.autograd.grad(loss, student)
    reference_student = student.detach().clone().requires_grad_(True)
    reference = _dense_saacl_reference(reference_student, teacher, labels, queue, queue_labels, centres,
                                       assignment, lam, tau, count_centre, mask_empty_slots)
    (reference_grad,) = torch.autograd.grad(reference, reference_student)
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("count_centre, mask_empty_slots", [(True, True), (True, False), (False, True)])
def test_saacl_gradient_matches_finite_differences(count_centre, mask_empty_slots):
    """The formula's gradient (fp64 dense form, gradcheck) equals the fp32 implementation's autograd gradient."""
    generator = torch.Generator().manual_seed(11)
    n, d, k, lam, tau = 5, 4, 3, 0.2, 0.4
    student = torch.randn(n, d, generator=generator, dtype=torch.float64)
    teacher = torch.randn(n, d, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, k, (n,), generator=generator)
    queue = torch.randn(9, d, generator=generator, dtype=torch.float64)
    queue_labels = torch.tensor([0, 1, 2, 0, 1, -1, -1, 2, 0])
    centres, assignment = simplex_centres(k, d).double(), torch.tensor([1, 2, 0])

    def dense(s):
        return _dense_saacl_reference(s, teacher, labels, queue, queue_labels, centres, assignment, lam, tau,
                                      count_centre, mask_empty_slots)

    assert torch.autograd.gradcheck(dense, (student.clone().requires_grad_(True),))
    s32 = student.float().requires_grad_(True)
    loss = SupervisedAnatomicalContrastLoss(lam, tau, count_centre=count_centre, mask_empty_slots=mask_empty_slots)(
        s32, teacher.float(), labels, queue.float(), queue_labels, centres.float(), assignment)
    (grad,) = torch.autograd.grad(loss, s32)
    s64 = student.clone().requires_grad_(True)
    (grad64,) = torch.autograd.grad(dense(s64), s64)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options", [{"anchor_weight": -1.0}, {"temperature": 0.0}, {"count_centre": 1},
                                     {"mask_empty_slots": "yes"}])
def test_saacl_rejects_bad_options(options):
    with pytest.raises(ValueError):
        SupervisedAnatomicalContrastLoss(**options)


def test_saacl_gradients_only_reach_the_student_and_empty_input_is_zero():
    torch.manual_seed(0)
    s = torch.randn(6, 4, requires_grad=True)
    t = torch.randn(6, 4, requires_grad=True)
    loss = SupervisedAnatomicalContrastLoss()(s, t, torch.randint(0, 3, (6,)), torch.randn(5, 4),
                                              torch.randint(-1, 3, (5,)), simplex_centres(3, 4),
                                              torch.tensor([0, 1, 2]), temperature=0.3)
    loss.backward()
    assert s.grad is not None and t.grad is None and torch.isfinite(loss)
    empty = SupervisedAnatomicalContrastLoss()(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0),
                                               torch.randn(5, 4), torch.zeros(5), simplex_centres(3, 4),
                                               torch.arange(3))
    assert float(empty) == 0.0


def test_cosine_temperature_schedule():
    assert cosine_temperature(0, 100, 0.1, 1.0) == pytest.approx(1.0)
    assert cosine_temperature(50, 100, 0.1, 1.0) == pytest.approx(0.1)
    assert cosine_temperature(100, 100, 0.1, 1.0) == pytest.approx(1.0)
    assert cosine_temperature(25, 100, 0.1, 1.0) == pytest.approx(0.55)
    with pytest.raises(ValueError):
        cosine_temperature(0, 0, 0.1, 1.0)
    with pytest.raises(ValueError):
        cosine_temperature(0, 10, 1.0, 0.1)


@pytest.mark.parametrize("stage_epochs, num_epochs, expected", [
    ((100, 100, 800), 1000, (100, 100, 800)),
    ((100, 100, 800), 10, (1, 1, 8)),
    ((100, 100, 800), 3, (0, 0, 3)),
    ((1, 1, 1), 5, (1, 2, 2)),  # ties go to the later stages (stage iii matters most)
    ((0, 1, 3), 8, (0, 2, 6)),
])
def test_resolve_stage_epochs(stage_epochs, num_epochs, expected):
    resolved = resolve_stage_epochs(stage_epochs, num_epochs)
    assert resolved == expected and sum(resolved) == num_epochs


@pytest.mark.parametrize("stage_epochs", [(1, 2), (-1, 1, 1), (0, 0, 0)])
def test_resolve_stage_epochs_rejects_bad_values(stage_epochs):
    with pytest.raises(ValueError, match="stage_epochs"):
        resolve_stage_epochs(stage_epochs, 10)


def test_stage_of_epoch_and_restarted_poly_lr():
    epochs = (2, 0, 3)
    assert [stage_of_epoch(e, epochs) for e in range(6)] == [0, 0, 2, 2, 2, 2]
    assert stage_starts(epochs) == (0, 2, 2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = StagePolyLRScheduler(optimizer, 0.01, epochs)
    lrs = []
    for epoch in range(5):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == lrs[2] == 0.01  # restart at each stage
    assert lrs[1] == pytest.approx(0.01 * 0.5 ** 0.9)
    assert lrs[2] > lrs[3] > lrs[4] > 0
    assert math.isclose(scheduler.get_last_lr()[0], lrs[-1])
