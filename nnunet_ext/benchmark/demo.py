"""``nnunet-ext demo``: the whole pipeline on synthetic data, stock nnU-Net beside our trainers.

Every step is the stock nnU-Net command line in a child process (exactly what a user would run), inside a
work folder of its own so that the user's nnU-Net folders are never touched:

demo data -> ``nnunet-ext plan`` (CPU plans) -> ``nnunet-ext preprocess-unlabeled`` -> ``nnUNetv2_train`` per
trainer with the same budget and fold -> ``nnUNetv2_predict`` on the held-out test cases -> nnU-Net's
evaluation -> a comparison table (printed and written to ``<work>/demo_report.md``).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nnunet_ext.benchmark.budget import write_budget_trainers
from nnunet_ext.discovery import ENV_VAR, shipped_trainer_names, trainers_dir

DEMO_DATASET_ID = 990
DEMO_DATASET = f"Dataset{DEMO_DATASET_ID:03d}_NNExtDemo"
PLANS = "nnUNetCPUPlans"
CONFIGURATION = "3d_fullres"
FOLD = "0"


def _script(name: str) -> str:
    """A console script of this environment (nnUNetv2_train, nnunet-ext, ...)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _run(cmd: list[str], env: dict[str, str], log_file: Path) -> None:
    print("+ " + " ".join(cmd), flush=True)
    with open(log_file, "a") as log:
        log.write("+ " + " ".join(cmd) + "\n")
        log.flush()
        result = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"step failed ({result.returncode}): {' '.join(cmd)}\nsee {log_file}")


def default_demo_trainers() -> list[str]:
    """Our main segmentation trainers: variants (names with '_') are for benchmarks and ablations, and
    classification trainers (``task_kind == "classification"``, e.g. CFCML) have no segmentation to evaluate.
    Each class is loaded through nnU-Net's own lookup to read ``task_kind``."""
    from nnunet_ext.benchmark.trainer_info import trainer_traits

    return [name for name in shipped_trainer_names()
            if "_" not in name and trainer_traits(name).task_kind == "segmentation"]


def demo_environment(work: Path, budget_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / var).mkdir(parents=True, exist_ok=True)
        env[var] = str(work / var)
    env.update({
        ENV_VAR: os.pathsep.join([str(trainers_dir()), str(budget_dir)]),
        "nnUNet_compile": env.get("nnUNet_compile", "f"),
        "MPLBACKEND": "Agg",
    })
    env.pop("nnUNet_n_proc_DA", None)  # 0 breaks nnU-Net 2.8.1 planning; set for training only
    return env


def seconds_per_iteration(fold_folder: Path, iterations: int) -> float:
    """Median epoch time over training iterations, from nnU-Net's own logged timestamps (includes validation
    iterations and the end-of-epoch bookkeeping, identically for every trainer)."""
    checkpoint = torch.load(fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    log = checkpoint["logging"]
    durations = [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]
    return statistics.median(durations) / iterations


def run_demo(work_dir: str | Path, epochs: int = 10, iterations: int = 50, trainers: list[str] | None = None,
             seed: int = 0, device: str = "cpu") -> list[dict]:
    """Run the demo and return one result row per trainer (also printed and written as a report)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

    from nnunet_ext.conversion.synthetic import write_demo_dataset

    work = Path(work_dir).resolve()
    budget_dir = work / "budget_trainers"
    env = demo_environment(work, budget_dir)
    log_file = work / "demo_commands.log"
    ours = default_demo_trainers() if trainers is None else list(trainers)
    budget = write_budget_trainers(budget_dir, ["nnUNetTrainer", *ours], epochs, iterations)

    raw = work / "nnUNet_raw" / DEMO_DATASET
    if raw.exists():
        print(f"Reusing demo data in {raw}")
    else:
        write_demo_dataset(work / "nnUNet_raw", dataset_id=DEMO_DATASET_ID, seed=seed)
    if not (work / "nnUNet_preprocessed" / DEMO_DATASET / f"{PLANS}.json").exists():
        _run([_script("nnunet-ext"), "plan", "-d", str(DEMO_DATASET_ID), "-pl", "CPUPlanner", "-c", CONFIGURATION,
              "-np", "2"], env, log_file)
    _run([_script("nnunet-ext"), "preprocess-unlabeled", "-d", str(DEMO_DATASET_ID), "-c", CONFIGURATION,
          "-p", PLANS, "-np", "2"], env, log_file)

    train_env = {**env, "nnUNet_n_proc_DA": "0"}  # augmentation in the main process: 2 CPU cores
    labels = [v for k, v in json.loads((raw / "dataset.json").read_text())["labels"].items() if k != "background"]
    rows = []
    for trainer, budget_name in budget.items():
        results = work / "nnUNet_results" / DEMO_DATASET / f"{budget_name}__{PLANS}__{CONFIGURATION}"
        fold_folder = results / f"fold_{FOLD}"
        if (fold_folder / "checkpoint_final.pth").exists():
            print(f"Reusing finished training in {fold_folder}")
        else:
            _run([_script("nnUNetv2_train"), str(DEMO_DATASET_ID), CONFIGURATION, FOLD, "-tr", budget_name,
                  "-p", PLANS, "-device", device], train_env, log_file)
        predictions = work / "predictions" / budget_name
        start = time.perf_counter()
        _run([_script("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(predictions),
              "-d", str(DEMO_DATASET_ID), "-c", CONFIGURATION, "-tr", budget_name, "-p", PLANS, "-f", FOLD,
              "-device", device, "--disable_tta", "-npp", "1", "-nps", "1"], train_env, log_file)
        predict_seconds = time.perf_counter() - start
        compute_metrics_on_folder_simple(str(raw / "labelsTs"), str(predictions), labels,
                                         output_file=str(predictions / "summary.json"), num_processes=1)
        summary = json.loads((predictions / "summary.json").read_text())
        rows.append({
            "trainer": trainer,
            "dice_per_label": {str(k): summary["mean"][k]["Dice"] for k in summary["mean"]},
            "mean_dice": summary["foreground_mean"]["Dice"],
            "seconds_per_iteration": seconds_per_iteration(fold_folder, iterations),
            "predict_seconds": predict_seconds,
        })
    report = format_report(rows, epochs, iterations)
    print("\n" + report)
    (work / "demo_report.md").write_text(report + "\n")
    (work / "demo_results.json").write_text(json.dumps(rows, indent=2))
    return rows


def format_report(rows: list[dict], epochs: int, iterations: int) -> str:
    labels = sorted({k for row in rows for k in row["dice_per_label"]}, key=int)
    base = next(r for r in rows if r["trainer"] == "nnUNetTrainer")
    header = ["trainer", *[f"Dice {k}" for k in labels], "mean Dice", "s/iter", "x stock", "predict s"]
    lines = [
        f"Demo: {DEMO_DATASET}, {CONFIGURATION}, {PLANS}, fold {FOLD}, budget {epochs} epochs x {iterations} "
        f"iterations, test cases from imagesTs (nnU-Net evaluation).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [row["trainer"], *[f"{row['dice_per_label'][k]:.3f}" for k in labels], f"{row['mean_dice']:.3f}",
                 f"{row['seconds_per_iteration']:.2f}",
                 f"{row['seconds_per_iteration'] / base['seconds_per_iteration']:.2f}",
                 f"{row['predict_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "A short CPU budget shows that the pipeline works; it is not a benchmark of the methods."]
    return "\n".join(lines)
