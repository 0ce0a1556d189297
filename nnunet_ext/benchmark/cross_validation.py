"""``nnunet-ext benchmark --cv-folds K``: K-fold cross-validation instead of a held-out test split.

For datasets with a handful of labelled cases and no test split (e.g. 6 BraTS cases: 3 folds of 2 test cases):

- **Folds** are nnU-Net's: ``splits_final.json`` in the preprocessed dataset folder, which ``nnUNetv2_train D C k``
  reads. When it is absent, it is written with nnU-Net's own ``generate_crossval_split`` over the sorted training
  cases with nnU-Net's seed 12345 (what nnU-Net does for its 5 folds, here with K). An existing file with another
  number of folds is refused, never overwritten: models trained on it (also outside the benchmark) depend on it.
  Its validation sets must partition the training cases, so that every case is predicted exactly once per seed.
- **Runs**: every (trainer, seed, fold) is one run of :func:`nnunet_ext.benchmark.runner.execute_run` on nnU-Net
  fold k, whose "test split" is fold k's validation cases: their ``imagesTr``/``labelsTr`` files, linked into
  ``OUTPUT/cross_validation/<Dataset>/fold_<k>/imagesVal`` and ``labelsVal``. Training, the benchmark's
  ``nnUNetv2_predict`` command, the evaluation, ``--missing-channels``, reuse and provenance work per fold as in the
  default mode (provenance records fold k's split entry, ``imagesVal`` and ``labelsVal``).
- **Pooling** (:func:`pool_fold_records`): per (trainer, seed) the folds' records become one record over all
  cases: per-case metrics concatenated, per-class means and mean Dice recomputed over all cases as for one folder
  (:func:`nnunet_ext.benchmark.metrics.summarise_cases`), cost the mean over folds. The statistics, report tables
  and plots then work unchanged; the per-fold numbers stay in the record's ``folds`` and the report's
  cross-validation section.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nnunet_ext.benchmark.datasets import BenchmarkError

if TYPE_CHECKING:
    from nnunet_ext.benchmark.datasets import DatasetInfo
    from nnunet_ext.benchmark.runner import BenchmarkSettings, Run

#: nnU-Net's seed for its automatic split (``nnUNetTrainer.do_split``)
SPLIT_SEED = 12345
SPLITS_FILE = "splits_final.json"
IMAGES_FOLDER, LABELS_FOLDER = "imagesVal", "labelsVal"
POOLED_KEY_SUFFIX = "cross_validation"


def check_cross_validation_settings(settings: BenchmarkSettings) -> None:
    """Options that cannot be combined with ``--cv-folds``.

    Raises:
        BenchmarkError: fewer than 2 folds, a fold given with ``-f``, or an upper-bound dataset.
    """
    if isinstance(settings.cv_folds, bool) or not isinstance(settings.cv_folds, int) or settings.cv_folds < 2:
        raise BenchmarkError(f"--cv-folds must be an integer >= 2, got {settings.cv_folds!r}")
    if settings.fold != "all":
        raise BenchmarkError(f"-f {settings.fold} and --cv-folds {settings.cv_folds} exclude each other: "
                             f"cross-validation trains every fold 0..{settings.cv_folds - 1}")
    if settings.upper_bound_dataset is not None:
        raise BenchmarkError("--upper-bound-dataset cannot be used with --cv-folds: the upper bound is stock trained "
                             "on another dataset with the same test cases, and in cross-validation the test cases "
                             "are this dataset's own training cases; benchmark against a held-out test split "
                             "(without --cv-folds) for the gap bound")


# ---------------------------------------------------------------------------------------------- folds
@dataclass(frozen=True)
class Fold:
    index: int
    train: tuple[str, ...]
    validation: tuple[str, ...]
    dataset: DatasetInfo  # the dataset with this fold's validation cases as its test split


@dataclass(frozen=True)
class CrossValidation:
    folds: tuple[Fold, ...]
    splits_file: Path
    split_created: bool
    test_split_ignored: bool  # the dataset has imagesTs, which cross-validation does not use

    @property
    def cases(self) -> tuple[str, ...]:
        return tuple(sorted(c for fold in self.folds for c in fold.validation))

    def fold_runs(self, run: Run) -> list[Run]:
        """``run`` once per fold: nnU-Net fold k, evaluated on fold k's validation cases."""
        return [dataclasses.replace(run, dataset=fold.dataset, fold=str(fold.index)) for fold in self.folds]

    def describe(self) -> dict:
        """``results.json`` key ``cross_validation``."""
        return {"folds": len(self.folds), "splits_file": str(self.splits_file),
                "split_created": self.split_created, "split_seed": SPLIT_SEED if self.split_created else None,
                "validation_cases": [list(fold.validation) for fold in self.folds], "n_cases": len(self.cases),
                "test_split_ignored": self.test_split_ignored}


