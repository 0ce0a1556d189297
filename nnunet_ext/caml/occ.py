"""Omni-Correlation Consistency (OCC) of CAML: memory update from labeled voxels, row selection on unlabeled
voxels and the correlation loss (Gao et al., MICCAI 2023, Sec. 2.3; details as in the official code).

Per training step, in this order (as officially):

1. memory update: for each labeled sample, the voxels that *both* sub-models classify correctly (any class,
   background included) are projected with the heads in eval mode, ``0.5 (proj_v(e_v) + proj_a(e_a))``, and
   replace that case's slot of the bank;
2. memory sample: ``memory_per_class`` rows per class present (:class:`LabeledFeatureMemoryBank`);
3. unlabeled rows: voxels where both sub-models predict the same class (and which are not padding), per class the
   ``num_filtered`` most confident ones by the vanilla model's confidence; one index list for both sub-models;
4. L_o between the two sub-models' correlation maps of these rows (heads in train mode).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from nnunet_ext.caml.losses import OCC_LOG_FORMS, omni_correlation_loss
from nnunet_ext.caml.memory_bank import LabeledFeatureMemoryBank
from nnunet_ext.caml.networks import CAMLHeads
from nnunet_ext.training.distributed import all_gather_concat, all_gather_objects, world_size


def voxel_rows(embedding: torch.Tensor) -> torch.Tensor:
    """``[B, C, *spatial] -> [B * N, C]``: one row per voxel, channels last (row index = b * N + voxel)."""
    return embedding.flatten(2).transpose(1, 2).reshape(-1, embedding.shape[1])


class SelectedRows(NamedTuple):
    """Unlabeled voxels used by OCC.

    Attributes:
        index: flat voxel indices into ``[B_U * N]`` (class blocks in class order), ``[R]``.
        row_class: pseudo-label (vanilla argmax) of each row, ``[R]``.
    """

    index: torch.Tensor
    row_class: torch.Tensor


def select_confident_rows(pred_v: torch.Tensor, confidence_v: torch.Tensor, pred_a: torch.Tensor,
                          valid: torch.Tensor | None, num_classes: int, num_filtered: int = 12800,
                          min_rows: int = 2) -> SelectedRows:
    """Per class c, the ``num_filtered`` most confident voxels with ``pred_v == pred_a == c`` (and valid).

    Pseudo-label and confidence come from the vanilla model only, so both sub-models use this one index list
    (the official code sorted the same confidences twice). A class block with fewer than ``min_rows`` voxels is
    dropped (official: more than one; BatchNorm in the heads needs > 1 row).

    Args:
        pred_v: vanilla argmax on unlabeled samples ``[B_U, *spatial]``.
        confidence_v: vanilla max probability ``[B_U, *spatial]``.
        pred_a: auxiliary argmax ``[B_U, *spatial]``.
        valid: ``[B_U, *spatial]`` bool (False for padded voxels) or None.
        num_classes: K.
        num_filtered: N_f per class (official 12,800).
        min_rows: smallest class block kept.

    Raises:
        ValueError: mismatching shapes or non-positive sizes.
    """
    if pred_v.shape != pred_a.shape or pred_v.shape != confidence_v.shape or (
            valid is not None and valid.shape != pred_v.shape):
        raise ValueError(f"pred_v, confidence_v, pred_a (and valid) must have one shape, got {tuple(pred_v.shape)}, "
                         f"{tuple(confidence_v.shape)}, {tuple(pred_a.shape)}"
                         + ("" if valid is None else f", {tuple(valid.shape)}"))
    if num_filtered < 1 or num_classes < 1 or min_rows < 1:
        raise ValueError(f"num_filtered, num_classes and min_rows must be >= 1, got {num_filtered}, {num_classes}, "
                         f"{min_rows}")
    candidate = (pred_v == pred_a).flatten()
    if valid is not None:
        candidate &= valid.flatten().bool()
    labels, confidence = pred_v.flatten(), confidence_v.flatten().float()
    indices, classes = [], []
    for c in range(num_classes):
        in_class = candidate & (labels == c)
        count = int(in_class.sum())
        keep = min(count, num_filtered)
        if keep < min_rows:
            continue
        scores = torch.where(in_class, confidence, torch.full_like(confidence, -1.0))  # confidences are >= 0
        chosen = torch.topk(scores, keep, sorted=True).indices
        indices.append(chosen)
        classes.append(torch.full((keep,), c, dtype=torch.long, device=chosen.device))
    if not indices:
        empty = torch.zeros((0,), dtype=torch.long, device=pred_v.device)
        return SelectedRows(empty, empty.clone())
    return SelectedRows(torch.cat(indices), torch.cat(classes))


class OCCResult(NamedTuple):
    """Loss and bookkeeping of one OCC evaluation.

    Attributes:
        loss: scalar L_o (a zero tensor when no row block or memory class is available).
        num_rows: R, unlabeled rows used.
        num_memory_classes: K', classes in the memory sample.
    """

    loss: torch.Tensor
    num_rows: int
    num_memory_classes: int


class OmniCorrelationConsistency:
    """CAML's OCC with its memory bank (no parameters of its own; the heads are passed in).

    Args:
        num_classes: K (segmentation outputs, background included).
        feat_dim: D of the heads.
        memory_per_class: N_m rows sampled per class (official 256).
        memory_cap: rows stored per (case, class) (official: unbounded); must be >= N_m.
        num_filtered: N_f unlabeled rows per class (official 12,800).
        temperature: tau of the correlation softmax (official 0.1).
        normalize: cosine similarity instead of the official raw dot product.
        log_form: ``"eps"`` (official ``log(C_v + 1e-8)``) or ``"log_softmax"``.
        detach_targets: stop the gradient through C_a (official: not detached).
        heads_before_filter: apply the heads to all agreeing unlabeled voxels before the top-N_f selection (official;
            BatchNorm statistics over all agreeing voxels, expensive) instead of to the selected rows only.
        memory_slots: None (official): one memory slot per labeled case, overwritten on each visit. An integer S:
            one slot per labeled *sample*, the last S samples kept (oldest overwritten). Per-case slots suit 3D
            patches, which hold thousands of voxels of every class; a 2D sample is one slice, so per-case slots
            keep one slice per case and small classes rarely reach the N_m threshold (docs/caml.md).
        device: device of the memory bank.

    Raises:
        ValueError: invalid sizes or options.
    """

    def __init__(self, num_classes: int, feat_dim: int = 32, memory_per_class: int = 256, memory_cap: int = 4096,
                 num_filtered: int = 12800, temperature: float = 0.1, normalize: bool = False,
                 log_form: str = "eps", detach_targets: bool = False, heads_before_filter: bool = False,
                 memory_slots: int | None = None, device: torch.device | str = "cpu"):
        if memory_per_class < 1 or num_filtered < 1:
            raise ValueError(f"memory_per_class and num_filtered must be >= 1, got {memory_per_class}, {num_filtered}")
        if memory_cap < memory_per_class:
            raise ValueError(f"memory_cap ({memory_cap}) must be >= memory_per_class ({memory_per_class})")
        if log_form not in OCC_LOG_FORMS:
            raise ValueError(f"unknown log form {log_form!r}; expected one of {OCC_LOG_FORMS}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if memory_slots is not None and (isinstance(memory_slots, bool) or not isinstance(memory_slots, int)
                                         or memory_slots < 1):
            raise ValueError(f"memory_slots must be None (one slot per labeled case) or an integer >= 1, "
                             f"got {memory_slots!r}")
        self.num_classes = num_classes
        self.memory_per_class = memory_per_class
        self.num_filtered = num_filtered
        self.temperature = temperature
        self.normalize = normalize
        self.log_form = log_form
        self.detach_targets = detach_targets
        self.heads_before_filter = heads_before_filter
        self.memory_slots = memory_slots
        self.samples_stored = 0  # labeled samples stored so far: the next ring slot with ``memory_slots``
        self.bank = LabeledFeatureMemoryBank(num_classes, feat_dim, memory_cap, device)

    @torch.no_grad()
    def update_memory(self, heads: CAMLHeads, embedding_v: torch.Tensor, embedding_a: torch.Tensor,
                      pred_v: torch.Tensor, pred_a: torch.Tensor, target: torch.Tensor, keys: list[str],
                      ignore_label: int | None = None) -> None:
        """Store the correctly classified labeled voxels of each sample in its case's slot (or, with
        ``memory_slots``, in the next slot of the ring of the last ``memory_slots`` samples).

        The projection heads run in eval mode (running BatchNorm statistics, as officially) and are put back into
        their previous mode; their running statistics do not change. Voxels beyond ``memory_cap`` per class are
        dropped uniformly at random before projecting. With per-case slots, a case appearing twice in a batch keeps
        the later sample.

        Under DDP (a collective; every rank calls it every step) the entries of all ranks are gathered and stored
        in rank order, so every rank holds the bank one process would build from the concatenated batch (a case
        drawn on two ranks keeps the later rank's sample).

        Args:
            heads: the four heads (only the projections are used).
            embedding_v: vanilla embeddings of the labeled samples ``[B_L, C0, *spatial]``.
            embedding_a: auxiliary embeddings ``[B_L, C0, *spatial]``.
            pred_v: vanilla argmax ``[B_L, *spatial]``.
            pred_a: auxiliary argmax ``[B_L, *spatial]``.
            target: labels ``[B_L, *spatial]`` (integer valued).
            keys: case identifiers, one per labeled sample.
            ignore_label: nnU-Net's ignore label (never a correct voxel).

        Raises:
            ValueError: mismatching shapes or number of keys.
        """
        if not (pred_v.shape == pred_a.shape == target.shape) or embedding_v.shape != embedding_a.shape \
                or embedding_v.shape[0] != target.shape[0] or embedding_v.shape[2:] != target.shape[1:]:
            raise ValueError(f"inconsistent shapes: embeddings {tuple(embedding_v.shape)}/{tuple(embedding_a.shape)},"
                             f" predictions {tuple(pred_v.shape)}/{tuple(pred_a.shape)}, target {tuple(target.shape)}")
        if len(keys) != target.shape[0]:
            raise ValueError(f"{len(keys)} keys for {target.shape[0]} labeled samples")
        target = target.long()
        correct = (pred_v == target) & (pred_a == target)
        if ignore_label is not None:
            correct &= target != ignore_label
        cap = self.bank.memory_cap
        entries: list[tuple[str, list[torch.Tensor], list[int]]] = []
        modes = (heads.proj_v.training, heads.proj_a.training)
        heads.proj_v.eval()
        heads.proj_a.eval()
        try:
            for i, key in enumerate(keys):
                rows_v, rows_a = embedding_v[i].flatten(1), embedding_a[i].flatten(1)  # [C0, N]
                labels, correct_i = target[i].flatten(), correct[i].flatten()
                chosen, counts = [], []
                for c in range(self.num_classes):
                    index = torch.nonzero(correct_i & (labels == c)).flatten()
                    counts.append(int(index.numel()))
                    if index.numel() > cap:
                        index = index[torch.randperm(index.numel(), device=index.device)[:cap]]
                    chosen.append(index)
                index = torch.cat(chosen)
                if index.numel() > 0:
                    features = heads.memory_features(rows_v[:, index].t().float(), rows_a[:, index].t().float())
                else:
                    features = rows_v.new_zeros((0, self.bank.feat_dim), dtype=torch.float32)
                entries.append((key, list(features.split([c.numel() for c in chosen])), counts))
        finally:
            heads.proj_v.train(modes[0])
            heads.proj_a.train(modes[1])
        if world_size() > 1:
            entries = self._gather_entries(entries, embedding_v.device)
        for key, rows, counts in entries:
            if self.memory_slots is not None:  # after the gather, so every rank fills the same ring slots
                key = f"sample slot {self.samples_stored % self.memory_slots}"
            self.bank.update_slot(key, rows, counts)
            self.samples_stored += 1

    def _gather_entries(self, entries: list[tuple[str, list[torch.Tensor], list[int]]], device: torch.device
                        ) -> list[tuple[str, list[torch.Tensor], list[int]]]:
        """Every rank's memory entries in rank order: keys and true counts as objects, all rows in one gather
        (stored row counts ``min(count, memory_cap)`` follow from the counts, so no extra exchange is needed)."""
        meta = all_gather_objects([(key, counts) for key, _, counts in entries])
        local = [block for _, rows, _ in entries for block in rows]
        local_rows = torch.cat(local).float() if local else torch.zeros((0, self.bank.feat_dim), device=device)
        blocks = all_gather_concat(local_rows).split([min(c, self.bank.memory_cap) for _, counts in meta
                                                      for c in counts])
        k = self.num_classes
        return [(key, list(blocks[i * k:(i + 1) * k]), counts) for i, (key, counts) in enumerate(meta)]

    def loss(self, heads: CAMLHeads, embedding_v: torch.Tensor, embedding_a: torch.Tensor, probs_v: torch.Tensor,
             probs_a: torch.Tensor, valid: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> OCCResult:
        """Sample the memory and compute L_o on the unlabeled samples (float32).

        Args:
            heads: the four heads, in training mode as officially.
            embedding_v: vanilla embeddings of the unlabeled samples ``[B_U, C0, *spatial]``.
            embedding_a: auxiliary embeddings ``[B_U, C0, *spatial]``.
            probs_v: vanilla softmax ``[B_U, K, *spatial]`` (only argmax/max are used, no gradient).
            probs_a: auxiliary softmax ``[B_U, K, *spatial]``.
            valid: ``[B_U, 1, *spatial]`` or ``[B_U, *spatial]`` bool; padded voxels are excluded.
            generator: RNG for the memory sample (default: torch's global RNG).
        """
        memory, memory_class = self.bank.sample(self.memory_per_class, generator)
        num_memory_classes = int(torch.unique(memory_class).numel())
        with torch.no_grad():
            confidence_v, pred_v = probs_v.max(1)
            pred_a = probs_a.argmax(1)
        if valid is not None and valid.ndim == pred_v.ndim + 1:
            valid = valid[:, 0]
        rows = select_confident_rows(pred_v, confidence_v, pred_a, valid, self.num_classes, self.num_filtered)
        num_rows = int(rows.index.numel())
        zero = embedding_v.new_zeros((), dtype=torch.float32)
        if num_rows == 0 or memory.shape[0] == 0:
            return OCCResult(zero, 0, num_memory_classes)  # nothing to correlate: no row used
        all_v, all_a = voxel_rows(embedding_v), voxel_rows(embedding_a)
        if self.heads_before_filter:
            # official order: heads on every agreeing voxel (BatchNorm statistics over all of them), then filter
            agree = (pred_v == pred_a).flatten()
            if valid is not None:
                agree &= valid.flatten().bool()
            agreeing = torch.nonzero(agree).flatten()
            position = torch.full((agree.numel(),), -1, dtype=torch.long, device=agree.device)
            position[agreeing] = torch.arange(agreeing.numel(), device=agree.device)
            features_v, features_a = heads.correlation_features(all_v[agreeing].float(), all_a[agreeing].float())
            features_v, features_a = features_v[position[rows.index]], features_a[position[rows.index]]
        else:
            features_v, features_a = heads.correlation_features(all_v[rows.index].float(), all_a[rows.index].float())
        loss = omni_correlation_loss(features_v, features_a, memory, self.temperature, self.normalize,
                                     self.log_form, self.detach_targets)
        return OCCResult(loss, num_rows, num_memory_classes)

    def state_dict(self) -> dict[str, Any]:
        return {"memory_bank": self.bank.state_dict(), "samples_stored": self.samples_stored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state["memory_bank"])
        self.samples_stored = int(state.get("samples_stored", 0))  # absent in checkpoints before memory_slots
