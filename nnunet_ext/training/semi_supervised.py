"""Base class of the semi-supervised trainers: a second loader with augmented unlabeled patches."""
from __future__ import annotations

from typing import ClassVar

from nnunet_ext.ssl.unlabeled_data import build_unlabeled_augmenter
from nnunet_ext.training.base_trainer import ExtTrainerBase, move_to_device
from nnunet_ext.training.distributed import split_batch_size, world_size


def finish_augmenter(augmenter) -> None:
    """Stop an augmenter's worker processes (a ``SingleThreadedAugmenter`` has none)."""
    finish = getattr(augmenter, "_finish", None)
    if finish is not None:
        finish()


def split_planned_batch_size(planned: int) -> tuple[int, int]:
    """``(labeled, unlabeled)`` patches that together make a planned batch of ``planned``: ``ceil`` / ``floor`` of
    half (a 5 gives 3 + 2)."""
    if planned < 2:
        raise ValueError(f"split_planned_batch needs a planned batch of at least 2 (one labeled and one unlabeled "
                         f"patch), the plans give {planned} per process")
    return planned - planned // 2, planned // 2


class ExtSemiSupervisedTrainerBase(ExtTrainerBase):
    """Adds ``self.dataloader_unlabeled`` (patches of ``imagesUnlabeled``, nnU-Net's training augmentation, no
    labels) next to nnU-Net's labeled loaders. Subclasses call :meth:`next_unlabeled_batch` in ``compute_loss``.

    The unlabeled images must have been preprocessed with ``nnunet-ext preprocess-unlabeled`` for the trainer's
    configuration; otherwise training stops before the first step with a message naming that command.

    Class attributes:
        unlabeled_batch_size: patches per unlabeled batch; ``None`` uses the labeled batch size (1:1). Under DDP an
            explicit value is the **global** unlabeled batch, split over the ranks like nnU-Net splits the labeled
            batch (``None`` keeps 1:1 on every rank), so the global batch keeps the method's composition.
        split_planned_batch: labeled + unlabeled patches together make the planned batch (labeled
            ``ceil(B / 2)``, unlabeled ``floor(B / 2)`` per rank), as the official CAML code's 2 + 2, instead of a
            planned labeled batch plus as many unlabeled patches. About half the network work per step; needs a
            planned batch of at least 2 and excludes ``unlabeled_batch_size``.
    """

    unlabeled_batch_size: ClassVar[int | None] = None
    split_planned_batch: ClassVar[bool] = False

    def _set_batch_size_and_oversample(self) -> None:
        super()._set_batch_size_and_oversample()  # nnU-Net's per-rank share of the planned batch
        if self.split_planned_batch:
            if self.unlabeled_batch_size is not None:
                raise ValueError(f"{type(self).__name__}: split_planned_batch and unlabeled_batch_size="
                                 f"{self.unlabeled_batch_size} exclude each other; set one of them")
            self.batch_size, self._unlabeled_share = split_planned_batch_size(self.batch_size)

    def unlabeled_batch_size_per_rank(self) -> int:
        """Unlabeled patches this process draws per step (R6 of ``docs/ddp.md``); ``self.batch_size`` (nnU-Net's
        per-rank labeled share) when ``unlabeled_batch_size`` is None, the unlabeled share of the planned batch with
        ``split_planned_batch``."""
        if self.split_planned_batch:
            return self._unlabeled_share
        if self.unlabeled_batch_size is None:
            return self.batch_size
        if world_size() == 1:
            return self.unlabeled_batch_size
        return split_batch_size(self.unlabeled_batch_size)

    def on_train_start(self) -> None:
        super().on_train_start()
        self.dataloader_unlabeled = build_unlabeled_augmenter(self, batch_size=self.unlabeled_batch_size_per_rank())

    def next_unlabeled_batch(self) -> dict:
        """``{'data': [B_U, C, *patch], 'valid': bool [B_U, 1, *patch], 'keys': [...]}`` on ``self.device``.

        ``valid`` is False where the patch was padded or augmentation moved in voxels from outside the image.
        """
        return {k: move_to_device(v, self.device) for k, v in next(self.dataloader_unlabeled).items()}

    def on_train_end(self) -> None:
        super().on_train_end()
        finish_augmenter(getattr(self, "dataloader_unlabeled", None))
        self.dataloader_unlabeled = None
