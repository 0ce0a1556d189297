"""ACTION and ACTION++ trainers for stock ``nnUNetv2_train`` / ``nnUNetv2_predict`` (logic in ``nnunet_ext.action``).

    nnunet-ext preprocess-unlabeled -d ID -c 3d_fullres
    nnUNetv2_train ID 3d_fullres 0 -tr ACTIONTrainer
    nnUNetv2_predict -i IN -o OUT -d ID -c 3d_fullres -tr ACTIONTrainer -f 0

Only trainer classes in this file: nnU-Net imports it as a top-level module.
"""
import torch

from nnunet_ext.action.trainer import ActionPlusPlusTrainerBase, ActionTrainerBase


class ACTIONTrainer(ActionTrainerBase):
    """ACTION (You et al., IPMI 2023): stages i/ii/iii over (100, 100, 800) of nnU-Net's 1000 epochs."""


class ACTIONPlusPlusTrainer(ActionPlusPlusTrainerBase):
    """ACTION++ (You et al., MICCAI 2023): ACTION + temperature schedule + supervised adaptive anatomical contrast."""


class ACTIONTrainer_paperSchedule(ActionTrainerBase):
    """ACTION with the official code's budget: 30k iterations per stage = 120 epochs x 250 iterations each."""

    stage_epochs = (120, 120, 120)

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 360


class ACTIONTrainer_plannedBatch(ActionTrainerBase):
    """ACTIONTrainer whose labelled + unlabeled patches together make the planned batch (half each, as the official
    2D code's 3 + 3 of stages i/ii) instead of the planned labelled batch plus as many unlabeled patches: about half
    the network work per step, half the labelled patches per step."""

    split_planned_batch = True


class ACTIONPlusPlusTrainer_plannedBatch(ActionPlusPlusTrainerBase):
    """ACTIONPlusPlusTrainer with the planned batch split between labelled and unlabeled patches (see
    ``ACTIONTrainer_plannedBatch``)."""

    split_planned_batch = True
