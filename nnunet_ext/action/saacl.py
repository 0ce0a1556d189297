"""ACTION++: supervised adaptive anatomical contrast (SAACL) with fixed, evenly spread class centres.

You et al., "ACTION++: Improving Semi-supervised Medical Image Segmentation with Adaptive Anatomical Contrast",
MICCAI 2023 (arXiv 2304.02689), section 2.2 and spec 8.2. The official code loads the centres from
``optimal_{C}_{D}.npy`` files that are not shipped; for K <= d + 1 classes the optimum of the uniformity objective
is a regular simplex, built here in closed form.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from nnunet_ext.training.distributed import all_reduce_sum_

CENTROID_INITS = ("zeros", "random")


def simplex_centres(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``num_classes`` unit vectors in R^dim with pairwise cosine -1/(K-1) (a regular simplex), ``[K, dim]`` fp32.

    Centred one-hot vectors span a (K-1)-dimensional subspace; their coordinates in an orthonormal basis of that
    subspace are mapped into R^dim by a seeded random orthonormal map, so the result is deterministic per seed.

    Raises:
        ValueError: if ``num_classes > dim + 1`` (no simplex fits; the centres would have to be optimised).
    """
    if num_classes < 1 or dim < 1:
        raise ValueError(f"need num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")
    if num_classes > dim + 1:
        raise ValueError(f"{num_classes} evenly spread centres need dim >= {num_classes - 1}, got dim={dim}; "
                         f"increase the representation dimension")
    generator = torch.Generator().manual_seed(seed)
    if num_classes == 1:
        return F.normalize(torch.randn(1, dim, generator=generator, dtype=torch.float64), dim=1).float()
    centred = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    # orthonormal basis of the subspace orthogonal to the all-ones vector
    basis, _ = torch.linalg.qr(centred)
    basis = basis[:, : num_classes - 1]
    coordinates = centred @ basis                                         # [K, K-1]
    embedding, _ = torch.linalg.qr(torch.randn(dim, num_classes - 1, generator=generator, dtype=torch.float64))
    return F.normalize(coordinates @ embedding.T, dim=1).float()         # [K, dim]


