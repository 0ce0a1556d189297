"""PNG figures of a benchmark (matplotlib, Agg backend): per-class Dice bars and per-run training curves."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _value(stats: Mapping) -> tuple[float, float]:
    mean, std = stats["mean"], stats["std"]
    return (math.nan if mean is None else mean), (0.0 if std is None else std)


def plot_dice_bars(rows: Sequence[Mapping], labels: Mapping[str, str], path: str | Path) -> Path:
    """Grouped bars: one group per class plus the mean, one bar per benchmark row; error bars = std over seeds.

    Args:
        rows: :func:`nnunet_ext.benchmark.report.summarise` rows.
        labels: ``{label key: name}`` in display order.
        path: output PNG.
    """
    plt = _pyplot()
    groups = [*labels.values(), "mean"]
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 0.4 * len(rows)) + 3.0, 4.0))
    for i, row in enumerate(rows):
        stats = [row["dice"][k] for k in labels] + [row["mean_dice"]]
        means, stds = zip(*(_value(s) for s in stats))
        positions = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        name = f"{row['label']} (stock)" if row["role"] == "baseline" else row["label"]
        ax.bar(positions, means, width, yerr=stds, capsize=3, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice (test split)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a bar
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_training_curves(curves: Mapping[str, Sequence[float]], title: str, path: str | Path) -> Path:
    """Train/validation loss and nnU-Net's pseudo Dice (per epoch and its EMA) of one run.

    Args:
        curves: nnU-Net's logging lists ``train_losses``, ``val_losses``, ``mean_fg_dice``, ``ema_fg_dice``.
        title: figure title.
        path: output PNG.
    """
    plt = _pyplot()
    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(9.0, 3.5))
    for key, name in (("train_losses", "train loss"), ("val_losses", "val loss")):
        values = list(curves.get(key, []))
        loss_ax.plot(range(len(values)), values, marker="o" if len(values) < 20 else None, label=name)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize="small")
    for key, name in (("mean_fg_dice", "pseudo Dice"), ("ema_fg_dice", "pseudo Dice (EMA)")):
        values = list(curves.get(key, []))
        dice_ax.plot(range(len(values)), values, marker="o" if len(values) < 20 else None, label=name)
    dice_ax.set_xlabel("epoch")
    dice_ax.set_ylabel("pseudo Dice (validation patches)")
    dice_ax.set_ylim(0, 1)
    dice_ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def safe_file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")
