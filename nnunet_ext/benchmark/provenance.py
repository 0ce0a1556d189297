"""What a benchmark run was made from, so that a re-run never silently reuses a stale step.

Every run folder holds ``provenance.json``: per step (``training``, ``prediction``, ``evaluation`` for
``benchmark``; ``training`` per fold and ``prediction`` of the test split for ``benchmark-cls``) the inputs it was
made from, written when the step has finished. Files are recorded by content (sha256, read in chunks, nothing
cached between invocations, modification times ignored); settings by value:

- training: the fold's entry of ``splits_final.json`` (not for fold ``all``), the dataset's ``split.json`` (if the
  converter wrote one), ``dataset.json``, the plans file, every ``imagesTr``/``labelsTr`` file (names and contents;
  ``imagesUnlabeled`` for semi-supervised trainers, ``tabular.csv`` for classification), and the trainer, seed,
  epochs, iterations, validation iterations, configuration, plans, fold, device, final (segmentation) validation
  and ``nnUNet_n_proc_DA``;
- prediction: every ``imagesTs`` file and ``tta`` (for classification: ``tabular.csv``, the folds averaged and
  what their models were trained from);
- evaluation: every ``labelsTs`` file (classification metrics are recomputed on every invocation anyway).

With ``benchmark --cv-folds`` each fold is a run of its own: training records that fold's entry of
``splits_final.json``, prediction and evaluation the fold's test cases (``imagesVal``/``labelsVal``, the linked
training files, hashed by content).

On a re-run the current inputs are compared with the record before any run starts:

- training inputs changed: the benchmark stops (:class:`BenchmarkError`, one line naming the run folder and the
  changed inputs) and asks for ``--overwrite`` or a new ``--output``; a trained model is never deleted unasked;
- a trained model without a record (made before records existed, or an interrupted run): unknown provenance,
  treated like changed inputs, since equality cannot be proven;
- only prediction inputs changed (test images): prediction and evaluation are redone (also those without
  ``--missing-channels``); only the test labels changed: the evaluation is redone. Both only replace the
  benchmark's own files in the run folder, and the log says why. (A changed ``--tta``, ``--device`` or
  ``--final-validation`` is refused earlier by the run folder's settings check, as before.)

``--overwrite`` deletes the requested runs (model and run folder, hence the record) first, so they are redone. A
run is reused only with the settings it was trained with, so the report's settings are those of every run; each
run's ``results.json`` record also carries them (``trained_with``, from the record).

The record also keeps, for information only, the versions of nnunet-ext/nnU-Net/torch and the trainer's source
file hash. They are not compared: the methods' logic lives in ``nnunet_ext`` modules, not in the trainer file, so
such a check would refuse harmless edits while missing real ones.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nnunet_ext.benchmark.budget import STOCK_TRAINER, Budget
from nnunet_ext.benchmark.runner import BenchmarkError, BenchmarkSettings, Run
from nnunet_ext.io_checks import file_sha256

if TYPE_CHECKING:  # classification imports this module
    from nnunet_ext.benchmark.classification import (
        ClassificationBenchmarkSettings,
        ClassificationDataset,
        ClassificationRun,
    )

RECORD_FILE = "provenance.json"
RECORD_FORMAT = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------------------------------------- hashing
def json_sha256(value: object) -> str:
    """sha256 of a JSON value in canonical form (sorted keys), so formatting does not matter."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def files_sha256(paths: Iterable[Path]) -> str:
    """One sha256 over the names and contents of ``paths`` (sorted by name): a renamed, added, removed or edited
    file changes it."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def folder_sha256(folder: Path, file_ending: str) -> str | None:
    """:func:`files_sha256` of the files ending in ``file_ending`` directly in ``folder`` (what nnU-Net reads);
    None when the folder does not exist."""
    if not folder.is_dir():
        return None
    return files_sha256(p for p in folder.iterdir() if p.is_file() and p.name.endswith(file_ending))


def optional_file_sha256(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


def fold_split_sha256(preprocessed: Path, fold: str | int) -> str | None:
    """sha256 of fold ``fold``'s entry of ``splits_final.json`` (None for fold ``all`` or while the file or the
    fold does not exist: nnU-Net writes it at the first training of a fold, and the record is refreshed then)."""
    if str(fold) == "all":
        return None
    path = preprocessed / "splits_final.json"
    if not path.is_file():
        return None
    splits = json.loads(path.read_text())
    return json_sha256(splits[int(fold)]) if int(fold) < len(splits) else None


def training_data_inputs(raw: Path, preprocessed: Path, plans_file: Path, fold: str | int,
                         extra_folders: Iterable[str] = ()) -> dict[str, str | None]:
    """Hashes of a dataset's training inputs (see the module docstring); ``extra_folders``: more folders of
    ``raw`` (e.g. ``imagesUnlabeled``)."""
    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    inputs = {"dataset.json": file_sha256(raw / "dataset.json"), "split.json": optional_file_sha256(raw / "split.json"),
              plans_file.name: file_sha256(plans_file)}
    for folder in ("imagesTr", "labelsTr", *extra_folders):
        inputs[folder] = folder_sha256(raw / folder, ending)
    if str(fold) != "all":
        inputs[f"splits_final.json fold {fold}"] = fold_split_sha256(preprocessed, fold)
    return inputs


def augmentation_workers(settings: BenchmarkSettings | ClassificationBenchmarkSettings) -> str | None:
    """``nnUNet_n_proc_DA`` of the training children (with 0, a seeded run is reproducible; other values change
    the augmentation's random streams)."""
    from nnunet_ext.benchmark.runner import training_environment

    return training_environment(settings, {}).get("nnUNet_n_proc_DA")


def trainer_source(trainer_class: type) -> dict[str, str | None]:
    """File and sha256 of the file defining ``trainer_class`` (recorded for information, not compared)."""
    import inspect

    try:
        path = inspect.getsourcefile(trainer_class)
    except TypeError:
        path = None
    return {"file": path, "sha256": file_sha256(path) if path else None}


# ---------------------------------------------------------------------------------------------- records
def read_record(folder: Path) -> dict | None:
    """The record of a run folder, or None (absent or unreadable)."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("steps"), dict) else None


def record_step(folder: Path, step: str, inputs: Mapping[str, Mapping], info: Mapping | None = None) -> None:
    """Record that ``step`` has finished with ``inputs[step]``. When that differs from its earlier record, the
    records of the later steps (in the order of ``inputs``) are dropped: they are redone from this step's output."""
    record = read_record(folder) or {"format": RECORD_FORMAT, "steps": {}}
    if record["steps"].get(step) != inputs[step]:
        order = list(inputs)
        record["steps"] = {s: v for s, v in record["steps"].items()
                           if s in order and order.index(s) < order.index(step)}
    record["steps"][step] = dict(inputs[step])
    if info is not None:
        record["info"] = dict(info)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{RECORD_FILE}.tmp"
    temporary.write_text(json.dumps(record, indent=2))
    temporary.replace(folder / RECORD_FILE)  # never a half-written record


def _describe(name: str, recorded: object, current: object) -> str:
    if isinstance(recorded, str) and isinstance(current, str) and _SHA256.match(recorded) and _SHA256.match(current):
        return f"{name} changed"
    return f"{name}: {json.dumps(recorded)} when trained, {json.dumps(current)} now"


def changed_inputs(recorded: Mapping | None, current: Mapping) -> list[str]:
    """Descriptions of the inputs that differ between a recorded step and now (all of them without a record)."""
    if recorded is None:
        return ["no record"]
    names = list(dict.fromkeys([*current, *recorded]))
    return [_describe(n, recorded.get(n), current.get(n)) for n in names if recorded.get(n) != current.get(n)]


def stale_steps(folder: Path, trained: bool, inputs: Mapping[str, Mapping], model: Path,
                protected: str | None = "training") -> dict[str, list[str]]:
    """The steps of a run folder that must be redone, with what changed: ``{step: [descriptions]}``.

    Args:
        folder: the run folder with the record.
        trained: whether the output of the ``protected`` step exists (a trained model).
        inputs: ``{step: {input name: hash or value}}`` now, steps in execution order.
        model: the trained model (named in the message).
        protected: the step that is never redone unasked (None: every step may be redone).

    Returns:
        Every step from the first stale one on (a step is redone after the steps it depends on); empty when
        everything recorded matches.

    Raises:
        BenchmarkError: the protected step has finished, and its inputs changed or were never recorded.
    """
    steps = list(inputs)
    record = read_record(folder)
    if protected is not None and trained:
        if record is None or protected not in record["steps"]:
            raise BenchmarkError(f"{folder}: the trained model {model} has no {RECORD_FILE} (made by an older "
                                 f"nnunet-ext, or interrupted), so it cannot be checked against the current split, "
                                 f"plans, data and settings; pass --overwrite to delete and retrain it, or use a new "
                                 f"--output")
        changed = changed_inputs(record["steps"][protected], inputs[protected])
        if changed:
            raise BenchmarkError(f"{folder}: the trained model {model} was made from other inputs "
                                 f"({'; '.join(changed)}); pass --overwrite to delete and retrain it, or use a new "
                                 f"--output")
    if protected is not None and not trained:
        return {step: [] for step in steps}  # (re)trained now: every later output is stale
    recorded = {} if record is None else record["steps"]
    for i, step in enumerate(steps):
        changed = changed_inputs(recorded.get(step), inputs[step])
        if changed:
            return {s: (changed if s == step else [f"{step} redone"]) for s in steps[i:]}
    return {}


def discard_stale_outputs(folder: Path, stale: Mapping[str, list[str]], outputs: Mapping[str, Iterable[str]],
                          progress: Callable[[str], None], name: str) -> None:
    """Delete the benchmark's own outputs (``outputs[step]``: glob patterns inside ``folder``) of the stale steps
    so that they are redone, and say why in the log."""
    import shutil

    for step, reasons in stale.items():
        paths = [p for pattern in outputs.get(step, ()) for p in sorted(folder.glob(pattern))]
        if reasons and step in outputs:
            progress(f"{name}: {step} is redone: {'; '.join(reasons)}")
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


# ---------------------------------------------------------------------------------------------- nnunet-ext benchmark
SEGMENTATION_OUTPUTS = {"prediction": ("predictions", "predict_stats.json", "predictions_without_*"),
                        "evaluation": ("evaluation.json", "evaluation_without_*.json")}


def attach_segmentation_inputs(runs: Iterable[Run], settings: BenchmarkSettings,
                               plans_files: Mapping[str, Path]) -> None:
    """Set ``run.inputs`` (``{"training", "prediction", "evaluation"}``, see the module docstring) of every run of
    ``nnunet-ext benchmark``; each dataset is hashed once per invocation."""
    from nnunet_ext.benchmark.trainer_info import trainer_traits

    data: dict[str, dict] = {}
    tests: dict[tuple[Path, Path], dict] = {}
    semi_supervised: dict[str, bool] = {}
    for run in runs:
        info, fold = run.dataset, run.nnunet_fold(settings)
        ending = info.dataset_json["file_ending"]
        if info.name not in data:  # the training data once per dataset, also for several cross-validation folds
            data[info.name] = {
                "training": training_data_inputs(info.raw, info.preprocessed, plans_files[info.name], "all"),
                "imagesUnlabeled": folder_sha256(info.raw / "imagesUnlabeled", ending)}
        # the test folders: the test split, or each cross-validation fold's own (its validation cases)
        folders = (info.test_images, info.test_labels)
        if folders not in tests:
            tests[folders] = {"images": folder_sha256(info.test_images, ending),
                              "labels": folder_sha256(info.test_labels, ending)}
        if run.trainer == STOCK_TRAINER:
            semi_supervised[run.trainer] = False
        elif run.trainer not in semi_supervised:
            semi_supervised[run.trainer] = trainer_traits(run.trainer, settings.extra_trainer_dirs).semi_supervised
        hashes = data[info.name]
        training = dict(hashes["training"])
        if str(fold) != "all":  # as training_data_inputs(..., fold) would add it
            training[f"splits_final.json fold {fold}"] = fold_split_sha256(info.preprocessed, fold)
        if semi_supervised[run.trainer]:
            training["imagesUnlabeled"] = hashes["imagesUnlabeled"]
        training.update(trainer=run.trainer, budget_trainer=run.budget_trainer, seed=run.seed,
                        epochs=settings.budget.epochs, iterations=run.iterations or settings.budget.iterations,
                        val_iterations=settings.budget.val_iterations, configuration=settings.configuration,
                        plans=settings.plans, fold=fold, device=settings.device,
                        final_validation=settings.final_validation, nnUNet_n_proc_DA=augmentation_workers(settings))
        # named by folder: imagesTs/labelsTs, or a fold's imagesVal/labelsVal in cross-validation
        run.inputs = {"training": training,
                      "prediction": {info.test_images.name: tests[folders]["images"], "tta": settings.tta},
                      "evaluation": {info.test_labels.name: tests[folders]["labels"]}}


def check_segmentation_run(run: Run, settings: BenchmarkSettings) -> dict[str, list[str]]:
    """:func:`stale_steps` of a ``benchmark`` run (raises when its trained model is stale or unknown)."""
    fold_dir = run.fold_dir(settings)
    return stale_steps(run.run_dir(settings), (fold_dir / "checkpoint_final.pth").is_file(), run.inputs,
                       fold_dir / "checkpoint_final.pth")


def prepare_segmentation_run(run: Run, settings: BenchmarkSettings, progress: Callable[[str], None],
                             name: str) -> None:
    """Before a ``benchmark`` run executes: delete the outputs of its steps whose inputs changed."""
    discard_stale_outputs(run.run_dir(settings), check_segmentation_run(run, settings), SEGMENTATION_OUTPUTS,
                          progress, name)


def record_segmentation_step(run: Run, settings: BenchmarkSettings, step: str, trained_now: bool = False) -> None:
    """Record a finished step of a ``benchmark`` run. After a training (``trained_now``) the fold's split is hashed
    again (nnU-Net writes ``splits_final.json`` at the first training of a numeric fold) and the versions and the
    trainer's source are noted."""
    from nnunet_ext.benchmark.runner import _versions
    from nnunet_ext.benchmark.trainer_info import load_trainer_class

    info = None
    if trained_now:
        fold = run.nnunet_fold(settings)
        key = f"splits_final.json fold {fold}"
        if key in run.inputs["training"]:
            run.inputs["training"][key] = fold_split_sha256(run.dataset.preprocessed, fold)
        info = {"versions": _versions(),
                "trainer_source": trainer_source(load_trainer_class(run.trainer, settings.extra_trainer_dirs))}
    record_step(run.run_dir(settings), step, run.inputs, info)


# ------------------------------------------------------------------------------------------ nnunet-ext benchmark-cls
def classification_inputs(runs: Sequence[ClassificationRun], data: ClassificationDataset,
                          settings: ClassificationBenchmarkSettings, budget: Budget) -> dict:
    """``{run: {"training": ...}}`` for the fold runs of ``nnunet-ext benchmark-cls`` (a fold's validation is
    re-evaluated on every invocation, so it needs no record); the data is hashed once per fold."""
    per_fold: dict[int, dict] = {}
    inputs = {}
    for run in runs:
        if run.fold not in per_fold:
            per_fold[run.fold] = training_data_inputs(data.raw, data.preprocessed, data.plans_file, run.fold)
            per_fold[run.fold][data.tabular_csv.name] = file_sha256(data.tabular_csv)
        training = dict(per_fold[run.fold])
        training.update(trainer=run.trainer, budget_trainer=run.budget_trainer, seed=run.seed, fold=run.fold,
                        epochs=budget.epochs, iterations=budget.iterations, val_iterations=budget.val_iterations,
                        configuration=settings.configuration, plans=settings.plans, device=settings.device,
                        segmentation_validation=settings.segmentation_validation,
                        nnUNet_n_proc_DA=augmentation_workers(settings))
        inputs[run] = {"training": training}
    return inputs


def check_classification_run(run_dir: Path, fold_dir: Path, inputs: Mapping[str, Mapping]) -> None:
    """Raise when a fold's trained model is stale or of unknown provenance (:func:`stale_steps`)."""
    stale_steps(run_dir, (fold_dir / "checkpoint_final.pth").is_file(), inputs, fold_dir / "checkpoint_final.pth")


def classification_test_inputs(data: ClassificationDataset, folds: Iterable[int],
                               fold_records: Iterable[Mapping]) -> dict[str, dict]:
    """``{"prediction": ...}`` of the test split of one (trainer, seed): test images, ``tabular.csv`` (features and
    labels), the folds averaged and what each fold's model was trained from."""
    ending = json.loads((data.raw / "dataset.json").read_text()).get("file_ending", ".nii.gz") \
        if (data.raw / "dataset.json").is_file() else ".nii.gz"
    return {"prediction": {"imagesTs": folder_sha256(data.raw / "imagesTs", ending),
                           data.tabular_csv.name: file_sha256(data.tabular_csv), "folds": list(folds),
                           "models": json_sha256([r.get("trained_with") for r in fold_records])}}
