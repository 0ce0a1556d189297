"""Test-only CIML trainers with a smoke budget (2 epochs x 2 iterations), found through a second
``nnUNet_extTrainer`` folder.

They derive from ``nnunet_ext.ciml.trainer.CIMLTrainerBase`` (what ``CIMLTrainer`` is) rather than importing
``nnunet_ext_trainers.ciml_trainers``: a module imported from the trainers folder by anything but nnU-Net's lookup
would stay in ``sys.modules`` and defeat the discovery test's eviction check.
"""
import torch

from nnunet_ext.ciml.trainer import CIMLTrainerBase


class CIMLTrainer_smoke(CIMLTrainerBase):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1


class CIMLTrainer_noMessages_smoke(CIMLTrainer_smoke):
    ciml_overrides = {"messages": False}  # as CIMLTrainer_noMessages
