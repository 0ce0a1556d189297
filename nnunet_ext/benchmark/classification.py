"""``nnunet-ext benchmark-cls``: case-level classification trainers (``task_kind == "classification"``, e.g.
``CFCMLTrainer`` and its baselines) compared by cross-validation with one budget, folds and seeds.

For every (seed, fold, trainer) the stock ``nnUNetv2_train DATASET CONFIG FOLD -tr <Trainer>_e{E}i{I}s{S} -p PLANS``
runs in a child process wrapped by :mod:`nnunet_ext.benchmark.measure` (time and peak memory). The trainer writes
``validation_cls.csv`` (class probabilities of the fold's validation cases, final checkpoint) into its fold folder;
the benchmark re-evaluates that file against the dataset's ``tabular.csv`` with
:func:`nnunet_ext.cfcml.metrics.evaluate_predictions_csv`. Optionally the held-out test split (``imagesTs`` with
labels in ``tabular.csv``) is predicted with ``nnunet-ext predict-cls`` (softmax averaged over the benchmarked
folds) and evaluated the same way.

Equal budget: the generated trainer classes fix ``num_epochs`` and ``num_iterations_per_epoch`` (after the
trainer's own ``__init__``; CFCML resolves its iterations in ``initialize`` only when they are unset), so every
trainer runs the same epochs x iterations with the plans' batch size (CFCML's class-balanced batches). Without
``--epochs``/``--iterations`` the CFCML schedule of the plans is used for every trainer and fold: ``num_epochs``
of the CFCML settings and ``max over the folds of ceil(majority-class training cases / (B / K))`` iterations.
The learning-rate schedule of CFCML is per epoch (warm-up 5 epochs, x0.8 every 5), identical for all trainers.

Layout of the output folder (``nnUNet_raw``/``nnUNet_preprocessed`` are only read)::

    OUTPUT/budget_trainers/nnunet_ext_budget_trainers.py
    OUTPUT/nnUNet_results/<Dataset>/<Trainer>_e..i..s..__<plans>__<config>/fold_<f>/   models, validation_cls.csv
    OUTPUT/runs/<Dataset>/<Trainer>_e..i..s..__<plans>__<config>/fold_<f>/run.json, train.log, train_stats.json
    OUTPUT/runs/<Dataset>/<Trainer>_e..i..s..__<plans>__<config>/test/           predict-cls output, metrics
    OUTPUT/results.json   OUTPUT/report.md   OUTPUT/plots/classification_metrics.png
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnunet_ext.benchmark.budget import Budget, write_benchmark_trainers
from nnunet_ext.benchmark.classification_report import write_outputs
from nnunet_ext.benchmark.datasets import nnunet_folder
from nnunet_ext.benchmark.report import format_number
from nnunet_ext.benchmark.runner import (
    BenchmarkError,
    Progress,
    _fail,
    _read_json,
    _run_logged,
    check_run_folder_reusable,
    child_environment,
    training_environment,
    training_record,
)
from nnunet_ext.benchmark.trainer_info import load_trainer_class

RESULTS_FORMAT = 1
CLASSIFICATION_TASK = "classification"
VALIDATION_CSV = "validation_cls.csv"
TABULAR_CSV = "tabular.csv"


@dataclass
class ClassificationBenchmarkSettings:
    """Everything that defines a classification benchmark (see ``nnunet-ext benchmark-cls --help``).

    ``baselines`` (default: the first trainer) are the reference rows: every other trainer is compared with the
    best baseline (highest mean) of each metric. ``epochs``/``iterations`` None: the CFCML schedule of the plans.
    """

    dataset: str
    output: Path
    trainers: tuple[str, ...]
    baselines: tuple[str, ...] = ()
    configuration: str = "2d"
    plans: str = "nnUNetCPUPlans_CFCML"
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    seeds: tuple[int, ...] = (0,)
    epochs: int | None = None
    iterations: int | None = None
    val_iterations: int = 1
    test: bool = False
    device: str = "cpu"
    extra_trainer_dirs: tuple[Path, ...] = ()
    da_workers: int | None = None
    segmentation_validation: bool = False
    overwrite: bool = False
    heartbeat_seconds: float = 60.0

    def __post_init__(self) -> None:
        self.output = Path(self.output).resolve()
        self.trainers = tuple(self.trainers)
        self.baselines = tuple(self.baselines) or self.trainers[:1]
        self.extra_trainer_dirs = tuple(Path(d).resolve() for d in self.extra_trainer_dirs)
        if not self.trainers:
            raise BenchmarkError("no trainers given (e.g. --trainers CFCMLTrainer CFCMLTrainer_imageOnly)")
        if len(set(self.trainers)) != len(self.trainers):
            raise BenchmarkError(f"trainers must be distinct, got {list(self.trainers)}")
        unknown = [b for b in self.baselines if b not in self.trainers]
        if unknown:
            raise BenchmarkError(f"baseline(s) {unknown} are not among the trainers {list(self.trainers)}")
        try:
            self.folds = tuple(int(f) for f in self.folds)
            self.seeds = tuple(int(s) for s in self.seeds)
        except (TypeError, ValueError):
            raise BenchmarkError(f"folds and seeds must be integers, got folds {list(self.folds)}, seeds "
                                 f"{list(self.seeds)} (fold 'all' has no validation cases to evaluate)") from None
        if not self.folds or len(set(self.folds)) != len(self.folds) or min(self.folds) < 0:
            raise BenchmarkError(f"folds must be distinct non-negative integers, got {list(self.folds)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise BenchmarkError(f"seeds must be distinct non-negative integers, got {list(self.seeds)}")
        for name, value in (("epochs", self.epochs), ("iterations", self.iterations),
                            ("val_iterations", self.val_iterations)):
            if value is not None and value < 1:
                raise BenchmarkError(f"{name} must be >= 1, got {value}")
        if self.device not in ("cpu", "cuda", "mps"):
            raise BenchmarkError(f"device must be cpu, cuda or mps, got {self.device!r}")
        if self.da_workers is not None and self.da_workers < 0:
            raise BenchmarkError(f"da_workers must be >= 0, got {self.da_workers}")
        for folder in self.extra_trainer_dirs:
            if not folder.is_dir():
                raise BenchmarkError(f"trainer folder {folder} does not exist")


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ClassificationDataset:
    """A dataset ready for the benchmark: configured plans, stratified splits and labels of every case."""

    name: str
    raw: Path
    preprocessed: Path
    plans_file: Path
    plans: dict
    splits: list[dict]
    tabular_csv: Path
    id_column: str
    label_column: str
    labels: dict[str, str]                 # case id -> class name (cases with a label)
    classes: tuple[str, ...]
    test_cases: tuple[str, ...] = ()


def check_trainers(settings: ClassificationBenchmarkSettings) -> dict[str, str]:
    """``{trainer: method family}``; every trainer must be a classification trainer.

    Raises:
        BenchmarkError: unknown trainer or a trainer whose ``task_kind`` is not ``"classification"``.
    """
    families = {}
    for name in settings.trainers:
        try:
            cls = load_trainer_class(name, settings.extra_trainer_dirs)
        except ValueError as e:
            raise BenchmarkError(str(e)) from e
        kind = str(getattr(cls, "task_kind", "segmentation"))
        if kind != CLASSIFICATION_TASK:
            raise BenchmarkError(f"trainer {name!r} has task_kind = {kind!r}: benchmark-cls compares classification "
                                 f"trainers (task_kind 'classification', e.g. CFCMLTrainer); benchmark "
                                 f"segmentation trainers with 'nnunet-ext benchmark'")
        families[name] = str(getattr(cls, "method_family", ""))
    return families


def _label_key(value: str) -> str:
    from nnunet_ext.cfcml.tabular import _label_key as key

    return key(value)


def resolve_classification_dataset(settings: ClassificationBenchmarkSettings,
                                   families: Mapping[str, str]) -> ClassificationDataset:
    """Check the configured plans, the preprocessed data, the folds and the labels before anything trains.

    Raises:
        BenchmarkError: naming the missing file, method block, fold or cases, and the command that fixes it.
    """
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_ext.cfcml.tabular import read_csv_rows

    raw_base, preprocessed_base = nnunet_folder("nnUNet_raw"), nnunet_folder("nnUNet_preprocessed")
    try:
        name = str(maybe_convert_to_dataset_name(settings.dataset))
    except (RuntimeError, ValueError) as e:
        raise BenchmarkError(f"dataset {settings.dataset!r}: {e}") from e
    preprocessed = preprocessed_base / name
    plans_file = preprocessed / f"{settings.plans}.json"
    if not plans_file.is_file():
        available = sorted(p.stem for p in preprocessed.glob("*.json") if "lans" in p.stem)
        raise BenchmarkError(f"plans {plans_file} not found (plans here: {available}); plan the dataset "
                             f"(nnunet-ext plan -d {name} -pl CPUPlanner -c {settings.configuration}) and configure "
                             f"it (nnunet-ext configure cfcml -d {name} -p nnUNetCPUPlans -o {settings.plans})")
    plans = json.loads(plans_file.read_text())
    configuration = plans.get("configurations", {}).get(settings.configuration)
    if configuration is None:
        raise BenchmarkError(f"configuration {settings.configuration!r} is not in {plans_file}; available: "
                             f"{sorted(plans.get('configurations', {}))}")
    data_identifier = configuration.get("data_identifier") or plans["configurations"].get(
        configuration.get("inherits_from", ""), {}).get("data_identifier")
    data_folder = preprocessed / str(data_identifier)
    if not data_folder.is_dir() or not any(data_folder.iterdir()):
        raise BenchmarkError(f"preprocessed data {data_folder} is missing; preprocess configuration "
                             f"{settings.configuration} first")
    blocks = plans.get("nnunet_ext", {})
    for trainer, family in families.items():
        if family not in blocks:
            derived = f"{settings.plans}_{family.upper()}"
            raise BenchmarkError(f"plans {plans_file.name} carry no {family!r} settings (needed by {trainer}): run "
                                 f"nnunet-ext configure {family} -d {name} -p {settings.plans} -o {derived} and "
                                 f"benchmark with -p {derived}")
    splits_file = preprocessed / "splits_final.json"
    if not splits_file.is_file():
        raise BenchmarkError(f"{splits_file} not found: the benchmark cross-validates over its folds; nnunet-ext "
                             f"configure cfcml writes a class-stratified one")
    splits = json.loads(splits_file.read_text())
    bad = [f for f in settings.folds if f >= len(splits)]
    if bad:
        raise BenchmarkError(f"fold(s) {bad} do not exist: {splits_file} has {len(splits)} fold(s) "
                             f"(0..{len(splits) - 1})")
    tabular = preprocessed / TABULAR_CSV
    if not tabular.is_file():
        tabular = raw_base / name / TABULAR_CSV
    if not tabular.is_file():
        raise BenchmarkError(f"{TABULAR_CSV} found neither in {preprocessed} nor in {raw_base / name}; run nnunet-ext "
                             f"configure cfcml")
    schema = next((blocks[f]["schema"] for f in families.values() if "schema" in blocks.get(f, {})), {})
    id_column, label_column = schema.get("id_column", "case_id"), schema.get("label_column", "label")
    _, rows = read_csv_rows(tabular)
    labels = {r[id_column]: _label_key(r[label_column]) for r in rows if (r.get(label_column) or "").strip()}
    classes = tuple(schema.get("classes") or sorted(set(labels.values())))
    for fold in settings.folds:
        val = splits[fold]["val"]
        if not val:
            raise BenchmarkError(f"fold {fold} of {splits_file} has no validation cases")
        missing = [c for c in val if c not in labels]
        if missing:
            raise BenchmarkError(f"fold {fold}: validation case(s) without a label in {tabular}: {missing[:10]}")
    test_cases: tuple[str, ...] = ()
    if settings.test:
        test_cases = _test_cases(raw_base / name, labels)
    return ClassificationDataset(name, raw_base / name, preprocessed, plans_file, plans, splits, tabular, id_column,
                                 label_column, labels, classes, test_cases)


def _test_cases(raw: Path, labels: Mapping[str, str]) -> tuple[str, ...]:
    dataset_json = json.loads((raw / "dataset.json").read_text()) if (raw / "dataset.json").is_file() else {}
    ending = dataset_json.get("file_ending", ".nii.gz")
    images = raw / "imagesTs"
    suffix = f"_0000{ending}"
    cases = tuple(sorted(p.name[:-len(suffix)] for p in images.glob(f"*{suffix}"))) if images.is_dir() else ()
    if not cases:
        raise BenchmarkError(f"--test: no test images (*{suffix}) in {images}")
    missing = [c for c in cases if c not in labels]
    if missing:
        raise BenchmarkError(f"--test: test case(s) without a label in {TABULAR_CSV}: {missing[:10]} (the test "
                             f"labels are read from the label column of {raw / TABULAR_CSV})")
    return cases


def resolve_budget(settings: ClassificationBenchmarkSettings, data: ClassificationDataset) -> tuple[Budget, str]:
    """The budget of every run and where it comes from.

    Without ``--epochs``/``--iterations``: CFCML's schedule from the plans (``num_epochs`` of the settings;
    ``ceil(majority-class training cases / (B / K))`` iterations, the maximum over the benchmarked folds).

    Raises:
        BenchmarkError: no explicit budget and the plans carry no CFCML block.
    """
    epochs, iterations, source = settings.epochs, settings.iterations, "given"
    if epochs is None or iterations is None:
        block = data.plans.get("nnunet_ext", {}).get("cfcml")
        if not block:
            raise BenchmarkError("--epochs and --iterations are needed: the plans carry no CFCML schedule")
        source = "CFCML schedule of the plans" if epochs is None and iterations is None else "partly given, " \
                 "partly the CFCML schedule of the plans"
        if epochs is None:
            epochs = int(block["settings"]["num_epochs"])
        if iterations is None:
            batch = int(data.plans["configurations"][settings.configuration].get("batch_size") or 0)
            per_class = max(1, batch // max(1, len(data.classes)))
            counts = []
            for fold in settings.folds:
                train = [data.labels[c] for c in data.splits[fold]["train"] if c in data.labels]
                counts.append(max(train.count(c) for c in data.classes))
            iterations = max(int(math.ceil(n / per_class)) for n in counts)
    return Budget(epochs, iterations, settings.val_iterations), source


# ---------------------------------------------------------------------------------------------- generated trainers
def write_classification_budget_trainers(folder: Path, settings: ClassificationBenchmarkSettings,
                                         budget: Budget) -> dict[tuple[str, int], str]:
    """One subclass per (trainer, seed): seeds Python/NumPy/torch first in ``__init__``, fixes the budget, and
    (unless ``segmentation_validation``) skips nnU-Net's segmentation validation; the classification validation
    (``validation_cls.csv``) always runs. Returns ``{(trainer, seed): class name}``."""
    attributes = None if settings.segmentation_validation else {"segmentation_validation": False}
    return write_benchmark_trainers(folder, settings.trainers, budget, settings.seeds, skip_final_validation=False,
                                    extra_trainer_dirs=settings.extra_trainer_dirs, class_attributes=attributes)


# ---------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class ClassificationRun:
    trainer: str
    budget_trainer: str
    seed: int
    fold: int
    baseline: bool

    def model_key(self, dataset: str, settings: ClassificationBenchmarkSettings) -> str:
        return f"{dataset}/{self.budget_trainer}__{settings.plans}__{settings.configuration}"

    def run_dir(self, dataset: str, settings: ClassificationBenchmarkSettings) -> Path:
        return settings.output / "runs" / self.model_key(dataset, settings) / f"fold_{self.fold}"

    def fold_dir(self, dataset: str, settings: ClassificationBenchmarkSettings) -> Path:
        return settings.output / "nnUNet_results" / self.model_key(dataset, settings) / f"fold_{self.fold}"


def _settings_key(settings: ClassificationBenchmarkSettings) -> dict:
    """Settings that change a run's outputs without changing its folder name."""
    return {"device": settings.device, "segmentation_validation": settings.segmentation_validation,
            "val_iterations": settings.val_iterations}