def training_cases(info: DatasetInfo) -> dict[str, dict]:
    """``{case: {"images": [channel files], "label": file}}`` of the labelled training cases, read as nnU-Net reads
    them (``imagesTr``/``labelsTr``, or the ``dataset`` entry of ``dataset.json``).

    Raises:
        BenchmarkError: no training case, or a case without its label file (named).
    """
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    # nnU-Net's function rewrites a "dataset" entry in place: give it a copy
    cases = get_filenames_of_train_images_and_targets(str(info.raw), copy.deepcopy(info.dataset_json))
    if not cases:
        raise BenchmarkError(f"{info.raw / 'imagesTr'} holds no training case ending in "
                             f"{info.dataset_json['file_ending']}: cross-validation needs labelled training cases")
    missing = sorted(case for case, files in cases.items() if not os.path.isfile(files["label"]))
    if missing:
        raise BenchmarkError(f"{len(missing)} training case(s) of {info.name} have no label file in "
                             f"{info.raw / 'labelsTr'}: {missing[:10]}")
    return cases


def check_partition(splits: Sequence[Mapping], cases: Sequence[str], path: Path) -> None:
    """The validation sets of ``splits`` must partition ``cases`` (each case in exactly one), and no fold may
    train on its own validation cases or on cases that do not exist.

    Raises:
        BenchmarkError: naming the file, the fold and the cases.
    """
    known, seen = set(cases), {}
    advice = f"fix or move away {path} (the benchmark then writes a split of the current training cases)"
    for k, split in enumerate(splits):
        if not isinstance(split, Mapping) or "train" not in split or "val" not in split:
            raise BenchmarkError(f"{path}: fold {k} is not {{'train': [...], 'val': [...]}}; {advice}")
        validation, train = list(split["val"]), list(split["train"])
        if not validation:
            raise BenchmarkError(f"{path}: fold {k} has no validation case; {advice}")
        unknown = sorted(set(validation + train) - known)
        if unknown:
            raise BenchmarkError(f"{path}: fold {k} names case(s) that are not training cases of the dataset: "
                                 f"{unknown[:10]}; {advice}")
        overlap = sorted(set(validation) & set(train))
        if overlap:
            raise BenchmarkError(f"{path}: fold {k} trains on its own validation case(s) {overlap[:10]}; {advice}")
        for case in validation:
            if case in seen:
                raise BenchmarkError(f"{path}: case {case} is a validation case of folds {seen[case]} and {k}; "
                                     f"cross-validation needs each case in exactly one fold; {advice}")
            seen[case] = k
    never = sorted(known - set(seen))
    if never:
        raise BenchmarkError(f"{path}: training case(s) {never[:10]} are in no fold's validation set, so they would "
                             f"never be predicted; {advice}")