class AdaptiveCentreAllocator(nn.Module):
    """Fixed centres psi and EMA class centroids phi; classes are assigned to centres by the Hungarian method.

    ``phi_c <- normalise(m * phi_c + (1 - m) * normalise(batch mean_c))`` for classes present in the batch
    (``m = 0.9``), then ``pi* = argmin_perm sum_c -phi_c . psi_pi(c)`` (SciPy ``linear_sum_assignment``, imported
    lazily). Buffers: ``centres`` ``[K, d]``, ``centroids`` ``[K, d]``.

    Args:
        centroid_init: ``"zeros"`` (default): a class's first batch mean becomes its centroid, so the assignment
            follows the data from the first step (a class not seen yet has a zero cost row); ``"random"``: random
            unit vectors from the global torch RNG, as the official code (``TSC.py``, ``class_centroid``), whose
            weight in the centroid decays as ``m^steps`` (the first assignments are partly random).
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9, seed: int = 0,
                 centroid_init: str = "zeros"):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"centroid momentum must be in [0, 1), got {momentum}")
        if centroid_init not in CENTROID_INITS:
            raise ValueError(f"unknown centroid init {centroid_init!r}; expected one of {CENTROID_INITS}")
        self.momentum = momentum
        self.register_buffer("centres", simplex_centres(num_classes, dim, seed))
        centroids = torch.zeros(num_classes, dim)
        if centroid_init == "random":
            centroids = F.normalize(torch.randn(num_classes, dim), dim=1)
        self.register_buffer("centroids", centroids)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """EMA of the normalised class means of ``features`` ``[n, d]`` with ``labels`` ``[n]`` (-1 ignored).

        Under DDP the class means are over all ranks' rows (per-class sums and counts all-reduced; a collective),
        so the centroids and the Hungarian assignment stay identical on every rank.
        """
        features = F.normalize(features.detach().float(), dim=1)
        keep = labels >= 0
        sums = torch.zeros_like(self.centroids).index_add_(0, labels[keep].long(), features[keep])
        counts = torch.bincount(labels[keep].long(), minlength=self.centroids.shape[0]).to(sums.dtype)
        all_reduce_sum_(sums)  # identity in a single process
        all_reduce_sum_(counts)
        for c in torch.nonzero(counts > 0).flatten().tolist():
            mean = F.normalize(sums[c] / counts[c], dim=0)
            self.centroids[c] = F.normalize(self.momentum * self.centroids[c] + (1 - self.momentum) * mean, dim=0)

    @torch.no_grad()
    def assignment(self) -> torch.Tensor:
        """``[K]`` long: the centre index assigned to each class (maximum total centroid-centre similarity)."""
        from scipy.optimize import linear_sum_assignment

        cost = -(self.centroids.float() @ self.centres.float().T).cpu().numpy()
        rows, cols = linear_sum_assignment(cost)
        result = torch.empty(len(rows), dtype=torch.long)
        result[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
        return result.to(self.centres.device)


class SupervisedAnatomicalContrastLoss(nn.Module):
    """SAACL (ACTION++ eq. 3-4) on sampled labelled voxels, in fp32.

    For voxel i with student feature f_i, label y_i: positives are the teacher feature at the same voxel, queue
    entries of class y_i and (weighted by ``anchor_weight``) the assigned centre nu_i; the softmax runs over
    [teacher feature, queue entries, all centres] at temperature tau:

        L_i = -[ sum_{f+} log softmax(f_i . f+ / tau) + lambda_a log softmax(f_i . nu_i / tau) ] / #positives_i

    with #positives_i = 1 + |queue entries of class y_i| + 1 (the centre), as the official code (``TSC.py``,
    ``TSC_3d.forward``: ``mask_pos_view.sum(1)``). The loss is the mean over voxels. Features are L2-normalised here.

    Args:
        anchor_weight: lambda_a (0.2, paper and 3D code).
        temperature: tau_sa (0.07); may be overridden per call (ACTION++'s temperature schedule).
        count_centre: whether the assigned centre counts in #positives_i (official code); False gives
            1 + |queue entries of class y_i| (this package before issue 20). Either way the centre term carries
            lambda_a.
        mask_empty_slots: whether queue slots labelled -1 (not filled yet; the queue starts as random unit rows)
            are left out of the softmax. The official code keeps them in the softmax as negatives until the queue
            has been filled once; they are never positives either way.
    """

    def __init__(self, anchor_weight: float = 0.2, temperature: float = 0.07, count_centre: bool = True,
                 mask_empty_slots: bool = True):
        super().__init__()
        if anchor_weight < 0:
            raise ValueError(f"anchor_weight must be >= 0, got {anchor_weight}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        for name, flag in (("count_centre", count_centre), ("mask_empty_slots", mask_empty_slots)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.anchor_weight = anchor_weight
        self.temperature = temperature
        self.count_centre = count_centre
        self.mask_empty_slots = mask_empty_slots

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                queue_features: torch.Tensor, queue_labels: torch.Tensor, centres: torch.Tensor,
                assignment: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """Shapes: student/teacher ``[n, d]``, labels ``[n]`` (>= 0), queue ``[Q, d]`` + ``[Q]`` (-1 = empty slot),
        centres ``[K, d]``, assignment ``[K]`` (class -> centre). Returns a scalar (0 with gradient path when n = 0)."""
        tau = self.temperature if temperature is None else temperature
        if not tau > 0:
            raise ValueError(f"temperature must be positive, got {tau}")
        if student.shape != teacher.shape or student.shape[0] != labels.shape[0]:
            raise ValueError(f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)} and labels "
                             f"{tuple(labels.shape)} must agree")
        if student.shape[0] == 0:
            return student.float().sum() * 0
        f = F.normalize(student.float(), dim=1)
        t = F.normalize(teacher.detach().float(), dim=1)
        queue = F.normalize(queue_features.detach().float(), dim=1)
        queue_labels = queue_labels.long()
        filled = queue_labels >= 0
        filled_queue, filled_labels = queue[filled], queue_labels[filled]
        in_softmax = filled_queue if self.mask_empty_slots else queue
        centres = F.normalize(centres.detach().float(), dim=1)
        labels = labels.long()
        num_classes = centres.shape[0]
        logit_teacher = (f * t).sum(1) / tau                                   # [n]
        logit_centres = f @ centres.T / tau                                    # [n, K]
        # log-partition over [teacher, queue, centres] without materialising the concatenation
        log_partition = torch.logsumexp(torch.stack([
            logit_teacher, torch.logsumexp(f @ in_softmax.T / tau, 1), torch.logsumexp(logit_centres, 1)]), 0)
        # sum_{queue j of class y_i} log softmax_ij = f_i . (sum of those queue rows) / tau - n_{y_i} log Z_i: the
        # per-class sums replace an [n, Q] mask (same value, no [n, Q] masking in forward or backward)
        class_sums = torch.zeros(num_classes, queue.shape[1], device=f.device).index_add_(0, filled_labels,
                                                                                          filled_queue)
        class_counts = torch.bincount(filled_labels, minlength=num_classes).to(f.dtype)
        positives_queue = (f * class_sums[labels]).sum(1) / tau - class_counts[labels] * log_partition
        log_centre = logit_centres.gather(1, assignment[labels].unsqueeze(1)).squeeze(1) - log_partition
        numerator = (logit_teacher - log_partition) + positives_queue + self.anchor_weight * log_centre
        positives = 1.0 + class_counts[labels] + (1.0 if self.count_centre else 0.0)
        return (-numerator / positives).mean()