def _train_command(run: ClassificationRun, data: ClassificationDataset, settings: ClassificationBenchmarkSettings,
                   stats: Path, validation_only: bool) -> tuple[str, list[str]]:
    args = [data.name, settings.configuration, str(run.fold), "-tr", run.budget_trainer, "-p", settings.plans,
            "-device", settings.device, *(["--val"] if validation_only else [])]
    measured = [sys.executable, "-m", "nnunet_ext.benchmark.measure", "--stats", str(stats), "train", "--", *args]
    return shlex.join(["nnUNetv2_train", *args]), measured


def _training_record(fold_dir: Path, run_dir: Path, budget: Budget) -> dict:
    record = training_record(fold_dir, run_dir, budget.iterations,
                             ("train_losses", "val_losses", "cfcml_val_auc", "cfcml_val_bacc"))
    return {**record, "iterations_per_epoch": budget.iterations}


def evaluate_validation(fold_dir: Path, data: ClassificationDataset, fold: int) -> dict:
    """Metrics of the fold's ``validation_cls.csv`` against ``tabular.csv``; it must hold exactly the fold's
    validation cases.

    Raises:
        ValueError: missing file or other cases than the split's validation cases.
    """
    from nnunet_ext.cfcml.metrics import evaluate_predictions_csv, read_predictions_csv

    path = fold_dir / VALIDATION_CSV
    if not path.is_file():
        raise ValueError(f"{path} was not written (the trainer must write {VALIDATION_CSV} after training)")
    cases, _, _ = read_predictions_csv(path)
    expected = sorted(data.splits[fold]["val"])
    if sorted(cases) != expected:
        raise ValueError(f"{path}: cases differ from fold {fold}'s validation cases (missing "
                         f"{sorted(set(expected) - set(cases))[:10]}, extra {sorted(set(cases) - set(expected))[:10]})")
    return evaluate_predictions_csv(path, data.tabular_csv, data.id_column, data.label_column)


