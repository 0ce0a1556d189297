"""Test-only trainers, found by nnU-Net through a second ``nnUNet_extTrainer`` folder.

``ExtSmokeTrainer`` is a small but complete semi-supervised method on top of the shared plumbing: nnU-Net's
supervised loss plus a mean-teacher consistency term on unlabeled patches (valid voxels only), an EMA teacher
kept in ``extra_modules`` and saved under the ``nnunet_ext`` checkpoint key, and two extra logged curves. It
imports from ``nnunet_ext`` by absolute import only, as shipped trainer files must.
"""
import copy

import torch

from nnunet_ext.training.ema import ema_update
from nnunet_ext.training.semi_supervised import ExtSemiSupervisedTrainerBase
from nnunet_ext.training.step import fp32_context
from nnunet_ext.training.budget import set_budget


class ExtSmokeTrainer(ExtSemiSupervisedTrainerBase):
    extra_log_keys = ("smoke_consistency", "smoke_supervised")
    ema_momentum = 0.9
    consistency_weight = 0.1

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_budget(self, epochs=2, iterations=2, val_iterations=1, save_every=1)

    def build_extra_modules(self):
        teacher = copy.deepcopy(self.network).requires_grad_(False)
        return {"teacher": teacher}

    def compute_loss(self, batch):
        output = self.network(batch["data"])
        supervised = self.loss(output, batch["target"])
        unlabeled = self.next_unlabeled_batch()
        student = self.network(unlabeled["data"])
        with torch.no_grad():
            teacher = self.extra_modules["teacher"](unlabeled["data"])
        student, teacher = (o[0] if isinstance(o, (list, tuple)) else o for o in (student, teacher))
        with fp32_context(self.device):
            squared = (torch.softmax(student.float(), 1) - torch.softmax(teacher.float(), 1)).pow(2).sum(1, True)
            valid = unlabeled["valid"].float()
            consistency = (squared * valid).sum() / valid.sum().clamp_min(1.0)
        total = supervised + self.consistency_weight * consistency
        return total, {"smoke_consistency": consistency.detach(), "smoke_supervised": supervised.detach()}

    def after_optimizer_step(self):
        ema_update(self.extra_modules["teacher"], self.network, self.ema_momentum)

