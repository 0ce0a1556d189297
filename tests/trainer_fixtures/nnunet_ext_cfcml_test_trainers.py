"""Test-only CFCML trainers (short budget), found by nnU-Net through a second ``nnUNet_extTrainer`` folder.

They subclass the shipped trainer hooks by absolute import, as a user's own variant would.
"""
import torch

from nnunet_ext.cfcml.trainer import CFCMLTrainerCore
from nnunet_ext.training.budget import set_budget


class CFCMLTrainer_smoke(CFCMLTrainerCore):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_budget(self, epochs=2, iterations=2, val_iterations=1, save_every=1)


class CFCMLTrainer_tabularOnly_smoke(CFCMLTrainer_smoke):
    cfcml_overrides = {"modalities": "tabular", "w_sam": 0.0, "w_up": 0.0, "w_cp": 0.0}