def execute_run(run: ClassificationRun, data: ClassificationDataset, settings: ClassificationBenchmarkSettings,
                budget: Budget, train_env: dict, progress: Progress, inputs: dict | None = None) -> dict:
    """Train (or reuse) one fold and evaluate its validation cases; returns its ``results.json`` record.

    ``inputs``: what the training depends on (:func:`nnunet_ext.benchmark.provenance.classification_inputs`);
    a trained model made from other inputs is refused, and a new training is recorded."""
    from nnunet_ext.benchmark import provenance
    from nnunet_ext.benchmark.runner import _versions

    run_dir, fold_dir = run.run_dir(data.name, settings), run.fold_dir(data.name, settings)
    name = f"{run.trainer} seed {run.seed} fold {run.fold}"
    check_run_folder_reusable(run_dir, _settings_key(settings))
    if inputs is not None:
        provenance.check_classification_run(run_dir, fold_dir, inputs)
    run_dir.mkdir(parents=True, exist_ok=True)
    has_final = (fold_dir / "checkpoint_final.pth").is_file()
    validation_only = has_final and not (fold_dir / VALIDATION_CSV).is_file()
    stats_file = run_dir / ("validation_stats.json" if validation_only else "train_stats.json")
    command, measured = _train_command(run, data, settings, stats_file, validation_only)
    record: dict[str, Any] = {
        "trainer": run.trainer, "budget_trainer": run.budget_trainer, "seed": run.seed, "fold": run.fold,
        "role": "baseline" if run.baseline else "method", "status": "ok", "failed_step": None, "error": None,
        "log_file": None, "log_tail": None, "reused_steps": [], "settings_key": _settings_key(settings),
        "commands": {"train": command, "train_measured": shlex.join(measured)},
        "paths": {"run": str(run_dir), "model": str(fold_dir), "validation_csv": str(fold_dir / VALIDATION_CSV)},
        "training": None, "validation": None, "trained_with": None if inputs is None else inputs["training"],
    }

    def finish(rec: dict) -> dict:
        (run_dir / "run.json").write_text(json.dumps(rec, indent=2))
        if rec["status"] != "ok":
            progress(f"FAILED {name}: {rec['failed_step']}: {rec['error']} (log: {rec['log_file']})")
        return rec

    if has_final and not validation_only:
        progress(f"{name}: trained earlier, reusing {fold_dir}")
        record["reused_steps"].append("training")
    else:
        progress(f"{name}: {'validation of the finished training' if validation_only else 'training'}: {command}")
        log = run_dir / "train.log"
        code = _run_logged(measured, train_env, log, progress, settings)
        if not validation_only and inputs is not None and (fold_dir / "checkpoint_final.pth").is_file():
            provenance.record_step(run_dir, "training", inputs, {"versions": _versions()})
        if code != 0 or not (fold_dir / "checkpoint_final.pth").is_file():
            return finish(_fail(record, "training", f"nnUNetv2_train exited with code {code}", log))
        if validation_only:
            record["reused_steps"].append("training")
    try:
        record["training"] = _training_record(fold_dir, run_dir, budget)
        record["validation"] = evaluate_validation(fold_dir, data, run.fold)
    except Exception as e:  # reported like a crashed step, not hidden
        (run_dir / "evaluation.log").write_text(traceback.format_exc())
        return finish(_fail(record, "evaluation", f"{type(e).__name__}: {e}", run_dir / "evaluation.log"))
    spi = record["training"]["seconds_per_iteration"]
    progress(f"{name}: AUC {format_number(record['validation']['auc'])}, balanced accuracy "
             f"{format_number(record['validation']['balanced_accuracy'])}, "
             f"{format_number(spi, 2)} s/iteration, peak memory "
             f"{format_number(record['training']['peak_rss_mb'], 0)} MB")
    return finish(record)


