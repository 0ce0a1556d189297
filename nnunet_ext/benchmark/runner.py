"""``nnunet-ext benchmark``: stock nnU-Net and other trainers on one dataset, budget, seeds and test split.

For every (trainer, seed) the stock command lines run in child processes, each wrapped by
:mod:`nnunet_ext.benchmark.measure` (same entry point, plus time and peak memory):

``nnUNetv2_train DATASET CONFIG FOLD -tr <Trainer>_e{E}i{I}s{S} -p PLANS -device DEV`` ->
``nnUNetv2_predict -i imagesTs ... -chk checkpoint_final.pth`` -> evaluation against ``labelsTs`` (nnU-Net's Dice,
MedPy's HD95) -> ``results.json``, ``report.md`` and PNG plots in the output folder. With ``--cv-folds K`` every
(trainer, seed) runs once per nnU-Net fold on that fold's validation cases instead of the test split, and the folds
are pooled per (trainer, seed) (:mod:`nnunet_ext.benchmark.cross_validation`).

Layout of the output folder (the user's ``nnUNet_raw``/``nnUNet_preprocessed`` are read; trained models go to the
output folder's own ``nnUNet_results``)::

    OUTPUT/budget_trainers/nnunet_ext_budget_trainers.py     generated budget/seed trainers
    OUTPUT/nnUNet_results/<Dataset>/<Trainer>_e..i..s..__<plans>__<config>/fold_<f>/
    OUTPUT/runs/<Dataset>/<Trainer>_e..i..s..__<plans>__<config>/fold_<f>/
        run.json  provenance.json  train.log  train_stats.json  predict.log  predict_stats.json  predictions/
        evaluation.json
    OUTPUT/cross_validation/<Dataset>/fold_<k>/imagesVal, labelsVal/   (--cv-folds) links to a fold's test cases
    OUTPUT/logs/   OUTPUT/plots/   OUTPUT/results.json   OUTPUT/report.md

Re-running skips every finished step (checkpoint_final, all predictions, evaluation) whose recorded inputs are
unchanged (:mod:`nnunet_ext.benchmark.provenance`: a stale trained model stops the benchmark, stale predictions or
evaluations are redone); a failed run is retried and, if it fails again, reported with its log tail.
``--overwrite`` deletes the folders of the requested runs first; nothing is deleted without it.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nnunet_ext.benchmark.budget import STOCK_TRAINER, Budget, write_benchmark_trainers
from nnunet_ext.benchmark.child_process import run_logged
from nnunet_ext.benchmark.datasets import (
    BenchmarkError,
    DatasetInfo,
    check_missing_channels,
    check_same_test_cases,
    plans_differences,
    resolve_dataset,
)
from nnunet_ext.discovery import ENV_VAR, ext_trainer_path

RESULTS_FORMAT = 1
LOG_TAIL_LINES = 40


@dataclass
class BenchmarkSettings:
    """Everything that defines a benchmark (see ``nnunet-ext benchmark --help``)."""

    dataset: str
    output: Path
    trainers: tuple[str, ...] = ()
    configuration: str = "3d_fullres"
    plans: str = "nnUNetCPUPlans"
    budget: Budget = field(default_factory=lambda: Budget(10, 50))
    seeds: tuple[int, ...] = (0,)
    fold: str = "all"
    device: str = "cpu"
    upper_bound_dataset: str | None = None
    extra_trainer_dirs: tuple[Path, ...] = ()
    planner: str | None = None
    final_validation: bool = False
    tta: bool = False
    da_workers: int | None = None
    predict_processes: int = 1
    overwrite: bool = False
    heartbeat_seconds: float = 60.0
    missing_channels: tuple[str, ...] = ()
    equal_time: bool = False
    equal_time_costs: Path | None = None  # results.json of a quiet cost run (equal_time.cost_ratios_from_results)
    cv_folds: int | None = None  # K-fold cross-validation instead of the test split (benchmark.cross_validation)

    def __post_init__(self) -> None:
        self.output = Path(self.output).resolve()
        self.trainers = tuple(self.trainers)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.extra_trainer_dirs = tuple(Path(d).resolve() for d in self.extra_trainer_dirs)
        self.missing_channels = tuple(dict.fromkeys(str(c) for c in self.missing_channels))
        if self.fold != "all":
            try:
                if int(self.fold) < 0:
                    raise ValueError
            except ValueError:
                raise BenchmarkError(f"fold must be 'all' or a non-negative integer, got {self.fold!r}") from None
        if self.cv_folds is not None:
            from nnunet_ext.benchmark.cross_validation import check_cross_validation_settings

            check_cross_validation_settings(self)
        if self.device not in ("cpu", "cuda", "mps"):
            raise BenchmarkError(f"device must be cpu, cuda or mps, got {self.device!r}")
        if self.equal_time_costs is not None:
            if not self.equal_time:
                raise BenchmarkError("--equal-time-costs only sets where --equal-time takes its cost ratios from; "
                                     "add --equal-time")
            self.equal_time_costs = Path(self.equal_time_costs).resolve()
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise BenchmarkError(f"seeds must be distinct non-negative integers, got {list(self.seeds)}")
        if self.da_workers is not None and self.da_workers < 0:
            raise BenchmarkError(f"da_workers must be >= 0, got {self.da_workers}")
        if self.predict_processes < 1:
            raise BenchmarkError(f"predict_processes must be >= 1, got {self.predict_processes}")
        for folder in self.extra_trainer_dirs:
            if not folder.is_dir():
                raise BenchmarkError(f"trainer folder {folder} does not exist")


class Progress:
    """Prints each step with the time elapsed since the benchmark started."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.start
        print(f"[{int(elapsed // 60):3d}:{elapsed % 60:04.1f}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- plans
def _plan_command(dataset: str, settings: BenchmarkSettings) -> list[str]:
    dataset_id = dataset[len("Dataset"):len("Dataset") + 3]  # `nnunet-ext plan -d` takes the numeric ID
    return [sys.executable, "-m", "nnunet_ext.cli", "plan", "-d", dataset_id, "-pl", settings.planner,
            "-c", settings.configuration, "-np", "2"]


def ensure_plans(info: DatasetInfo, settings: BenchmarkSettings, env: dict, progress: Progress) -> Path:
    """The plans file with the configuration and its preprocessed data; plans with ``settings.planner`` if absent.

    Raises:
        BenchmarkError: plans/configuration/preprocessed data missing (with the command that makes them).
    """
    plans_file = info.preprocessed / f"{settings.plans}.json"
    if not plans_file.is_file() and settings.planner is not None:
        cmd = _plan_command(info.name, settings)
        progress(f"planning {info.name}: {shlex.join(cmd)}")
        log = settings.output / "logs" / f"plan_{info.name}.log"
        if _run_logged(cmd, env, log, progress, settings) != 0:
            raise BenchmarkError(f"planning failed:\n{log_tail(log)}\n(see {log})")
    hint = (f"nnunet-ext plan -d {info.name} -pl CPUPlanner -c {settings.configuration}"
            if settings.plans == "nnUNetCPUPlans" else
            f"nnUNetv2_plan_and_preprocess -d {info.name} -c {settings.configuration}")
    if not plans_file.is_file():
        raise BenchmarkError(f"plans {plans_file} not found; plan the dataset first ({hint}) or pass --planner")
    plans = json.loads(plans_file.read_text())
    configuration = plans.get("configurations", {}).get(settings.configuration)
    if configuration is None:
        raise BenchmarkError(f"configuration {settings.configuration!r} is not in {plans_file}; available: "
                             f"{sorted(plans.get('configurations', {}))}")
    data_identifier = configuration.get("data_identifier")
    if data_identifier is None:  # inheriting configurations take it from their parent
        parent = plans["configurations"].get(configuration.get("inherits_from", ""), {})
        data_identifier = parent.get("data_identifier")
    data_folder = info.preprocessed / str(data_identifier)
    if not data_folder.is_dir() or not any(data_folder.iterdir()):
        raise BenchmarkError(f"preprocessed data {data_folder} is missing; preprocess the configuration "
                             f"({hint})")
    return plans_file


# ---------------------------------------------------------------------------------------------- child processes
def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _run_logged(cmd: list[str], env: dict, log_file: Path, progress: Progress, settings: BenchmarkSettings) -> int:
    """Run ``cmd`` with output appended to ``log_file``; prints the log's last line every heartbeat."""
    return run_logged(cmd, env, log_file, settings.heartbeat_seconds,
                      lambda last: progress(f"  ... running ({log_file.name}): {last[:150]}"))


def child_environment(settings: BenchmarkSettings) -> dict[str, str]:
    """Environment for planning/preprocessing children: the user's, our trainers, results in OUTPUT."""
    env = dict(os.environ)
    env["nnUNet_results"] = str(settings.output / "nnUNet_results")
    env[ENV_VAR] = os.pathsep.join([ext_trainer_path(env.get(ENV_VAR)), *map(str, settings.extra_trainer_dirs),
                                    str(settings.output / "budget_trainers")])
    env["MPLBACKEND"] = "Agg"
    # stdout and stderr share the log file: unbuffered, a traceback lands after the lines printed before it
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("nnUNet_n_proc_DA", None)  # 0 breaks nnU-Net 2.8.1 planning; set for training only
    return env


def training_environment(settings: BenchmarkSettings, base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    if settings.da_workers is not None:
        env["nnUNet_n_proc_DA"] = str(settings.da_workers)
    elif settings.device == "cpu":
        # augmentation in the main process: reproducible with a seed, and the right choice on few CPU cores
        env["nnUNet_n_proc_DA"] = "0"
    elif "nnUNet_n_proc_DA" in os.environ:
        env["nnUNet_n_proc_DA"] = os.environ["nnUNet_n_proc_DA"]
    return env


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    role: str                 # baseline | method | upper_bound
    label: str
    trainer: str
    budget_trainer: str
    dataset: DatasetInfo
    seed: int
    handles_missing_modalities: bool = False
    inputs: dict | None = None  # what each step depends on (nnunet_ext.benchmark.provenance)
    iterations: int | None = None  # training iterations per epoch if not the benchmark's (equal-time runs)
    fold: str | None = None  # nnU-Net fold of a cross-validation run; None: the benchmark's --fold

    @property
    def name(self) -> str:
        """``Label [Dataset] seed S`` (plus ``fold K`` in cross-validation), as the progress lines name a run."""
        return f"{self.label} [{self.dataset.name}] seed {self.seed}" + \
            ("" if self.fold is None else f" fold {self.fold}")

    def nnunet_fold(self, settings: BenchmarkSettings) -> str:
        return settings.fold if self.fold is None else self.fold

    def key(self, settings: BenchmarkSettings) -> str:
        return f"{self.dataset.name}/{self.budget_trainer}__{settings.plans}__{settings.configuration}/" \
               f"fold_{self.nnunet_fold(settings)}"

    def run_dir(self, settings: BenchmarkSettings) -> Path:
        return settings.output / "runs" / self.key(settings)

    def fold_dir(self, settings: BenchmarkSettings) -> Path:
        return settings.output / "nnUNet_results" / self.key(settings)


def _settings_key(settings: BenchmarkSettings) -> dict:
    """Settings that change a run's outputs without changing its folder name."""
    return {"device": settings.device, "tta": settings.tta, "final_validation": settings.final_validation}


def _commands(run: Run, settings: BenchmarkSettings, plans_file: Path) -> dict:
    run_dir = run.run_dir(settings)
    train = [run.dataset.name, settings.configuration, run.nnunet_fold(settings), "-tr", run.budget_trainer,
             "-p", settings.plans, "-device", settings.device]
    predict = ["-i", str(run.dataset.test_images), "-o", str(run_dir / "predictions"), "-d", run.dataset.name,
               "-c", settings.configuration, "-tr", run.budget_trainer, "-p", settings.plans,
               "-f", run.nnunet_fold(settings), "-device", settings.device, "-chk", "checkpoint_final.pth",
               "-npp", str(settings.predict_processes), "-nps", str(settings.predict_processes)]
    if not settings.tta:
        predict.append("--disable_tta")
    measure = [sys.executable, "-m", "nnunet_ext.benchmark.measure"]
    return {
        "train_args": train, "predict_args": predict,
        "train": shlex.join(["nnUNetv2_train", *train]),
        "predict": shlex.join(["nnUNetv2_predict", *predict]),
        "train_measured": [*measure, "--stats", str(run_dir / "train_stats.json"), "train", "--", *train],
        "predict_measured": [*measure, "--stats", str(run_dir / "predict_stats.json"), "predict", "--", *predict],
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def _fail(record: dict, step: str, error: str, log_file: Path) -> dict:
    """Mark ``record`` failed with the log's tail and its last exception line (else its last line)."""
    tail = log_tail(log_file)
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
    detail = exceptions[-1] if exceptions else (lines[-1] if lines else "")
    record.update(status="failed", failed_step=step, log_file=str(log_file), log_tail=tail,
                  error=error + (f": {detail}" if detail and detail not in error else ""))
    return record


SEGMENTATION_CURVES = ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice")


def training_record(fold_dir: Path, run_dir: Path, iterations: int,
                    curve_keys: Sequence[str] = SEGMENTATION_CURVES) -> dict:
    """Cost and curves of a finished training: seconds per iteration from the logged epoch timestamps of
    ``fold_dir/checkpoint_final.pth``, memory from ``run_dir/train_stats.json``, the logged ``curve_keys`` per
    epoch (``train_losses`` must be among them: it counts the epochs)."""
    import torch

    from nnunet_ext.benchmark.report import seconds_per_iteration

    checkpoint = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = checkpoint["logging"]
    timing = seconds_per_iteration(logging, iterations)
    stats = _read_json(run_dir / "train_stats.json") or {}
    curves = {k: [float(v) for v in logging.get(k, [])] for k in curve_keys}
    return {
        "seconds_per_iteration": timing["value"], "epochs_timed": timing["epochs_timed"],
        "warmup_excluded": timing["warmup_excluded"], "epochs": len(curves["train_losses"]),
        "wall_seconds": stats.get("wall_seconds"), "peak_rss_mb": stats.get("peak_rss_mb"),
        "maxrss_self_mb": stats.get("maxrss_self_mb"), "maxrss_children_mb": stats.get("maxrss_children_mb"),
        "cuda_max_memory_allocated_mb": stats.get("cuda_max_memory_allocated_mb"),
        "curves": curves,
    }


def _predictions_complete(run: Run, settings: BenchmarkSettings) -> bool:
    stats = _read_json(run.run_dir(settings) / "predict_stats.json")
    ending = run.dataset.dataset_json["file_ending"]
    folder = run.run_dir(settings) / "predictions"
    return bool(stats) and stats.get("returncode") == 0 and \
        all((folder / f"{case}{ending}").is_file() for case in run.dataset.test_cases)


def check_run_folder_reusable(run_dir: Path, settings_key: dict) -> None:
    """Refuse to continue a run folder whose ``run.json`` was written with another ``settings_key``.

    Raises:
        BenchmarkError: naming the folder, both settings and the way out.
    """
    previous = _read_json(run_dir / "run.json")
    if previous is not None and previous.get("settings_key") != settings_key:
        raise BenchmarkError(f"{run_dir} was made with other settings ({previous.get('settings_key')} instead of "
                             f"{settings_key}); use another --output or pass --overwrite to redo it")


def check_reusable(run: Run, settings: BenchmarkSettings) -> None:
    """Refuse to continue a run folder that was made with other settings (device, TTA, final validation) or whose
    trained model was made from other inputs (:mod:`nnunet_ext.benchmark.provenance`)."""
    check_run_folder_reusable(run.run_dir(settings), _settings_key(settings))
    if run.inputs is not None:
        from nnunet_ext.benchmark.provenance import check_segmentation_run

        check_segmentation_run(run, settings)


def _record_step(run: Run, settings: BenchmarkSettings, step: str, trained_now: bool = False) -> None:
    if run.inputs is not None:
        from nnunet_ext.benchmark.provenance import record_segmentation_step

        record_segmentation_step(run, settings, step, trained_now)


def execute_run(run: Run, settings: BenchmarkSettings, plans_file: Path, env: dict, train_env: dict,
                progress: Progress) -> dict:
    """Train, predict and evaluate one run, skipping finished steps; returns its ``results.json`` record."""
    from nnunet_ext.benchmark.metrics import evaluate_folder

    run_dir, fold_dir = run.run_dir(settings), run.fold_dir(settings)
    name = run.name
    check_run_folder_reusable(run_dir, _settings_key(settings))
    if run.inputs is not None:  # checks the provenance (as check_reusable) and discards stale outputs
        from nnunet_ext.benchmark.provenance import prepare_segmentation_run

        prepare_segmentation_run(run, settings, progress, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    commands = _commands(run, settings, plans_file)
    record = {
        "key": run.key(settings), "role": run.role, "label": run.label, "trainer": run.trainer,
        "budget_trainer": run.budget_trainer, "dataset": run.dataset.name, "seed": run.seed,
        "fold": run.nnunet_fold(settings), "status": "ok",
        "failed_step": None, "error": None, "log_file": None, "log_tail": None, "reused_steps": [],
        "settings_key": _settings_key(settings),
        "commands": {"train": commands["train"], "predict": commands["predict"],
                     "train_measured": shlex.join(commands["train_measured"]),
                     "predict_measured": shlex.join(commands["predict_measured"]),
                     "environment": {k: train_env.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed",
                                                                    "nnUNet_results", ENV_VAR, "nnUNet_n_proc_DA")}},
        "paths": {"run": str(run_dir), "model": str(fold_dir), "predictions": str(run_dir / "predictions")},
        "training": None, "inference": None, "evaluation": None,
    }

    def finish(rec: dict) -> dict:
        (run_dir / "run.json").write_text(json.dumps(rec, indent=2))
        if rec["status"] != "ok":
            progress(f"FAILED {name}: {rec['failed_step']}: {rec['error']} (log: {rec['log_file']})")
        return rec

    # training
    if (fold_dir / "checkpoint_final.pth").is_file():
        progress(f"{name}: training finished earlier, reusing {fold_dir}")
        record["reused_steps"].append("training")
    else:
        progress(f"{name}: training: {commands['train']}")
        log = run_dir / "train.log"
        code = _run_logged(commands["train_measured"], train_env, log, progress, settings)
        if (fold_dir / "checkpoint_final.pth").is_file():  # recorded even when a later part (final validation) failed
            _record_step(run, settings, "training", trained_now=True)
        if code != 0 or not (fold_dir / "checkpoint_final.pth").is_file():
            return finish(_fail(record, "training", f"nnUNetv2_train exited with code {code}", log))
    record["trained_with"] = None if run.inputs is None else run.inputs["training"]
    record["training"] = training_record(fold_dir, run_dir, run.iterations or settings.budget.iterations)
    progress(f"{name}: {record['training']['seconds_per_iteration'] or math.nan:.3f} s/iteration, peak memory "
             f"{record['training']['peak_rss_mb'] or math.nan:.0f} MB")

    # prediction of the test split
    if _predictions_complete(run, settings):
        progress(f"{name}: predictions exist, reusing")
        record["reused_steps"].append("prediction")
    else:
        progress(f"{name}: predicting {len(run.dataset.image_cases)} test case(s): {commands['predict']}")
        log = run_dir / "predict.log"
        code = _run_logged(commands["predict_measured"], train_env, log, progress, settings)
        if code != 0 or not _predictions_complete(run, settings):
            return finish(_fail(record, "prediction", f"nnUNetv2_predict exited with code {code}", log))
    _record_step(run, settings, "prediction")
    stats = _read_json(run_dir / "predict_stats.json") or {}
    seconds, network = stats.get("predict_from_files_seconds"), stats.get("network_seconds")
    n_images = len(run.dataset.image_cases)
    record["inference"] = {
        "seconds_per_case": None if seconds is None else seconds / max(1, n_images),
        "network_seconds_per_case": None if network is None else network / max(1, stats["network_seconds_calls"]),
        "n_cases": n_images, "predict_from_files_seconds": seconds, "network_seconds": network,
        "wall_seconds": stats.get("wall_seconds"), "peak_rss_mb": stats.get("peak_rss_mb"),
    }

    # evaluation against labelsTs
    evaluation_file = run_dir / "evaluation.json"
    stats_file = run_dir / "predict_stats.json"
    if evaluation_file.is_file() and evaluation_file.stat().st_mtime >= stats_file.stat().st_mtime:
        record["evaluation"] = _read_json(evaluation_file)
        record["reused_steps"].append("evaluation")
    if record["evaluation"] is None:
        try:
            record["evaluation"] = evaluate_folder(run.dataset.test_labels, run_dir / "predictions",
                                                   run.dataset.raw / "dataset.json", plans_file, evaluation_file)
        except Exception as e:  # reported like a crashed step, not hidden
            (run_dir / "evaluation.log").write_text(traceback.format_exc())
            return finish(_fail(record, "evaluation", f"{type(e).__name__}: {e}", run_dir / "evaluation.log"))
    _record_step(run, settings, "evaluation")
    progress(f"{name}: mean Dice {record['evaluation']['foreground_mean']['Dice']:.4f}, inference "
             f"{record['inference']['seconds_per_case'] or math.nan:.2f} s/case")
    if settings.missing_channels and run.role != "upper_bound":
        step = predict_without_channels(run, settings, plans_file, train_env, progress, record)
        if step is not None:
            return finish(step)
    return finish(record)


def _missing_tag(channels: Sequence[str]) -> str:
    return "without_" + "_".join(re.sub(r"[^A-Za-z0-9]+", "-", c) for c in channels)


def predict_without_channels(run: Run, settings: BenchmarkSettings, plans_file: Path, env: dict,
                             progress: Progress, record: dict) -> dict | None:
    """Predict and evaluate the test split again with ``settings.missing_channels`` absent (``record["missing"]``).

    Models built to handle a missing modality (``handles_missing_modalities``, CIML) switch its messages off;
    every other model gets the channel as an all-zero image (what a stock nnU-Net user can do). Both through
    ``nnunet-ext predict --missing ... --missing-mode``. Returns the failed record, or None when the step worked.
    """
    from nnunet_ext.benchmark.metrics import evaluate_folder

    channels = list(settings.missing_channels)
    mode = "messages-off" if run.handles_missing_modalities else "zero-fill"
    tag = _missing_tag(channels)
    run_dir = run.run_dir(settings)
    predictions, evaluation_file = run_dir / f"predictions_{tag}", run_dir / f"evaluation_{tag}.json"
    args = ["predict", "-i", str(run.dataset.test_images), "-o", str(predictions), "-d", run.dataset.name,
            "-c", settings.configuration, "-tr", run.budget_trainer, "-p", settings.plans,
            "-f", run.nnunet_fold(settings), "-chk", "checkpoint_final.pth", "-device", settings.device,
            "-npp", str(settings.predict_processes), "-nps", str(settings.predict_processes), "--missing", *channels,
            "--missing-mode", mode]
    if not settings.tta:
        args.append("--disable_tta")
    step = f"prediction without {', '.join(channels)}"
    record["missing"] = {"channels": channels, "mode": mode, "command": shlex.join(["nnunet-ext", *args]),
                         "predictions": str(predictions), "evaluation": None}
    ending = run.dataset.dataset_json["file_ending"]
    complete = all((predictions / f"{case}{ending}").is_file() for case in run.dataset.test_cases)
    if complete and evaluation_file.is_file():
        record["missing"]["evaluation"] = _read_json(evaluation_file)
    if record["missing"]["evaluation"] is not None:
        record["reused_steps"].append(step)
    else:
        progress(f"{run.name}: {step} ({mode})")
        log = run_dir / f"predict_{tag}.log"
        if predictions.exists():  # an interrupted earlier attempt: its files are ours (inside the run folder)
            shutil.rmtree(predictions)
        code = _run_logged([sys.executable, "-m", "nnunet_ext.cli", *args], env, log, progress, settings)
        if code != 0:
            return _fail(record, step, f"nnunet-ext predict exited with code {code}", log)
        try:
            record["missing"]["evaluation"] = evaluate_folder(run.dataset.test_labels, predictions,
                                                              run.dataset.raw / "dataset.json", plans_file,
                                                              evaluation_file)
        except Exception as e:  # reported like a crashed step, not hidden
            (run_dir / f"evaluation_{tag}.log").write_text(traceback.format_exc())
            return _fail(record, f"evaluation without {', '.join(channels)}", f"{type(e).__name__}: {e}",
                         run_dir / f"evaluation_{tag}.log")
    progress(f"{run.name}: mean Dice without {', '.join(channels)} "
             f"{record['missing']['evaluation']['foreground_mean']['Dice']:.4f} ({mode})")
    return None


# ---------------------------------------------------------------------------------------------- the benchmark
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("nnunet-ext", "nnunetv2", "torch", "medpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def _select_trainers(settings: BenchmarkSettings, progress: Progress
                     ) -> tuple[list[str], list[dict], bool, dict[str, bool]]:
    """Stock first, then the requested segmentation trainers; classification trainers are excluded. Also returns
    whether any needs unlabeled images and, per trainer, whether it handles missing modalities by design."""
    from nnunet_ext.benchmark.trainer_info import trainer_traits

    selected, excluded, needs_unlabeled = [STOCK_TRAINER], [], False
    handles_missing = {STOCK_TRAINER: False}
    for trainer in dict.fromkeys(settings.trainers):
        if trainer == STOCK_TRAINER:
            continue
        try:
            traits = trainer_traits(trainer, settings.extra_trainer_dirs)
        except ValueError as e:
            raise BenchmarkError(str(e)) from e
        if traits.task_kind != "segmentation":
            reason = (f"task_kind = {traits.task_kind!r}: not evaluated by a segmentation benchmark "
                      f"(classification trainers report case-level metrics, see their documentation)")
            progress(f"excluding {trainer}: {reason}")
            excluded.append({"trainer": trainer, "reason": reason})
            continue
        selected.append(trainer)
        needs_unlabeled |= traits.semi_supervised
        handles_missing[trainer] = traits.handles_missing_modalities
    return selected, excluded, needs_unlabeled, handles_missing


def _prepare_output(settings: BenchmarkSettings, runs: Sequence[Run], progress: Progress) -> None:
    settings.output.mkdir(parents=True, exist_ok=True)
    if settings.overwrite:
        for run in runs:
            for folder in (run.run_dir(settings), run.fold_dir(settings)):
                if folder.exists():
                    progress(f"--overwrite: deleting {folder}")
                    shutil.rmtree(folder)


def run_benchmark(settings: BenchmarkSettings) -> dict:
    """Run (or complete) the benchmark and write ``results.json``, ``report.md`` and ``plots/``.

    Returns:
        The results dictionary (also in ``OUTPUT/results.json``).

    Raises:
        BenchmarkError: bad inputs, found before any training starts.
    """
    from nnunet_ext.benchmark.budget import budget_trainer_name

    progress = Progress()
    info = resolve_dataset(settings.dataset, test_split=settings.cv_folds is None)
    upper = None
    if settings.upper_bound_dataset is not None:
        upper = resolve_dataset(settings.upper_bound_dataset)
        if upper.name == info.name:
            raise BenchmarkError("--upper-bound-dataset must be another dataset (all training cases labeled)")
        check_same_test_cases(info, upper)
    if settings.cv_folds is None:
        progress(f"dataset {info.name}: {len(info.test_cases)} test case(s) in {info.test_labels}")
    if settings.missing_channels:
        check_missing_channels(info, settings.missing_channels)
    trainers, excluded, needs_unlabeled, handles_missing = _select_trainers(settings, progress)
    if settings.equal_time and len(trainers) < 2:
        raise BenchmarkError("--equal-time trains stock nnUNetTrainer for as long as each method trained: name at "
                             "least one segmentation trainer besides nnUNetTrainer with --trainers")
    measured_cost_ratios = None
    if settings.equal_time_costs is not None:  # read and checked once, before any run starts
        from nnunet_ext.benchmark.equal_time import cost_ratios_from_results

        measured_cost_ratios = cost_ratios_from_results(
            settings.equal_time_costs, info.name, settings.configuration, settings.plans, settings.device,
            settings.budget, [t for t in trainers if t != STOCK_TRAINER])
    settings.output.mkdir(parents=True, exist_ok=True)
    env = child_environment(settings)
    plans_files = {info.name: ensure_plans(info, settings, env, progress)}
    if upper is not None:
        plans_files[upper.name] = ensure_plans(upper, settings, env, progress)
    cross_validation = None
    if settings.cv_folds is not None:  # after planning: the split goes into the preprocessed dataset folder
        from nnunet_ext.benchmark.cross_validation import prepare_cross_validation

        cross_validation = prepare_cross_validation(info, settings, progress)
    if needs_unlabeled:
        if not (info.raw / "imagesUnlabeled").is_dir():
            raise BenchmarkError(f"semi-supervised trainer(s) requested but {info.raw / 'imagesUnlabeled'} does not "
                                 f"exist; add the unlabeled images there (named like imagesTr)")
        cmd = [sys.executable, "-m", "nnunet_ext.cli", "preprocess-unlabeled", "-d", info.name,
               "-c", settings.configuration, "-p", settings.plans, "-np", "2"]
        progress(f"preprocessing unlabeled images (cases done earlier are skipped): {shlex.join(cmd)}")
        log = settings.output / "logs" / f"preprocess_unlabeled_{info.name}.log"
        if _run_logged(cmd, env, log, progress, settings) != 0:
            raise BenchmarkError(f"nnunet-ext preprocess-unlabeled failed:\n{log_tail(log)}\n(see {log})")

    budget_dir = settings.output / "budget_trainers"
    names = write_benchmark_trainers(budget_dir, trainers, settings.budget, settings.seeds,
                                     skip_final_validation=not settings.final_validation,
                                     extra_trainer_dirs=settings.extra_trainer_dirs)
    runs = []
    for seed in settings.seeds:
        for trainer in trainers:
            role = "baseline" if trainer == STOCK_TRAINER else "method"
            run = Run(role, trainer, trainer, names[(trainer, seed)], info, seed, handles_missing[trainer])
            runs += [run] if cross_validation is None else cross_validation.fold_runs(run)
        if upper is not None:
            runs.append(Run("upper_bound", "stock, all labeled", STOCK_TRAINER,
                            budget_trainer_name(STOCK_TRAINER, settings.budget.epochs, settings.budget.iterations,
                                                seed), upper, seed))
    _prepare_output(settings, runs, progress)
    from nnunet_ext.benchmark.provenance import attach_segmentation_inputs

    attach_segmentation_inputs(runs, settings, plans_files)
    for run in runs:  # before the first run starts
        check_reusable(run, settings)
    train_env = training_environment(settings, env)
    records = []
    for i, run in enumerate(runs, 1):
        progress(f"run {i}/{len(runs)}: {run.name}")
        records.append(execute_run(run, settings, plans_files[run.dataset.name], env, train_env, progress))
    if cross_validation is not None:  # one record per (trainer, seed) over all cases: statistics work unchanged
        from nnunet_ext.benchmark.cross_validation import pool_fold_records

        records = pool_fold_records(records)
    equal_time_plans = None
    if settings.equal_time:
        from nnunet_ext.benchmark.equal_time import run_equal_time

        equal_time_records, equal_time_plans = run_equal_time(settings, trainers, records, info,
                                                              plans_files[info.name], env, train_env, progress,
                                                              cross_validation, measured_cost_ratios)
        records += equal_time_records

    results = {
        "format": RESULTS_FORMAT,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {
            "dataset": settings.dataset, "dataset_name": info.name, "configuration": settings.configuration,
            "plans": settings.plans, "fold": None if cross_validation else settings.fold, "device": settings.device,
            "budget": asdict(settings.budget), "seeds": list(settings.seeds), "trainers": trainers,
            "upper_bound_dataset": settings.upper_bound_dataset,
            "upper_bound_dataset_name": None if upper is None else upper.name,
            "test_images": None if cross_validation else str(info.test_images),
            "test_labels": None if cross_validation else str(info.test_labels), "tta": settings.tta,
            "final_validation": settings.final_validation, "missing_channels": list(settings.missing_channels),
            "equal_time": settings.equal_time, "cv_folds": settings.cv_folds,
            "equal_time_costs": None if settings.equal_time_costs is None else str(settings.equal_time_costs),
            "nnUNet_n_proc_DA": train_env.get("nnUNet_n_proc_DA"),
            "extra_trainer_dirs": [str(d) for d in settings.extra_trainer_dirs],
            "output": str(settings.output), "versions": _versions(), "command": " ".join(sys.argv),
        },
        "labels": _labels(info, records),
        "n_test_cases": len(info.test_cases if cross_validation is None else cross_validation.cases),
        "cross_validation": None if cross_validation is None else cross_validation.describe(),
        "upper_bound_plans_differences": None if upper is None else
        plans_differences(plans_files[info.name], plans_files[upper.name], settings.configuration),
        "excluded_trainers": excluded,
        "runs": records,
        "equal_time": equal_time_plans,
    }
    write_outputs(results, settings.output)
    failed = [r for r in records if r["status"] != "ok"]
    progress(f"done: {len(records) - len(failed)}/{len(records)} run(s) finished; "
             f"report {settings.output / 'report.md'}")
    return results


def _labels(info: DatasetInfo, records: Sequence[dict]) -> dict[str, str]:
    """``{label key: name}`` as in the evaluation (from any evaluated run, else from dataset.json)."""
    for record in records:
        if record.get("evaluation"):
            return dict(record["evaluation"]["labels"])
    from nnunet_ext.benchmark.metrics import label_key

    # keyed as the evaluation keys them (a region [1, 2] as "(1, 2)")
    return {label_key(v): k for k, v in info.dataset_json["labels"].items() if k not in ("background", "ignore")}


def write_outputs(results: dict, output: Path) -> None:
    """``results.json``, ``plots/*.png`` and ``report.md`` (derived files, regenerated on every invocation)."""
    from nnunet_ext.benchmark.plots import plot_dice_bars, plot_training_curves, safe_file_name
    from nnunet_ext.benchmark.report import format_report, summarise
    from nnunet_ext.benchmark.statistics import segmentation_statistics

    plots_dir = output / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    rows = [r for r in summarise(results["runs"], list(results["labels"])) if r["seeds_ok"]]
    if rows:
        plots["Dice per class"] = str(plot_dice_bars(rows, results["labels"], plots_dir / "dice_per_class.png")
                                      .relative_to(output))
    for run in results["runs"]:
        if run.get("training") and not run.get("equal_time_is_stock_run"):
            title = f"{run['label']} [{run['dataset']}] seed {run['seed']}" + \
                (" (mean over folds)" if run.get("folds") else "")
            path = plots_dir / f"curves_{safe_file_name(run['dataset'] + '_' + run['budget_trainer'])}.png"
            plots[f"training curves: {title}"] = str(plot_training_curves(run["training"]["curves"], title, path)
                                                    .relative_to(output))
    results["plots"] = plots
    results["statistics"] = segmentation_statistics(results["runs"])
    (output / "results.json").write_text(json.dumps(results, indent=2))
    (output / "report.md").write_text(format_report(results))
