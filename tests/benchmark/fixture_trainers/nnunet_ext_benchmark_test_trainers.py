"""Test-only trainers for the benchmark tests, found by nnU-Net through ``--trainer-dirs``."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

CRASH_MESSAGE = "BenchCrashTrainer fails on purpose in its first training step"


class BenchCrashTrainer(nnUNetTrainer):
    """Crashes in the first training step, after nnU-Net has set everything up (a method bug at run time)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)

    def train_step(self, batch: dict) -> dict:
        raise RuntimeError(CRASH_MESSAGE)


class BenchClassifierTrainer(nnUNetTrainer):
    """Declares itself a classification trainer: the benchmark must leave it out without training it."""

    task_kind = "classification"