def pooled_validation(records: Sequence[Mapping], data: ClassificationDataset, folder: Path) -> dict | None:
    """Out-of-fold metrics of one (trainer, seed): the finished folds' ``validation_cls.csv`` concatenated (every
    validation case once) and evaluated together. None unless every fold of the group finished."""
    from nnunet_ext.cfcml.metrics import evaluate_predictions_csv

    if not records or any(r["status"] != "ok" for r in records):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"out_of_fold_seed{records[0]['seed']}.csv"
    header, rows = None, []
    for record in records:
        with open(record["paths"]["validation_csv"], newline="") as f:
            reader = csv.reader(f)
            file_header = next(reader)
            if header is not None and file_header != header:
                raise ValueError(f"{record['paths']['validation_csv']}: columns differ from the other folds")
            header = file_header
            rows.extend(reader)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    metrics = evaluate_predictions_csv(path, data.tabular_csv, data.id_column, data.label_column)
    return {"file": str(path), "folds": sorted(r["fold"] for r in records), "metrics": metrics}


def execute_test(trainer: str, budget_trainer: str, seed: int, records: Sequence[Mapping],
                 data: ClassificationDataset, settings: ClassificationBenchmarkSettings, env: dict,
                 progress: Progress) -> dict:
    """``predict-cls`` on ``imagesTs`` (softmax averaged over the finished folds) and its evaluation; earlier
    predictions are reused only when their recorded inputs (test images, ``tabular.csv``, models) are unchanged."""
    from nnunet_ext.benchmark.provenance import classification_test_inputs, record_step, stale_steps
    from nnunet_ext.cfcml.metrics import evaluate_predictions_csv

    folds = sorted(r["fold"] for r in records if r["status"] == "ok")
    folder = settings.output / "runs" / data.name / f"{budget_trainer}__{settings.plans}__{settings.configuration}" \
        / "test"
    predictions = folder / "predictions.csv"
    cmd = [sys.executable, "-m", "nnunet_ext.cli", "predict-cls", "-i", str(data.raw / "imagesTs"), "-t",
           str(data.tabular_csv), "-o", str(predictions), "-d", data.name, "-c", settings.configuration,
           "-f", *map(str, folds), "-tr", budget_trainer, "-p", settings.plans, "-chk", "checkpoint_final.pth",
           "-device", settings.device]
    record: dict[str, Any] = {"trainer": trainer, "budget_trainer": budget_trainer, "seed": seed, "folds": folds,
                              "status": "ok", "failed_step": None, "error": None, "log_file": None,
                              "log_tail": None, "command": shlex.join(["nnunet-ext", *cmd[3:]]), "metrics": None,
                              "wall_seconds": None, "predictions": str(predictions)}
    if not folds:
        record.update(status="failed", failed_step="prediction", error="no finished fold to predict with")
        return record
    folder.mkdir(parents=True, exist_ok=True)
    previous = _read_json(folder / "test.json")
    inputs = classification_test_inputs(data, folds, [r for r in records if r["status"] == "ok"])
    if predictions.is_file() and previous and previous.get("folds") == folds and \
            not stale_steps(folder, False, inputs, predictions, protected=None):
        record["reused"] = True
    else:
        if predictions.exists():
            predictions.unlink()  # our own output of an earlier, different prediction (predict-cls never overwrites)
        progress(f"{trainer} seed {seed}: predicting {len(data.test_cases)} test case(s) with folds {folds}")
        start = time.perf_counter()
        log = folder / "predict.log"
        code = _run_logged(cmd, env, log, progress, settings)
        record["wall_seconds"] = time.perf_counter() - start
        if code != 0 or not predictions.is_file():
            return _fail(record, "prediction", f"nnunet-ext predict-cls exited with code {code}", log)
        record_step(folder, "prediction", inputs)
    try:
        record["metrics"] = evaluate_predictions_csv(predictions, data.tabular_csv, data.id_column,
                                                     data.label_column)
    except Exception as e:
        (folder / "evaluation.log").write_text(traceback.format_exc())
        return _fail(record, "evaluation", f"{type(e).__name__}: {e}", folder / "evaluation.log")
    (folder / "test.json").write_text(json.dumps(record, indent=2, default=float))
    return record


