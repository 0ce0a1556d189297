"""Test-only trainer for the SIGKILL-during-save test (``tests/e2e/test_checkpoint_kill.py``).

``ExtKillableSaveTrainer`` is a tiny trainer with extra state (an EMA teacher). When the environment variable
``NNUNET_EXT_TEST_HANG_IN_SAVE`` names a marker file, its second ``checkpoint_latest.pth`` save writes half of the
bytes, creates the marker and sleeps, so that the test can SIGKILL the process in the middle of a write. The hook
lives here, not in the package: production code has no test switches.
"""
import copy
import io
import os
import time

import torch

from nnunet_ext.training.base_trainer import ExtTrainerBase
from nnunet_ext.training.budget import set_budget
from nnunet_ext.training.ema import ema_update

HANG_VARIABLE = "NNUNET_EXT_TEST_HANG_IN_SAVE"


class ExtKillableSaveTrainer(ExtTrainerBase):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        set_budget(self, epochs=3, iterations=2, val_iterations=1, save_every=1)

    def build_extra_modules(self):
        return {"teacher": copy.deepcopy(self.network).requires_grad_(False)}

    def after_optimizer_step(self):
        ema_update(self.extra_modules["teacher"], self.network, 0.9)

    def save_checkpoint(self, filename):
        marker = os.environ.get(HANG_VARIABLE)
        if not marker or os.path.basename(filename) != "checkpoint_latest.pth" or self.current_epoch != 1:
            return super().save_checkpoint(filename)
        real_save = torch.save

        def write_half_and_hang(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
            if isinstance(f, (str, os.PathLike)):  # a writer that saves straight into the final file
                with open(f, "wb") as target:
                    target.write(half)
            else:
                f.write(half)
                f.flush()
            with open(marker, "w") as m:
                m.write(str(filename))
            time.sleep(600)

        torch.save = write_half_and_hang
        try:
            return super().save_checkpoint(filename)
        finally:
            torch.save = real_save