def load_or_create_splits(splits_file: Path, cases: Sequence[str], n_folds: int) -> tuple[list[dict], bool]:
    """nnU-Net's folds: the existing ``splits_final.json`` (it must have ``n_folds`` folds that partition
    ``cases``), else a new one from ``nnunetv2.utilities.crossval_split.generate_crossval_split`` over the sorted
    cases with seed 12345, written to ``splits_file``.

    Returns:
        ``(splits, created)``.

    Raises:
        BenchmarkError: another number of folds (the file is never overwritten), more folds than cases, or a split
            that does not partition the cases.
    """
    if splits_file.is_file():
        try:
            splits = json.loads(splits_file.read_text())
        except ValueError as e:
            raise BenchmarkError(f"{splits_file} is not valid JSON ({e})") from e
        if not isinstance(splits, list):
            raise BenchmarkError(f"{splits_file} must be a list of folds ({{'train': [...], 'val': [...]}})")
        if len(splits) != n_folds:
            raise BenchmarkError(
                f"{splits_file} defines {len(splits)} fold(s), but --cv-folds {n_folds} was given; pass --cv-folds "
                f"{len(splits)} to cross-validate with that split, or move the file away so that the benchmark "
                f"writes a {n_folds}-fold split (it never overwrites a split: models trained on it depend on it)")
        check_partition(splits, cases, splits_file)
        return splits, False
    if n_folds > len(cases):
        raise BenchmarkError(f"--cv-folds {n_folds} needs at least {n_folds} training cases; "
                             f"{splits_file.parent.name} has {len(cases)}")
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits = [{"train": [str(c) for c in split["train"]], "val": [str(c) for c in split["val"]]}
              for split in generate_crossval_split(sorted(cases), seed=SPLIT_SEED, n_splits=n_folds)]
    splits_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = splits_file.with_name(f".{SPLITS_FILE}.tmp")
    temporary.write_text(json.dumps(splits, indent=4))
    temporary.replace(splits_file)  # nnU-Net never sees a half-written split
    return splits, True


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (a copy where the file system has no symbolic links); kept when already right."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    if link.exists() or link.is_symlink():
        link.unlink()
    try:
        link.symlink_to(target)
    except OSError:
        shutil.copy2(target, link)


def materialise_fold(info: DatasetInfo, index: int, validation: Sequence[str], files: Mapping[str, Mapping],
                     root: Path) -> DatasetInfo:
    """Fold ``index``'s validation cases as a test split: ``root/fold_<index>/imagesVal`` with
    ``<case>_<channel:04d><ending>`` and ``labelsVal`` with ``<case><ending>``, linked to the training files; files
    of other cases (an earlier split) are removed.

    Returns:
        ``info`` with these folders and cases as its test split.
    """
    ending = info.dataset_json["file_ending"]
    folder = root / f"fold_{index}"
    images, labels = folder / IMAGES_FOLDER, folder / LABELS_FOLDER
    expected_images = {f"{case}_{c:04d}{ending}": Path(image).resolve() for case in validation
                       for c, image in enumerate(files[case]["images"])}
    expected_labels = {f"{case}{ending}": Path(files[case]["label"]).resolve() for case in validation}
    for target_folder, expected in ((images, expected_images), (labels, expected_labels)):
        target_folder.mkdir(parents=True, exist_ok=True)
        for path in target_folder.iterdir():
            if path.name in expected:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        for name, source in expected.items():
            _link(source, target_folder / name)
    cases = tuple(sorted(validation))
    return dataclasses.replace(info, test_images=images, test_labels=labels, test_cases=cases, image_cases=cases)


def prepare_cross_validation(info: DatasetInfo, settings: BenchmarkSettings,
                             progress: Callable[[str], None]) -> CrossValidation:
    """Read or write the K-fold split and materialise every fold's validation cases (see the module docstring).

    Raises:
        BenchmarkError: see :func:`training_cases` and :func:`load_or_create_splits`.
    """
    files = training_cases(info)
    splits_file = info.preprocessed / SPLITS_FILE
    splits, created = load_or_create_splits(splits_file, sorted(files), settings.cv_folds)
    if created:
        progress(f"cross-validation: wrote a {settings.cv_folds}-fold split of {len(files)} training cases to "
                 f"{splits_file} (nnU-Net's generate_crossval_split, seed {SPLIT_SEED})")
    else:
        progress(f"cross-validation: using the {len(splits)} folds of {splits_file}")
    root = settings.output / "cross_validation" / info.name
    folds = tuple(Fold(k, tuple(split["train"]), tuple(split["val"]),
                       materialise_fold(info, k, split["val"], files, root)) for k, split in enumerate(splits))
    for fold in folds:
        progress(f"  fold {fold.index}: {len(fold.train)} training, {len(fold.validation)} test case(s): "
                 f"{', '.join(fold.validation)}")
    ignored = info.test_images.is_dir()
    if ignored:
        progress(f"cross-validation: {info.test_images} is not used (the folds' validation cases are the test cases)")
    return CrossValidation(folds, splits_file, created, ignored)


