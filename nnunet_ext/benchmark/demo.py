"""``nnunet-ext demo``: the whole pipeline on synthetic data, stock nnU-Net beside our trainers.

Every step is the stock nnU-Net command line in a child process (exactly what a user would run), inside a
work folder of its own so that the user's nnU-Net folders are never touched:

demo data -> ``nnunet-ext plan`` (CPU plans) -> ``nnunet-ext preprocess-unlabeled`` -> ``nnUNetv2_train`` per
trainer with the same budget and fold -> ``nnUNetv2_predict`` on the held-out test cases -> nnU-Net's
evaluation -> a comparison table (printed and written to ``<work>/demo_report.md``, with ``demo_dice.png``).

Two sizes (:data:`DEMO_MODES`): the default ``quick`` demo (2D configuration of small volumes, a few short epochs;
minutes on two CPU cores) and ``--full`` (3D full resolution, 10 epochs x 50 iterations; the budget the demo had
before, most of an hour). Training runs through :mod:`nnunet_ext.benchmark.measure` to record its CPU time and the
machine's load; the full output of every child process is kept in ``<work>/logs/``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nnunet_ext.benchmark.budget import trainer_import_lines, write_budget_trainers
from nnunet_ext.benchmark.child_process import last_line, run_logged
from nnunet_ext.benchmark.demo_progress import DemoProgress, format_duration
from nnunet_ext.discovery import ENV_VAR, shipped_trainer_names, trainers_dir
from nnunet_ext.errors import InputError

DEMO_DATASET_ID = 990
DEMO_DATASET = f"Dataset{DEMO_DATASET_ID:03d}_NNExtDemo"
PLANS = "nnUNetCPUPlans"
FOLD = "0"
SETTINGS_FILE = "demo_settings.json"


@dataclass(frozen=True)
class DemoMode:
    """What a demo size fixes: data shape (z, y, x), nnU-Net configuration and the default budget."""

    name: str
    configuration: str
    shape: tuple[int, int, int]
    epochs: int
    iterations: int
    val_iterations: int


DEMO_MODES = {
    # 2D slices of small volumes: a training iteration and the sliding-window prediction of a test case take a
    # fraction of their 3D cost, so every trainer still trains, predicts and is evaluated within minutes
    "quick": DemoMode("quick", "2d", (24, 32, 32), epochs=3, iterations=10, val_iterations=2),
    "full": DemoMode("full", "3d_fullres", (32, 40, 40), epochs=10, iterations=50, val_iterations=5),
}


def _script(name: str) -> str:
    """A console script of this environment (nnUNetv2_train, nnunet-ext, ...)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def default_demo_trainers() -> list[str]:
    """Our main segmentation trainers: variants (names with '_') are for benchmarks and ablations, and
    classification trainers (``task_kind == "classification"``, e.g. CFCML) have no segmentation to evaluate.
    Each class is loaded through nnU-Net's own lookup to read ``task_kind``."""
    from nnunet_ext.benchmark.trainer_info import trainer_traits

    return [name for name in shipped_trainer_names()
            if "_" not in name and trainer_traits(name).task_kind == "segmentation"]


def classification_trainers() -> list[str]:
    """Shipped main trainers that the segmentation demo leaves out (``task_kind`` other than segmentation)."""
    from nnunet_ext.benchmark.trainer_info import trainer_traits

    return [name for name in shipped_trainer_names()
            if "_" not in name and trainer_traits(name).task_kind != "segmentation"]


def demo_environment(work: Path, budget_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / var).mkdir(parents=True, exist_ok=True)
        env[var] = str(work / var)
    env.update({
        ENV_VAR: os.pathsep.join([str(trainers_dir()), str(budget_dir)]),
        "nnUNet_compile": env.get("nnUNet_compile", "f"),
        "MPLBACKEND": "Agg",
        "PYTHONUNBUFFERED": "1",  # epoch lines reach the log (and the progress lines) as they are printed
    })
    env.pop("nnUNet_n_proc_DA", None)  # 0 breaks nnU-Net 2.8.1 planning; set for training only
    return env


