"""Memory bank of labeled voxel features for CAML's Omni-Correlation Consistency (Gao et al., MICCAI 2023, Sec. 2.3).

Officially every iteration stores, for each labeled case of the batch, the projected features of *all* voxels both
sub-models classify correctly (one slot per case, overwritten on each visit), and samples N_m = 256 features per
class uniformly without replacement from all slots. That keeps about a million rows per case; here each
(slot, class) entry holds at most ``memory_cap`` rows plus the true number n of correct voxels it stands for, and
sampling weights every stored row by n / stored rows of its entry. When no entry is capped all weights are 1 and
the draw is exactly the official uniform one; a class is sampled only when its total true count reaches N_m (the
official threshold).

Not an ``nn.Module``: slots are created lazily from case identifiers, so the bank has explicit
``state_dict``/``load_state_dict`` for the trainer's extra checkpoint state. DDP: the bank itself is local;
``OmniCorrelationConsistency.update_memory`` gathers every rank's entries before storing them, so all ranks hold
the same bank, and the trainer samples it with a generator seeded identically on every rank.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class LabeledFeatureMemoryBank:
    """Capped per-(case, class) store of detached labeled features ``[s, D]`` with count-weighted sampling.

    Args:
        num_classes: K, classes including background (every class gets entries, as officially).
        feat_dim: D, feature dimension of the stored rows.
        memory_cap: maximum rows per (case, class) entry; must be >= the per-class sample size used.
        device: where rows are stored (the training device).

    Raises:
        ValueError: for non-positive sizes.
    """

    def __init__(self, num_classes: int, feat_dim: int, memory_cap: int = 4096,
                 device: torch.device | str = "cpu"):
        if num_classes < 1 or feat_dim < 1 or memory_cap < 1:
            raise ValueError(f"num_classes, feat_dim and memory_cap must be >= 1, got {num_classes}, {feat_dim}, "
                             f"{memory_cap}")
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.memory_cap = memory_cap
        self.device = torch.device(device)
        self.features: dict[str, list[torch.Tensor]] = {}
        self.counts: dict[str, list[int]] = {}

    def __len__(self) -> int:
        """Number of filled slots (labeled cases seen)."""
        return len(self.features)

    def total_counts(self) -> list[int]:
        """Per class, the sum of true counts over all slots (what the sampling threshold compares with N_m)."""
        return [sum(c[k] for c in self.counts.values()) for k in range(self.num_classes)]

    def update_slot(self, key: str, features: Sequence[torch.Tensor], counts: Sequence[int]) -> None:
        """Replace slot ``key`` (all classes at once, like the official whole-slot overwrite).

        Args:
            key: case identifier of the labeled sample.
            features: per class, detached rows ``[s_k, D]`` with ``s_k = min(counts[k], memory_cap)`` (the caller
                subsamples uniformly before projecting, which is cheaper than projecting everything).
            counts: per class, the true number n_k of correct voxels of that class in the sample's patch.

        Raises:
            ValueError: wrong number of classes, rows that require grad, wrong shapes or row counts.
        """
        if len(features) != self.num_classes or len(counts) != self.num_classes:
            raise ValueError(f"expected {self.num_classes} classes, got {len(features)} feature blocks and "
                             f"{len(counts)} counts")
        stored = []
        for k, (rows, count) in enumerate(zip(features, counts)):
            if rows.requires_grad:
                raise ValueError("memory features must be detached (requires_grad is True)")
            if rows.ndim != 2 or rows.shape[1] != self.feat_dim:
                raise ValueError(f"class {k}: expected rows [s, {self.feat_dim}], got {tuple(rows.shape)}")
            if count < 0 or rows.shape[0] != min(int(count), self.memory_cap):
                raise ValueError(f"class {k}: {rows.shape[0]} rows for a true count of {count} "
                                 f"(expected min(count, memory_cap={self.memory_cap}))")
            stored.append(rows.detach().to(self.device, torch.float32))
        self.features[str(key)] = stored
        self.counts[str(key)] = [int(c) for c in counts]

    def sample(self, per_class: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``per_class`` distinct rows for every class whose total true count is >= ``per_class``.

        Rows are drawn without replacement, each weighted by n / s of its entry (uniform when nothing is capped).

        Returns:
            ``(memory [K' * per_class, D], row_class [K' * per_class])`` in class order; empty (0 rows) when no
            class qualifies.

        Raises:
            ValueError: ``per_class`` < 1 or larger than ``memory_cap``.
        """
        if per_class < 1 or per_class > self.memory_cap:
            raise ValueError(f"per_class must be in [1, memory_cap={self.memory_cap}], got {per_class}")
        blocks, classes = [], []
        totals = self.total_counts()
        for k in range(self.num_classes):
            if totals[k] < per_class:
                continue
            entries = [(f[k], c[k]) for f, c in zip(self.features.values(), self.counts.values()) if c[k] > 0]
            rows = torch.cat([e for e, _ in entries])
            weights = torch.cat([torch.full((e.shape[0],), n / e.shape[0], dtype=torch.float64, device=rows.device)
                                 for e, n in entries])
            # enough stored rows: either some entry is capped (cap >= per_class rows) or none is (rows == total)
            chosen = torch.multinomial(weights, per_class, replacement=False, generator=generator)
            blocks.append(rows[chosen])
            classes.append(torch.full((per_class,), k, dtype=torch.long, device=rows.device))
        if not blocks:
            return (torch.zeros((0, self.feat_dim), device=self.device),
                    torch.zeros((0,), dtype=torch.long, device=self.device))
        return torch.cat(blocks), torch.cat(classes)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (CPU copies, for checkpoints)."""
        return {
            "num_classes": self.num_classes,
            "feat_dim": self.feat_dim,
            "memory_cap": self.memory_cap,
            "features": {k: [t.cpu().clone() for t in v] for k, v in self.features.items()},
            "counts": {k: list(v) for k, v in self.counts.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (rows go to this bank's device).

        Raises:
            ValueError: if the saved bank has other classes, feature dimension or cap.
        """
        saved = (state["num_classes"], state["feat_dim"], state["memory_cap"])
        if saved != (self.num_classes, self.feat_dim, self.memory_cap):
            raise ValueError(f"saved memory bank has (num_classes, feat_dim, memory_cap) = {saved}, this bank "
                             f"{(self.num_classes, self.feat_dim, self.memory_cap)}")
        self.features = {k: [t.to(self.device, torch.float32) for t in v] for k, v in state["features"].items()}
        self.counts = {k: [int(c) for c in v] for k, v in state["counts"].items()}