# ---------------------------------------------------------------------------------------------- pooling
_SUMMED_INFERENCE = ("n_cases", "predict_from_files_seconds", "network_seconds", "wall_seconds")


def _mean(values: Sequence) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return statistics.fmean(finite) if finite else None


def _pool_training(trainings: Sequence[Mapping]) -> dict | None:
    """Mean over folds of every number; curves averaged per epoch (the folds train the same epochs)."""
    if not trainings:
        return None
    pooled: dict = {}
    for key, value in trainings[0].items():
        if key == "curves":
            curves = {}
            for name in value:
                series = [t["curves"].get(name, []) for t in trainings]
                length = min(len(s) for s in series)
                curves[name] = [statistics.fmean(s[i] for s in series) for i in range(length)]
            pooled["curves"] = curves
        elif isinstance(value, bool):
            pooled[key] = all(t.get(key) for t in trainings)
        elif key == "epochs":
            pooled[key] = min(t.get(key) or 0 for t in trainings)
        else:
            pooled[key] = _mean([t.get(key) for t in trainings])
    pooled["folds"] = len(trainings)
    return pooled


def _pool_inference(inferences: Sequence[Mapping]) -> dict | None:
    """Per-case times and memory: mean over folds; counts and total seconds: summed."""
    if not inferences:
        return None
    pooled = {}
    for key in inferences[0]:
        values = [i.get(key) for i in inferences]
        if key in _SUMMED_INFERENCE:
            pooled[key] = None if any(v is None for v in values) else sum(values)
        else:
            pooled[key] = _mean(values)
    return pooled


def pool_evaluations(evaluations: Sequence[Mapping]) -> dict:
    """One evaluation over the cases of all ``evaluations`` (per-case metrics concatenated, sorted by case, means
    recomputed as for one folder).

    Raises:
        ValueError: evaluations with different labels, or a case in two of them.
    """
    from nnunet_ext.benchmark.metrics import summarise_cases

    labels = dict(evaluations[0]["labels"])
    per_case, seen = [], set()
    for evaluation in evaluations:
        if dict(evaluation["labels"]) != labels:
            raise ValueError(f"the folds were evaluated with different labels: {labels} and {evaluation['labels']}")
        for case in evaluation["per_case"]:
            if case["case"] in seen:
                raise ValueError(f"case {case['case']} was evaluated in two folds")
            seen.add(case["case"])
            per_case.append(case)
    return summarise_cases(labels, sorted(per_case, key=lambda c: c["case"]))


def _fold_summary(record: Mapping) -> dict:
    evaluation, missing = record.get("evaluation"), (record.get("missing") or {})
    return {
        "fold": int(record["fold"]), "key": record["key"], "status": record["status"],
        "failed_step": record.get("failed_step"), "error": record.get("error"),
        "reused_steps": list(record.get("reused_steps", [])),
        "cases": None if not evaluation else [c["case"] for c in evaluation["per_case"]],
        "mean_dice": None if not evaluation else evaluation["foreground_mean"]["Dice"],
        "missing_mean_dice": None if not missing.get("evaluation") else
        missing["evaluation"]["foreground_mean"]["Dice"],
        "seconds_per_iteration": (record.get("training") or {}).get("seconds_per_iteration"),
        "paths": record.get("paths"), "commands": record.get("commands"), "trained_with": record.get("trained_with"),
        "missing_command": missing.get("command"),
    }


