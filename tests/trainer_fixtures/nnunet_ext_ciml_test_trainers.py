"""Test-only CIML trainers with a smoke budget (2 epochs x 2 iterations), found through a second
``nnUNet_extTrainer`` folder.

They derive from ``nnunet_ext.ciml.trainer.CIMLTrainerBase`` (what ``CIMLTrainer`` is) rather than importing
``nnunet_ext_trainers.ciml_trainers``: a module imported from the trainers folder by anything but nnU-Net's lookup
would stay in ``sys.modules`` and defeat the discovery test's eviction check.
"""
import torch

from nnunet_ext.ciml.trainer import CIMLTrainerBase
from nnunet_ext.training.budget import set_budget


class CIMLTrainer_smoke(CIMLTrainerBase):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_budget(self, epochs=2, iterations=2, val_iterations=1, save_every=1)


class CIMLTrainer_noMessages_smoke(CIMLTrainer_smoke):
    ciml_overrides = {"messages": False}  # as CIMLTrainer_noMessages
