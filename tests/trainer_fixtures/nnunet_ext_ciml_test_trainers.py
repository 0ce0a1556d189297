"""Test-only CIML trainers with a smoke budget (2 epochs x 2 iterations), found through a second
``nnUNet_extTrainer`` folder. The real classes are imported absolutely from the installed package."""
import torch

from nnunet_ext_trainers.ciml_trainers import CIMLTrainer, CIMLTrainer_noMessages


class CIMLTrainer_smoke(CIMLTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1


class CIMLTrainer_noMessages_smoke(CIMLTrainer_noMessages):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1
