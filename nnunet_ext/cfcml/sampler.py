"""Class-balanced batches for CFCML (the fine stage needs every class in every batch).

CFCML's "balanced loader 4" gives every batch exactly ``B/K`` cases of each class. Here an ``nnUNetDataLoader``
subclass draws ``B/K`` identifiers per class uniformly **with replacement** (design spec §7.4: the original's
per-epoch without-replacement scheme for class 0 does not fit nnU-Net's multi-worker loaders). Patches, padding,
foreground oversampling and augmentation stay nnU-Net's.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


def check_balanced_batch_size(batch_size: int, num_classes: int) -> int:
    """Cases per class in a batch.

    Raises:
        ValueError: ``batch_size`` is not a multiple of ``num_classes`` or smaller than ``2 * num_classes``.
    """
    if num_classes < 2:
        raise ValueError(f"class-balanced sampling needs at least two classes, got {num_classes}")
    if batch_size % num_classes or batch_size < 2 * num_classes:
        raise ValueError(f"batch size {batch_size} must be a multiple of the number of classes ({num_classes}) and "
                         f"at least {2 * num_classes}; set it with nnunet-ext configure cfcml --config "
                         f"(\"batch_size\")")
    return batch_size // num_classes


def balanced_indices(keys_by_class: Sequence[Sequence[str]], batch_size: int,
                     rng: np.random.Generator | None = None) -> list[str]:
    """``batch_size / K`` keys of every class, drawn uniformly with replacement, classes interleaved.

    Interleaving (``c0, c1, ..., c0, c1, ...``) spreads nnU-Net's foreground oversampling, which applies to the
    last third of a batch, over all classes.

    Raises:
        ValueError: bad batch size (see :func:`check_balanced_batch_size`) or a class without keys.
    """
    per_class = check_balanced_batch_size(batch_size, len(keys_by_class))
    empty = [k for k, keys in enumerate(keys_by_class) if len(keys) == 0]
    if empty:
        raise ValueError(f"class(es) {empty} have no training case in this fold")
    # default: numpy's global state, which nnU-Net seeds per augmentation worker
    draw = np.random.randint if rng is None else rng.integers
    draws = [[keys[i] for i in draw(0, len(keys), per_class)] for keys in keys_by_class]
    return [draws[k][j] for j in range(per_class) for k in range(len(keys_by_class))]


class BalancedClassDataLoader(nnUNetDataLoader):
    """``nnUNetDataLoader`` whose batches hold exactly ``batch_size / K`` cases of each class.

    Args:
        class_of: class index of every identifier of ``data`` (all must be present).
        num_classes: K.
        *args, **kwargs: as ``nnUNetDataLoader``.
    """

    def __init__(self, data, batch_size: int, *args, class_of: Mapping[str, int], num_classes: int, **kwargs):
        check_balanced_batch_size(batch_size, num_classes)
        super().__init__(data, batch_size, *args, **kwargs)
        missing = sorted(k for k in self.indices if k not in class_of)
        if missing:
            raise ValueError(f"no class label for training case(s) {missing[:20]}")
        self.keys_by_class = [sorted(k for k in self.indices if class_of[k] == c) for c in range(num_classes)]
        empty = [c for c, keys in enumerate(self.keys_by_class) if not keys]
        if empty:
            raise ValueError(f"class(es) {empty} have no training case in this fold; every class must appear in "
                             f"the training split (use a stratified splits_final.json)")

    def get_indices(self) -> list[str]:
        return balanced_indices(self.keys_by_class, self.batch_size)