# ---------------------------------------------------------------------------------------------- the benchmark
def run_classification_benchmark(settings: ClassificationBenchmarkSettings) -> dict:
    """Run (or complete) the benchmark and write ``results.json``, ``report.md`` and the plot after every run.

    Raises:
        BenchmarkError: bad inputs, found before any training starts.
    """
    from nnunet_ext.benchmark.runner import _versions

    progress = Progress()
    families = check_trainers(settings)
    data = resolve_classification_dataset(settings, families)
    budget, budget_source = resolve_budget(settings, data)
    progress(f"dataset {data.name}: folds {list(settings.folds)}, seeds {list(settings.seeds)}, budget "
             f"{budget.epochs} epochs x {budget.iterations} iterations ({budget_source})")
    settings.output.mkdir(parents=True, exist_ok=True)
    names = write_classification_budget_trainers(settings.output / "budget_trainers", settings, budget)
    runs = [ClassificationRun(t, names[(t, s)], s, f, t in settings.baselines)
            for s in settings.seeds for f in settings.folds for t in settings.trainers]
    if settings.overwrite:
        for run in runs:
            for folder in (run.run_dir(data.name, settings), run.fold_dir(data.name, settings)):
                if folder.exists():
                    progress(f"--overwrite: deleting {folder}")
                    shutil.rmtree(folder)
        for trainer, seed in names:
            test_dir = settings.output / "runs" / data.name / \
                f"{names[(trainer, seed)]}__{settings.plans}__{settings.configuration}" / "test"
            if test_dir.exists():
                shutil.rmtree(test_dir)
    from nnunet_ext.benchmark.provenance import check_classification_run, classification_inputs

    inputs = classification_inputs(runs, data, settings, budget)
    for run in runs:  # before the first run starts
        check_run_folder_reusable(run.run_dir(data.name, settings), _settings_key(settings))
        check_classification_run(run.run_dir(data.name, settings), run.fold_dir(data.name, settings), inputs[run])
    env = child_environment(settings)
    train_env = training_environment(settings, env)
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {
            "dataset": settings.dataset, "dataset_name": data.name, "configuration": settings.configuration,
            "plans": settings.plans, "folds": list(settings.folds), "seeds": list(settings.seeds),
            "trainers": list(settings.trainers), "baselines": list(settings.baselines),
            "budget": {"epochs": budget.epochs, "iterations": budget.iterations,
                       "val_iterations": budget.val_iterations},
            "budget_source": budget_source,
            "batch_size": data.plans["configurations"][settings.configuration].get("batch_size"),
            "classes": list(data.classes), "device": settings.device, "test": settings.test,
            "segmentation_validation": settings.segmentation_validation,
            "nnUNet_n_proc_DA": train_env.get("nnUNet_n_proc_DA"),
            "extra_trainer_dirs": [str(d) for d in settings.extra_trainer_dirs], "output": str(settings.output),
            "versions": _versions(), "command": shlex.join(sys.argv),
        },
        "n_test_cases": len(data.test_cases), "runs": [], "out_of_fold": [], "test": [],
    }
    for i, run in enumerate(runs, 1):
        progress(f"run {i}/{len(runs)}: {run.trainer} seed {run.seed} fold {run.fold}")
        results["runs"].append(execute_run(run, data, settings, budget, train_env, progress, inputs[run]))
        write_outputs(results, settings.output)
    for trainer in settings.trainers:
        for seed in settings.seeds:
            group = [r for r in results["runs"] if r["trainer"] == trainer and r["seed"] == seed]
            folder = settings.output / "runs" / data.name / \
                f"{names[(trainer, seed)]}__{settings.plans}__{settings.configuration}"
            try:
                pooled = pooled_validation(group, data, folder)
            except Exception as e:  # noted in the report instead of aborting the benchmark
                progress(f"out-of-fold evaluation of {trainer} seed {seed} failed: {e}")
                pooled = None
            if pooled is not None:
                results["out_of_fold"].append({"trainer": trainer, "seed": seed, **pooled})
            if settings.test:
                results["test"].append(execute_test(trainer, names[(trainer, seed)], seed, group, data, settings,
                                                    env, progress))
    write_outputs(results, settings.output)
    failed = [r for r in results["runs"] + results["test"] if r["status"] != "ok"]
    progress(f"done: {len(results['runs'])} fold run(s), {len(failed)} failed; report "
             f"{settings.output / 'report.md'}")
    return results


