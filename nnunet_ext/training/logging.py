"""Extra per-epoch values in nnU-Net's logger, its training log and ``progress.png``.

nnU-Net's ``LocalLogger`` accepts only keys that already exist, expects exactly one value per key and epoch
(a skipped epoch shifts every later value) and plots the shortest list, so an under-logged key freezes
``progress.png``. The helpers here keep those invariants for the keys a trainer adds.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping

from nnunetv2.training.logging.nnunet_logger import LocalLogger

from nnunet_ext.compat import logging_dict


def register_log_keys(trainer, keys: Iterable[str]) -> None:
    """Make ``keys`` loggable and pad them with NaN up to ``trainer.current_epoch`` entries.

    Idempotent. Call it after ``initialize()`` and again after loading a checkpoint, which replaces the whole
    logging dict (checkpoints of older versions or of stock nnU-Net lack the keys).
    """
    log = logging_dict(trainer)
    for key in keys:
        values = log.setdefault(key, [])
        values.extend([math.nan] * max(0, trainer.current_epoch - len(values)))


def log_epoch_values(trainer, values: Mapping[str, float], keys: Iterable[str]) -> None:
    """Log one value per key for the current epoch; keys without a value this epoch get NaN."""
    for key in keys:
        trainer.logger.log(key, float(values.get(key, math.nan)), trainer.current_epoch)


class ExtLocalLogger(LocalLogger):
    """nnU-Net's local logger whose ``progress.png`` gains one panel with the trainer's extra curves.

    The stock figure is drawn by nnU-Net itself (so it keeps upstream's look), then the extra panel is
    rendered at the same width and appended below it.
    """

    def __init__(self, extra_keys: Iterable[str] = (), verbose: bool = False):
        super().__init__(verbose)
        self.extra_keys = list(extra_keys)

    def plot_progress_png(self, output_folder: str) -> None:
        super().plot_progress_png(output_folder)
        keys = [k for k in self.extra_keys if k in self.my_fantastic_logging]
        if not keys:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from PIL import Image

        path = os.path.join(output_folder, "progress.png")
        with Image.open(path) as png:
            stock = png.convert("RGBA")
        num_epochs = min(len(v) for v in self.my_fantastic_logging.values())
        dpi = 100
        fig, ax = plt.subplots(1, 1, figsize=(stock.width / dpi, 18), dpi=dpi)
        x = list(range(num_epochs))
        for key in keys:
            ax.plot(x, self.my_fantastic_logging[key][:num_epochs], ls="-", linewidth=4, label=key)
        ax.set_xlabel("epoch", fontsize=30)
        ax.set_ylabel("method terms", fontsize=30)
        ax.tick_params(labelsize=26)
        ax.legend(loc="upper right", fontsize=26)
        fig.tight_layout()
        fig.canvas.draw()
        extra = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).copy()
        plt.close(fig)
        # Compose in 8-bit with PIL and save with light compression: the figure is 3000 x 7200 pixels and is
        # redrawn every epoch, so a float round trip through plt.imread/imsave (about 7 s on two CPU cores)
        # would cost more than a short epoch's training iterations.
        combined = Image.new("RGBA", (max(stock.width, extra.width), stock.height + extra.height), "white")
        combined.paste(stock, (0, 0))
        combined.paste(extra, (0, stock.height))
        combined.save(path, compress_level=1)
