"""Tiny-budget ACTION / ACTION++ trainers for the end-to-end CLI test: 3 epochs x 2 iterations, one epoch per
stage, so a run crosses both stage boundaries. Absolute imports from the installed trainer package only."""
import torch

from nnunet_ext.training.budget import set_budget
from nnunet_ext_trainers.action_trainers import ACTIONPlusPlusTrainer, ACTIONTrainer


class ACTIONTrainer_smoke(ACTIONTrainer):
    stage_epochs = (1, 1, 1)
    num_queries = 64
    num_negatives = 128

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_budget(self, epochs=3, iterations=2, val_iterations=1, save_every=1)


class ACTIONPlusPlusTrainer_smoke(ACTIONPlusPlusTrainer):
    stage_epochs = (1, 1, 1)
    num_queries = 64
    num_negatives = 128
    saacl_queue_size = 512

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_budget(self, epochs=3, iterations=2, val_iterations=1, save_every=1)