def seconds_per_iteration(fold_folder: Path, iterations: int) -> float:
    """Median epoch time over training iterations, from nnU-Net's own logged timestamps (includes validation
    iterations and the end-of-epoch bookkeeping, identically for every trainer)."""
    import torch

    checkpoint = torch.load(fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    log = checkpoint["logging"]
    durations = [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]
    return statistics.median(durations) / iterations


def check_demo_inputs(work: Path, mode: DemoMode, epochs: int, iterations: int, trainers: list[str],
                      heartbeat_seconds: float) -> None:
    """Refuse bad options, and a work folder whose demo data or plans were made for the other demo size.

    Raises:
        InputError: naming the option or the folder and what was expected.
    """
    for option, value in (("--epochs", epochs), ("--iterations", iterations), ("--heartbeat", heartbeat_seconds)):
        if value <= 0:
            raise InputError(f"{option} must be positive, got {value}")
    try:
        trainer_import_lines(["nnUNetTrainer", *trainers])
    except ValueError as e:
        raise InputError(f"--trainers: {e}") from None
    from nnunet_ext.benchmark.trainer_info import trainer_traits

    not_segmentation = [t for t in trainers if t != "nnUNetTrainer" and trainer_traits(t).task_kind != "segmentation"]
    if not_segmentation:
        raise InputError(f"--trainers: {not_segmentation} are not segmentation trainers; the demo evaluates "
                         f"segmentations (compare classification trainers with nnunet-ext benchmark-cls)")
    settings_file = work / SETTINGS_FILE
    if settings_file.is_file():
        previous = json.loads(settings_file.read_text())
        if (previous.get("configuration"), previous.get("shape")) != (mode.configuration, list(mode.shape)):
            raise InputError(f"{work} holds a {previous.get('name')!r} demo ({previous.get('configuration')}, "
                             f"volumes {previous.get('shape')}), not a {mode.name!r} one; pass another --work-dir")
    elif (work / "nnUNet_raw" / DEMO_DATASET).exists():
        raise InputError(f"{work / 'nnUNet_raw' / DEMO_DATASET} exists but {settings_file} does not (a demo of an "
                         f"older version?); pass another --work-dir or delete {work}")


def _run_step(progress: DemoProgress, what: str, cmd: list[str], env: dict[str, str], log_file: Path,
              heartbeat_seconds: float, on_line=None) -> None:
    code = run_logged(cmd, env, log_file, heartbeat_seconds, lambda last: progress.heartbeat(what, last), on_line)
    if code != 0:
        raise RuntimeError(f"{what} failed (exit code {code}): {' '.join(cmd)}\nlast line: {last_line(log_file)}\n"
                           f"full log: {log_file}")


def run_demo(work_dir: str | Path, epochs: int | None = None, iterations: int | None = None,
             trainers: list[str] | None = None, seed: int = 0, device: str = "cpu", full: bool = False,
             heartbeat_seconds: float = 30.0) -> list[dict]:
    """Run the demo and return one result row per trainer (also printed and written as a report).

    Args:
        epochs, iterations: the budget of every training (default: the demo size's, see :data:`DEMO_MODES`).
        full: the 3D demo with the larger budget instead of the quick 2D one.
        heartbeat_seconds: longest silence while a step runs (a progress line at least this often).

    Raises:
        InputError: bad options or a work folder of the other demo size (before anything runs).
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

    from nnunet_ext.benchmark.demo_report import format_report, plot_demo_dice
    from nnunet_ext.benchmark.measure import busy_machine_reason
    from nnunet_ext.conversion.synthetic import write_demo_dataset

    mode = DEMO_MODES["full" if full else "quick"]
    epochs = mode.epochs if epochs is None else epochs
    iterations = mode.iterations if iterations is None else iterations
    work = Path(work_dir).resolve()
    ours = default_demo_trainers() if trainers is None else list(trainers)
    check_demo_inputs(work, mode, epochs, iterations, ours, heartbeat_seconds)

    started = time.monotonic()
    config = mode.configuration
    budget_dir = work / "budget_trainers"
    env = demo_environment(work, budget_dir)
    (work / SETTINGS_FILE).write_text(json.dumps({**asdict(mode), "epochs": epochs, "iterations": iterations},
                                                 indent=2))
    logs = work / "logs"
    budget = write_budget_trainers(budget_dir, ["nnUNetTrainer", *ours], epochs, iterations, mode.val_iterations,
                                   skip_final_validation=True)
    progress = DemoProgress(len(budget), epochs)
    progress.step(f"{mode.name} demo: {config}, {len(budget)} trainings of {epochs} epochs x {iterations} "
                  f"iterations; full logs in {logs}")

    raw = work / "nnUNet_raw" / DEMO_DATASET
    if raw.exists():
        progress.step(f"reusing demo data in {raw}")
    else:
        progress.step(f"writing demo data ({'x'.join(map(str, mode.shape))} voxels per case) to {raw}")
        write_demo_dataset(work / "nnUNet_raw", dataset_id=DEMO_DATASET_ID, shape=mode.shape, seed=seed)
    if not (work / "nnUNet_preprocessed" / DEMO_DATASET / f"{PLANS}.json").exists():
        cmd = [_script("nnunet-ext"), "plan", "-d", str(DEMO_DATASET_ID), "-pl", "CPUPlanner", "-c", config, "-np",
               "2"]
        progress.step("+ " + " ".join(cmd))
        _run_step(progress, "planning and preprocessing", cmd, env, logs / "plan.log", heartbeat_seconds)
    cmd = [_script("nnunet-ext"), "preprocess-unlabeled", "-d", str(DEMO_DATASET_ID), "-c", config, "-p", PLANS,
           "-np", "2"]
    progress.step("+ " + " ".join(cmd))
    _run_step(progress, "preprocessing unlabeled images", cmd, env, logs / "preprocess_unlabeled.log",
              heartbeat_seconds)

    train_env = {**env, "nnUNet_n_proc_DA": "0"}  # augmentation in the main process: 2 CPU cores
    label_values = {k: v for k, v in json.loads((raw / "dataset.json").read_text())["labels"].items()
                    if k != "background"}
    labels = list(label_values.values())
    rows = []
    for index, (trainer, budget_name) in enumerate(budget.items(), 1):
        progress.start_run(index, trainer)
        results = work / "nnUNet_results" / DEMO_DATASET / f"{budget_name}__{PLANS}__{config}"
        fold_folder = results / f"fold_{FOLD}"
        stats_file = logs / f"{budget_name}_train_stats.json"
        train_args = [str(DEMO_DATASET_ID), config, FOLD, "-tr", budget_name, "-p", PLANS, "-device", device]
        if (fold_folder / "checkpoint_final.pth").exists():
            progress.step(f"reusing finished training in {fold_folder}")
        else:
            progress.step("+ " + " ".join([_script("nnUNetv2_train"), *train_args]))
            measured = [sys.executable, "-m", "nnunet_ext.benchmark.measure", "--stats", str(stats_file), "train",
                        "--", *train_args]
            _run_step(progress, "training", measured, train_env, logs / f"{budget_name}_train.log",
                      heartbeat_seconds, progress.on_training_line)
        progress.training_done()
        predictions = work / "predictions" / budget_name
        cmd = [_script("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(predictions),
               "-d", str(DEMO_DATASET_ID), "-c", config, "-tr", budget_name, "-p", PLANS, "-f", FOLD,
               "-device", device, "--disable_tta", "-npp", "1", "-nps", "1"]
        progress.step("+ " + " ".join(cmd))
        start = time.perf_counter()
        _run_step(progress, "predicting the test cases", cmd, train_env, logs / f"{budget_name}_predict.log",
                  heartbeat_seconds)
        predict_seconds = time.perf_counter() - start
        compute_metrics_on_folder_simple(str(raw / "labelsTs"), str(predictions), labels,
                                         output_file=str(predictions / "summary.json"), num_processes=1)
        summary = json.loads((predictions / "summary.json").read_text())
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        rows.append({
            "trainer": trainer,
            "dice_per_label": {str(k): summary["mean"][k]["Dice"] for k in summary["mean"]},
            "mean_dice": summary["foreground_mean"]["Dice"],
            "seconds_per_iteration": seconds_per_iteration(fold_folder, iterations),
            "train_wall_seconds": stats.get("wall_seconds"),
            "train_cpu_seconds": stats.get("cpu_seconds"),
            "load_average": stats.get("load_average_1min_mean"),
            "cpu_count": stats.get("cpu_count"),
            "busy": busy_machine_reason(stats),
            "predict_seconds": predict_seconds,
            "progress_png": str(fold_folder / "progress.png"),
            "train_log": str(logs / f"{budget_name}_train.log"),
        })
        progress.finish_run()
        progress.step(f"mean Dice {rows[-1]['mean_dice']:.3f}")

    dice_png = plot_demo_dice(rows, work / "demo_dice.png", {str(v): k for k, v in label_values.items()})
    report = format_report(rows, epochs, iterations, config, excluded=classification_trainers(),
                           dice_png=dice_png.name, logs=logs)
    print("\n" + report)
    (work / "demo_report.md").write_text(report + "\n")
    (work / "demo_results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nDemo done in {format_duration(time.monotonic() - started)}: {work / 'demo_report.md'}, {dice_png}",
          flush=True)
    return rows