def pool_runs(fold_records: Sequence[Mapping]) -> dict:
    """The folds' records of one (trainer, seed) as one record over all cases (see the module docstring).

    Failed when any fold failed (the statistics then leave the pair out, as for a failed run), with the first
    failed fold's step, error and log. Per-fold details are kept in ``folds``.
    """
    records = sorted(fold_records, key=lambda r: int(r["fold"]))
    first = records[0]
    failed = [r for r in records if r["status"] != "ok"]
    record = {k: first.get(k) for k in ("role", "label", "trainer", "budget_trainer", "dataset", "seed",
                                        "settings_key")}
    record["key"] = f"{first['key'].rsplit('/', 1)[0]}/{POOLED_KEY_SUFFIX}"
    record.update(status="ok", failed_step=None, error=None, log_file=None, log_tail=None)
    if failed:
        f = failed[0]
        others = [str(r["fold"]) for r in failed[1:]]
        record.update(status="failed", failed_step=f"fold {f['fold']}: {f['failed_step']}",
                      error=(f.get("error") or "") + (f" (also failed: fold(s) {', '.join(others)})" if others else ""),
                      log_file=f.get("log_file"), log_tail=f.get("log_tail"))
    record["reused_steps"] = [s for s in first.get("reused_steps", [])
                              if all(s in r.get("reused_steps", []) for r in records)]
    record["training"] = _pool_training([r["training"] for r in records if r.get("training")])
    record["inference"] = _pool_inference([r["inference"] for r in records if r.get("inference")])
    evaluations = [r.get("evaluation") for r in records]
    record["evaluation"] = pool_evaluations(evaluations) if all(evaluations) else None
    if any(r.get("missing") for r in records):
        missing = [r.get("missing") or {} for r in records]
        pooled_missing = [m.get("evaluation") for m in missing]
        record["missing"] = {"channels": missing[0].get("channels"), "mode": missing[0].get("mode"),
                             "evaluation": pool_evaluations(pooled_missing) if all(pooled_missing) else None}
    record["folds"] = [_fold_summary(r) for r in records]
    return record


def pool_fold_records(records: Sequence[Mapping]) -> list[dict]:
    """:func:`pool_runs` per (role, label, dataset, seed, budget trainer), in the order of first appearance.

    Args:
        records: run records of :func:`~nnunet_ext.benchmark.runner.execute_run` with their ``fold``.
    """
    groups: dict[tuple, list[Mapping]] = {}
    for record in records:
        key = (record["role"], record["label"], record["dataset"], record["seed"], record["budget_trainer"])
        groups.setdefault(key, []).append(record)
    return [pool_runs(members) for members in groups.values()]


# ---------------------------------------------------------------------------------------------- report
def cross_validation_lines(results: Mapping) -> list[str]:
    """The report section on the folds: where the split comes from, the cases per fold and every run's mean Dice
    per fold next to the pooled value (empty without ``--cv-folds``)."""
    from nnunet_ext.benchmark.report import ROLE_ORDER, format_number, markdown_table

    cv = results.get("cross_validation")
    if not cv:
        return []
    origin = (f"written by the benchmark: nnU-Net's `generate_crossval_split`, seed {cv['split_seed']}"
              if cv["split_created"] else "the existing file")
    lines = ["", f"## Cross-validation: {cv['folds']} folds", "",
             f"Folds from `{cv['splits_file']}` ({origin}). Every run trains nnU-Net fold k and predicts fold k's "
             f"validation cases, so each of the {cv['n_cases']} cases is predicted exactly once per seed, by the "
             "model that did not train on it; the tables above pool the folds per case (means over all cases, "
             "costs the mean over folds)."
             + (" The dataset's `imagesTs` is not used." if cv.get("test_split_ignored") else ""), ""]
    lines += markdown_table(["fold", "test cases"], [[str(k), ", ".join(cases)]
                                                     for k, cases in enumerate(cv["validation_cases"])])
    runs = sorted((r for r in results["runs"] if r.get("folds")),
                  key=lambda r: (ROLE_ORDER[r["role"]], r["label"], r["seed"]))
    if runs:
        lines += ["", "Mean Dice per fold (over the fold's test cases) and pooled (over all cases):", ""]
        body = []
        for run in runs:
            per_fold = {f["fold"]: f for f in run["folds"]}
            cells = [format_number(per_fold[k]["mean_dice"]) if k in per_fold else "—" for k in range(cv["folds"])]
            pooled = run["evaluation"]["foreground_mean"]["Dice"] if run.get("evaluation") else None
            name = f"{run['label']} (stock)" if run["role"] == "baseline" else run["label"]
            body.append([name, str(run["seed"]), *cells, format_number(pooled)])
        lines += markdown_table(["run", "seed", *[f"fold {k}" for k in range(cv["folds"])], "pooled"], body)
    return lines
