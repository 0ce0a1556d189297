"""CAML: Correlation-Aware Mutual Learning for semi-supervised segmentation (Gao et al., MICCAI 2023,
arXiv:2307.06312; official code Herschel555/CAML) as nnU-Net trainers. The method lives in ``nnunet_ext.caml``.

Only trainer classes here, imported by nnU-Net as a top-level module: absolute imports from ``nnunet_ext`` only.
"""
from nnunet_ext.caml.trainer import CAMLPaperOptimTrainerBase, CAMLTrainerBase


class CAMLTrainer(CAMLTrainerBase):
    """CAML (Gao et al., MICCAI 2023): a vanilla and an auxiliary U-Net from the plans, trained by mutual learning
    with Cross-sample Mutual Attention and Omni-Correlation Consistency; the vanilla one is the inference network.
    Settings and their official values: ``nnunet_ext.caml.trainer.CAMLTrainerBase`` and docs/caml.md."""


class CAMLTrainer_paperOptim(CAMLPaperOptimTrainerBase):
    """CAMLTrainer with the official Left Atrium recipe where nnU-Net allows it (constant-lr SGD, foreground Dice,
    no deep supervision, stepwise ramp); see ``nnunet_ext.caml.trainer.CAMLPaperOptimTrainerBase``."""


class CAMLTrainer_plannedBatch(CAMLTrainerBase):
    """CAMLTrainer whose labeled + unlabeled patches together make the planned batch (half each, as the official
    2 + 2) instead of the planned labeled batch plus as many unlabeled patches: about half the training cost per
    step, half the labeled patches per step."""

    split_planned_batch = True