# ---------------------------------------------------------------------------------------------- command line
def _cmd_benchmark_cls(args: argparse.Namespace) -> int:
    settings = ClassificationBenchmarkSettings(
        dataset=args.d, output=args.output, trainers=tuple(args.trainers), baselines=tuple(args.baseline or ()),
        configuration=args.c, plans=args.p, folds=tuple(args.f), seeds=tuple(args.seeds), epochs=args.epochs,
        iterations=args.iterations, val_iterations=args.val_iterations, test=args.test, device=args.device,
        extra_trainer_dirs=tuple(args.trainer_dirs), da_workers=args.da_workers,
        segmentation_validation=args.segmentation_validation, overwrite=args.overwrite,
        heartbeat_seconds=args.heartbeat)
    results = run_classification_benchmark(settings)  # bad input raises BenchmarkError before any run starts
    print()
    print((settings.output / "report.md").read_text())
    failed = [r for r in results["runs"] + results["test"] if r["status"] != "ok"]
    return 1 if failed else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark-cls", help="cross-validate classification trainers (CFCML and baselines) with one budget",
        description="Train every classification trainer (task_kind 'classification', e.g. CFCMLTrainer and its "
                    "baselines) on the given folds of splits_final.json with the same budget and seeds "
                    "(nnUNetv2_train in child processes), evaluate each fold's validation cases (macro AUC, "
                    "balanced accuracy, accuracy, macro F1), optionally predict the test split with predict-cls, "
                    "and write results.json, report.md and a plot into --output. Re-running completes a benchmark; "
                    "finished runs are skipped. Exit code 1 if a run failed (reported with its log tail), 2 for "
                    "bad inputs.")
    p.add_argument("-d", required=True, help="dataset ID or name")
    p.add_argument("-c", default="2d", help="configuration (default: 2d)")
    p.add_argument("-p", default="nnUNetCPUPlans_CFCML",
                   help="plans written by 'nnunet-ext configure cfcml' (default: nnUNetCPUPlans_CFCML)")
    p.add_argument("--trainers", nargs="+", required=True, help="classification trainers, e.g. CFCMLTrainer "
                                                                "CFCMLTrainer_imageOnly")
    p.add_argument("--baseline", nargs="+", default=None,
                   help="reference trainer(s) among --trainers (default: the first); the others are compared with "
                        "the best of them")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"],
                   help="folds of splits_final.json (default: 0 1 2 3 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: num_epochs of the CFCML "
                                                            "settings in the plans)")
    p.add_argument("--iterations", type=int, default=None,
                   help="training iterations per epoch (default: CFCML's ceil(majority-class cases / (B/K)), the "
                        "maximum over the folds)")
    p.add_argument("--val-iterations", type=int, default=1,
                   help="segmentation validation iterations per epoch (default: 1; the classification validation "
                        "of all validation cases runs every epoch regardless)")
    p.add_argument("--test", action="store_true", help="also predict imagesTs with predict-cls (labels from "
                                                       "tabular.csv) and evaluate it")
    p.add_argument("--segmentation-validation", action="store_true",
                   help="keep nnU-Net's segmentation validation after training (skipped by default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument("--output", default="benchmark_cls_output", help="output folder (default: "
                                                                    "./benchmark_cls_output)")
    p.add_argument("--trainer-dirs", nargs="*", default=[], help="further folders with trainer files")
    p.add_argument("--da-workers", type=int, default=None,
                   help="nnUNet_n_proc_DA for training (default: 0 on cpu, reproducible with a seed)")
    p.add_argument("--overwrite", action="store_true", help="delete and redo the requested runs")
    p.add_argument("--heartbeat", type=float, default=60.0, help="seconds between progress lines while a step runs")
    p.set_defaults(func=_cmd_benchmark_cls)
