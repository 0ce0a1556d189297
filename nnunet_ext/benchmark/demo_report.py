"""The demo's comparison table (``demo_report.md``) and Dice picture (``demo_dice.png``).

Cost columns: ``s/iter`` (median epoch wall time per training iteration, from nnU-Net's own timestamps) and
``x stock`` compare trainers only when each had the CPU to itself. Each training's CPU time (user + system of
the training process and its children) and the machine's mean 1-minute load average are measured too; when a
run shared the CPU (:func:`nnunet_ext.benchmark.measure.busy_machine_reason`), its wall-clock cells are marked
unreliable and the report says why.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

UNRELIABLE = "*"


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def plot_demo_dice(rows: Sequence[dict], path: str | Path, label_names: dict[str, str] | None = None) -> Path:
    """Per-label and mean Dice of every trainer as grouped bars (the benchmark's plot, one seed).

    ``label_names``: ``{label value: name}`` for the axis (default: ``label <value>``).
    """
    from nnunet_ext.benchmark.plots import plot_dice_bars

    labels = sorted({k for row in rows for k in row["dice_per_label"]}, key=int)
    bar_rows = [{"label": row["trainer"], "role": "baseline" if row["trainer"] == "nnUNetTrainer" else "method",
                 "dice": {k: {"mean": row["dice_per_label"][k], "std": None} for k in labels},
                 "mean_dice": {"mean": row["mean_dice"], "std": None}} for row in rows]
    names = label_names or {}
    return plot_dice_bars(bar_rows, {k: names.get(k, f"label {k}") for k in labels}, path)


def format_report(rows: Sequence[dict], epochs: int, iterations: int, configuration: str = "3d_fullres",
                  excluded: Sequence[str] = (), dice_png: str | None = None, logs: str | Path | None = None) -> str:
    """Markdown report: the table, why cost cells are unreliable (if they are), where pictures and logs are.

    Args:
        rows: one dict per trainer as written to ``demo_results.json`` (stock ``nnUNetTrainer`` among them).
        excluded: shipped trainers the segmentation demo leaves out (classification trainers).
        dice_png: file name of the Dice picture next to the report.
        logs: folder with the full logs of every step.
    """
    labels = sorted({k for row in rows for k in row["dice_per_label"]}, key=int)
    base = next(r for r in rows if r["trainer"] == "nnUNetTrainer")
    busy = [r for r in rows if r.get("busy")]
    header = ["trainer", *[f"Dice {k}" for k in labels], "mean Dice", "s/iter", "x stock", "train CPU s",
              "train wall s", "load", "predict s"]
    lines = [
        f"Demo: {configuration}, nnUNetCPUPlans, fold 0, budget {epochs} epochs x {iterations} iterations, test "
        f"cases from imagesTs (nnU-Net evaluation).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        mark = UNRELIABLE if busy and (row.get("busy") or base.get("busy")) else ""
        ratio = row["seconds_per_iteration"] / base["seconds_per_iteration"]
        cells = [row["trainer"], *[f"{row['dice_per_label'][k]:.3f}" for k in labels], f"{row['mean_dice']:.3f}",
                 f"{row['seconds_per_iteration']:.2f}" + (UNRELIABLE if row.get("busy") else ""),
                 f"{ratio:.2f}" + mark,
                 _number(row.get("train_cpu_seconds"), 0), _number(row.get("train_wall_seconds"), 0),
                 _number(row.get("load_average"), 1), f"{row['predict_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if busy:
        worst = max(busy, key=lambda r: r.get("load_average") or 0.0)
        lines += [f"{UNRELIABLE} Unreliable: the machine was busy while {', '.join(r['trainer'] for r in busy)} "
                  f"trained (worst: {worst['busy']}), so these wall-clock times measure the other work as much as "
                  f"the trainer. Compare trainers on an idle machine; CPU time is less affected.", ""]
    lines += ["`load` is the mean 1-minute load average during training; up to the number of cores it is the "
              "demo's own work.", ""]
    if dice_png:
        lines += [f"Dice per label: `{dice_png}` (next to this report).", ""]
    lines += ["Training curves (nnU-Net's `progress.png` of each run):", ""]
    lines += [f"- {row['trainer']}: `{row['progress_png']}`" for row in rows if row.get("progress_png")]
    lines.append("")
    if logs is not None:
        lines += [f"Full logs of every step: `{logs}`.", ""]
    if excluded:
        lines += [f"Not in this segmentation demo: {', '.join(excluded)} (classification: case-level metrics, see "
                  f"`nnunet-ext benchmark-cls`).", ""]
    lines.append("A short CPU budget shows that the pipeline works; it is not a benchmark of the methods.")
    return "\n".join(lines)
