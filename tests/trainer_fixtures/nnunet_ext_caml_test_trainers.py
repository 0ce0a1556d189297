"""Test-only CAML trainers with a tiny budget, found by nnU-Net through the test trainers folder."""
import torch

from nnunet_ext.training.budget import set_budget
from nnunet_ext_trainers.caml_trainers import CAMLTrainer


class CAMLTrainer_smoke(CAMLTrainer):
    """CAMLTrainer for 2 epochs x 2 iterations, a checkpoint every epoch; small memory sample so that OCC is
    active on tiny patches from the first step."""

    memory_per_class = 16
    memory_cap = 64
    num_filtered = 256

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_budget(self, epochs=2, iterations=2, val_iterations=1, save_every=1)
