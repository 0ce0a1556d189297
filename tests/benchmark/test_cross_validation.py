"""``nnunet-ext benchmark --cv-folds K`` (``nnunet_ext.benchmark.cross_validation``): nnU-Net's split (written or
refused), the folds' validation cases as test folders, pooling of the folds per (trainer, seed), and the whole
benchmark with its child processes faked (training writes a checkpoint, prediction copies the reference labels)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers_nnunet import benchmark_settings_from_command_line, make_tiny_dataset, set_nnunet_paths

from nnunet_ext.benchmark import cross_validation as cv
from nnunet_ext.benchmark import runner
from nnunet_ext.benchmark.budget import Budget
from nnunet_ext.benchmark.runner import BenchmarkError, BenchmarkSettings, resolve_dataset

DATASET = 973
NAME = f"Dataset{DATASET}_CrossVal"
METHOD = "nnUNetTrainerNoMirroring"  # any supervised segmentation trainer; nothing trains here
CASES = [f"tr_{i:03d}" for i in range(6)]


# ---------------------------------------------------------------------------------------------- the split
def test_a_missing_split_is_written_with_nnunets_function_and_seed(tmp_path):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    path = tmp_path / "splits_final.json"
    splits, created = cv.load_or_create_splits(path, list(reversed(CASES)), 3)
    assert created and json.loads(path.read_text()) == splits
    expected = generate_crossval_split(sorted(CASES), seed=12345, n_splits=3)  # what nnU-Net does, with K = 3
    assert splits == [{"train": list(s["train"]), "val": list(s["val"])} for s in expected]
    assert sorted(c for s in splits for c in s["val"]) == CASES and all(len(s["val"]) == 2 for s in splits)
    again, created = cv.load_or_create_splits(path, CASES, 3)  # now it exists: read, not written
    assert not created and again == splits


def test_a_split_with_another_number_of_folds_is_refused_and_kept(tmp_path):
    path = tmp_path / "splits_final.json"
    cv.load_or_create_splits(path, CASES, 2)
    before = path.read_text()
    with pytest.raises(BenchmarkError, match=f"{re.escape(str(path))} defines 2 fold\\(s\\), but --cv-folds 3 was "
                                             "given; pass --cv-folds 2 .* or move the file away"):
        cv.load_or_create_splits(path, CASES, 3)
    assert path.read_text() == before


def test_more_folds_than_cases_are_refused(tmp_path):
    with pytest.raises(BenchmarkError, match="--cv-folds 7 needs at least 7 training cases; .* has 6"):
        cv.load_or_create_splits(tmp_path / "splits_final.json", CASES, 7)
    assert not (tmp_path / "splits_final.json").exists()


@pytest.mark.parametrize("splits, message", [
    ([{"train": CASES[2:], "val": CASES[:2]}, {"train": CASES[:2], "val": CASES[2:5]}],
     r"\['tr_005'\] are in no fold's validation set"),
    ([{"train": CASES[2:], "val": CASES[:2]}, {"train": CASES[1:], "val": CASES[1:]}],
     "fold 1 trains on its own validation case"),
    ([{"train": CASES[2:], "val": CASES[:2]}, {"train": CASES[:1], "val": CASES[1:]}],
     "case tr_001 is a validation case of folds 0 and 1"),
    ([{"train": CASES[2:], "val": CASES[:2]}, {"train": CASES[:2], "val": [*CASES[2:], "tr_099"]}],
     r"fold 1 names case\(s\) that are not training cases of the dataset: \['tr_099'\]"),
    ([{"train": CASES, "val": []}, {"train": [], "val": CASES}], "fold 0 has no validation case"),
    ([{"train": CASES}, {"val": CASES}], "fold 0 is not"),
])
def test_a_split_must_partition_the_training_cases(tmp_path, splits, message):
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(splits))
    with pytest.raises(BenchmarkError, match=message):
        cv.load_or_create_splits(path, CASES, 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"cv_folds": 1}, "--cv-folds must be an integer >= 2"),
    ({"cv_folds": 3, "fold": "0"}, "-f 0 and --cv-folds 3 exclude each other"),
    ({"cv_folds": 3, "upper_bound_dataset": "42"}, "--upper-bound-dataset cannot be used with --cv-folds"),
])
def test_options_that_do_not_go_with_cross_validation_are_refused(tmp_path, kwargs, message):
    with pytest.raises(BenchmarkError, match=message):
        BenchmarkSettings(dataset="1", output=tmp_path / "out", **kwargs)


def test_command_line_passes_the_folds(monkeypatch, tmp_path):
    settings = benchmark_settings_from_command_line(monkeypatch, ["-d", "1", "--output", str(tmp_path / "out"),
                                                                  "--cv-folds", "3"])
    assert settings.cv_folds == 3 and settings.fold == "all"


def test_command_line_refuses_a_fold_with_cross_validation(tmp_path, capsys):
    from nnunet_ext.cli import main

    code = main(["benchmark", "-d", "1", "-f", "0", "--cv-folds", "3", "--output", str(tmp_path / "out")])
    assert code == 2 and "-f 0 and --cv-folds 3 exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- fold folders
@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    """Six labelled cases, no test split, fake plans and preprocessed data."""
    folders = set_nnunet_paths(monkeypatch, tmp_path)
    folder = make_tiny_dataset(folders["nnUNet_raw"], DATASET, name="CrossVal", n_labelled=6, n_unlabeled=0,
                               shape=(10, 12, 12))
    preprocessed = folders["nnUNet_preprocessed"] / NAME
    (preprocessed / "data").mkdir(parents=True)
    (preprocessed / "data" / "tr_000.b2nd").write_bytes(b"x")
    (preprocessed / "nnUNetCPUPlans.json").write_text(json.dumps(
        {"configurations": {"3d_fullres": {"data_identifier": "data"}}}))
    return folder


def test_fold_folders_link_the_validation_cases_and_drop_stale_ones(raw, tmp_path):
    info = resolve_dataset(str(DATASET), test_split=False)
    files = cv.training_cases(info)
    assert sorted(files) == CASES
    fold = cv.materialise_fold(info, 1, ["tr_004", "tr_001"], files, tmp_path / "cv")
    assert fold.test_cases == fold.image_cases == ("tr_001", "tr_004")
    assert fold.test_images == tmp_path / "cv" / "fold_1" / "imagesVal"
    assert sorted(p.name for p in fold.test_images.iterdir()) == [
        "tr_001_0000.nii.gz", "tr_001_0001.nii.gz", "tr_004_0000.nii.gz", "tr_004_0001.nii.gz"]
    assert sorted(p.name for p in fold.test_labels.iterdir()) == ["tr_001.nii.gz", "tr_004.nii.gz"]
    link = fold.test_images / "tr_004_0001.nii.gz"
    assert link.read_bytes() == (raw / "imagesTr" / "tr_004_0001.nii.gz").read_bytes()
    # another split: the folder follows it (a case that left the fold is gone)
    again = cv.materialise_fold(info, 1, ["tr_002"], files, tmp_path / "cv")
    assert sorted(p.name for p in again.test_labels.iterdir()) == ["tr_002.nii.gz"]
    assert sorted(p.name for p in again.test_images.iterdir()) == ["tr_002_0000.nii.gz", "tr_002_0001.nii.gz"]


def test_a_dataset_without_test_split_is_accepted_only_for_cross_validation(raw):
    with pytest.raises(BenchmarkError, match="imagesTs does not exist"):
        resolve_dataset(str(DATASET))
    info = resolve_dataset(str(DATASET), test_split=False)
    assert info.test_cases == () and info.name == NAME


# ---------------------------------------------------------------------------------------------- pooling
def _case(case: str, dice: tuple[float, float], hd95: tuple[float, float]) -> dict:
    return {"case": case, "metrics": {k: {"Dice": d, "HD95": h, "ASD": h} for k, d, h in zip(("1", "2"), dice, hd95)}}


def _fold_record(fold: int, seed: int, cases: list[dict], spi: float, status: str = "ok", label: str = "A",
                 role: str = "method") -> dict:
    from nnunet_ext.benchmark.metrics import summarise_cases

    evaluation = summarise_cases({"1": "a", "2": "b"}, cases) if status == "ok" else None
    return {"key": f"D/{label}_e1i1s{seed}__P__3d_fullres/fold_{fold}", "role": role, "label": label,
            "trainer": label, "budget_trainer": f"{label}_e1i1s{seed}", "dataset": "D", "seed": seed,
            "fold": str(fold), "status": status, "failed_step": None if status == "ok" else "training",
            "error": None if status == "ok" else "boom", "log_file": f"train_{fold}.log", "log_tail": "tail",
            "reused_steps": ["training", "prediction", "evaluation"][:2 + fold], "settings_key": {},
            "training": {"seconds_per_iteration": spi, "peak_rss_mb": 100.0 * (fold + 1), "warmup_excluded": True,
                         "epochs": 2, "curves": {"train_losses": [1.0 + 2 * fold, 2.0 + 2 * fold]}},
            "inference": {"seconds_per_case": 1.0 + 2 * fold, "n_cases": len(cases), "network_seconds": 1.0},
            "evaluation": evaluation}


def test_pooling_merges_the_cases_and_recomputes_the_means():
    inf, nan = math.inf, math.nan
    fold0 = _fold_record(0, 0, [_case("a", (0.8, 0.4), (2.0, 1.0)), _case("b", (0.6, 0.2), (inf, 3.0))], 0.1)
    fold1 = _fold_record(1, 0, [_case("c", (nan, 0.6), (nan, 5.0)), _case("d", (1.0, 0.8), (4.0, 7.0))], 0.3)
    (pooled,) = cv.pool_fold_records([fold1, fold0])
    assert pooled["status"] == "ok" and pooled["key"] == "D/A_e1i1s0__P__3d_fullres/cross_validation"
    evaluation = pooled["evaluation"]
    assert [c["case"] for c in evaluation["per_case"]] == ["a", "b", "c", "d"] and evaluation["n_cases"] == 4
    assert evaluation["mean"]["1"]["Dice"] == pytest.approx(0.8)  # (0.8 + 0.6 + 1.0) / 3, the NaN case left out
    assert evaluation["mean"]["2"]["Dice"] == pytest.approx(0.5)
    assert evaluation["foreground_mean"]["Dice"] == pytest.approx(0.65)
    assert evaluation["mean"]["1"]["HD95"] == {"mean": 3.0, "n_finite": 2, "n_nan": 1, "n_inf": 1}
    assert evaluation["mean"]["2"]["HD95"]["mean"] == pytest.approx(4.0)
    # cost: the mean over folds; curves per epoch; counts summed
    assert pooled["training"]["seconds_per_iteration"] == pytest.approx(0.2)
    assert pooled["training"]["peak_rss_mb"] == pytest.approx(150.0) and pooled["training"]["folds"] == 2
    assert pooled["training"]["curves"]["train_losses"] == [2.0, 3.0]
    assert pooled["inference"]["seconds_per_case"] == pytest.approx(2.0) and pooled["inference"]["n_cases"] == 4
    assert pooled["reused_steps"] == ["training", "prediction"]  # only what every fold reused
    # per fold as evaluated on its own cases; the pooled 0.65 is over the cases, not the mean of these (0.675)
    assert [(f["fold"], f["cases"], f["mean_dice"]) for f in pooled["folds"]] == [
        (0, ["a", "b"], pytest.approx(0.5)), (1, ["c", "d"], pytest.approx(0.85))]


def test_a_failed_fold_fails_the_pooled_run_with_its_log():
    fold0 = _fold_record(0, 0, [_case("a", (1.0, 1.0), (1.0, 1.0))], 0.1)
    fold1 = _fold_record(1, 0, [], 0.1, status="failed")
    fold2 = _fold_record(2, 0, [], 0.1, status="failed")
    (pooled,) = cv.pool_fold_records([fold0, fold1, fold2])
    assert pooled["status"] == "failed" and pooled["failed_step"] == "fold 1: training"
    assert pooled["error"] == "boom (also failed: fold(s) 2)" and pooled["log_file"] == "train_1.log"
    assert pooled["evaluation"] is None


def test_a_case_in_two_folds_is_not_pooled():
    fold0 = _fold_record(0, 0, [_case("a", (1.0, 1.0), (1.0, 1.0))], 0.1)
    fold1 = _fold_record(1, 0, [_case("a", (0.5, 1.0), (1.0, 1.0))], 0.1)
    with pytest.raises(ValueError, match="case a was evaluated in two folds"):
        cv.pool_fold_records([fold0, fold1])


def test_pooled_runs_feed_the_paired_statistics():
    from nnunet_ext.benchmark.statistics import segmentation_statistics

    records = []
    for seed, stock_dice in ((0, 0.5), (1, 0.7)):
        for fold, cases in enumerate((["a", "b"], ["c"])):
            records.append(_fold_record(fold, seed, [_case(c, (stock_dice, stock_dice), (1.0, 1.0)) for c in cases],
                                        0.1, label="nnUNetTrainer", role="baseline"))
            records.append(_fold_record(fold, seed, [_case(c, (0.8, 0.8), (1.0, 1.0)) for c in cases], 0.2))
    pooled = cv.pool_fold_records(records)
    assert [(r["label"], r["seed"]) for r in pooled] == [("nnUNetTrainer", 0), ("A", 0), ("nnUNetTrainer", 1),
                                                         ("A", 1)]
    (comparison,) = segmentation_statistics(pooled)
    assert comparison["differences"] == pytest.approx([30.0, 10.0]) and comparison["wins"] == 2
    assert comparison["wilcoxon"]["n"] == 6  # 3 cases x 2 seeds


# ---------------------------------------------------------------------------------------------- the benchmark
COST = {"nnUNetTrainer": 0.1, METHOD: 0.3}  # seconds per training iteration of the fake training


def _argument(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def fake_child(raw: Path, calls: list[dict], empty_label: Path):
    """Stands in for ``runner._run_logged``: training writes a checkpoint whose logged epoch times follow the
    trainer's cost; every prediction copies the reference label of each input case (Dice 1), except that stock
    predicts nothing for ``tr_000``."""

    def run(cmd, env, log_file, progress, settings):
        if "nnunet_ext.benchmark.measure" in cmd:
            kind, args = cmd[cmd.index("--") - 1], cmd[cmd.index("--") + 1:]
            stats = Path(_argument(cmd, "--stats"))
        else:  # nnunet-ext predict --missing ...
            kind, args, stats = "predict_missing", cmd[cmd.index("predict") + 1:], None
        trainer = _argument(args, "-tr")
        base, epochs, iterations, seed = re.fullmatch(r"(.+)_e(\d+)i(\d+)s(\d+)", trainer).groups()
        if kind == "train":
            fold = args[2]
            folder = settings.output / "nnUNet_results" / args[0] / f"{trainer}__{settings.plans}__" \
                f"{settings.configuration}" / f"fold_{fold}"
            folder.mkdir(parents=True)
            seconds = int(iterations) * COST[base]
            n = int(epochs)
            logging = {"epoch_start_timestamps": [i * seconds for i in range(n)],
                       "epoch_end_timestamps": [(i + 1) * seconds for i in range(n)],
                       **{k: [1.0] * n for k in runner.SEGMENTATION_CURVES}}
            torch.save({"logging": logging}, folder / "checkpoint_final.pth")
            calls.append({"kind": kind, "trainer": trainer, "fold": fold})
        else:
            output, inputs = Path(_argument(args, "-o")), Path(_argument(args, "-i"))
            output.mkdir(parents=True, exist_ok=True)
            cases = sorted(p.name[:-len("_0000.nii.gz")] for p in inputs.glob("*_0000.nii.gz"))
            for case in cases:
                label = raw / "labelsTr" / f"{case}.nii.gz"
                if base == "nnUNetTrainer" and case == "tr_000":
                    label = empty_label
                (output / f"{case}.nii.gz").write_bytes(label.read_bytes())
            calls.append({"kind": kind, "trainer": trainer, "fold": _argument(args, "-f"), "cases": cases,
                          "seed": int(seed)})
        if stats is not None:
            stats.write_text(json.dumps({"returncode": 0, "predict_from_files_seconds": 2.0, "network_seconds": 1.0,
                                         "network_seconds_calls": 2, "peak_rss_mb": 100.0, "wall_seconds": 5.0}))
        return 0

    return run


@pytest.fixture
def benchmark(raw, tmp_path, monkeypatch) -> dict:
    import numpy as np
    import SimpleITK as sitk

    reference = sitk.ReadImage(str(raw / "labelsTr" / "tr_000.nii.gz"))
    empty = sitk.GetImageFromArray(np.zeros(sitk.GetArrayFromImage(reference).shape, dtype=np.uint8))
    empty.CopyInformation(reference)
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    calls: list[dict] = []
    monkeypatch.setattr(runner, "_run_logged", fake_child(raw, calls, tmp_path / "empty.nii.gz"))
    return {"raw": raw, "calls": calls, "output": tmp_path / "out",
            "splits": tmp_path / "nnUNet_preprocessed" / NAME / "splits_final.json"}


def _run(benchmark: dict, **kwargs) -> dict:
    options = {"trainers": (METHOD,), "budget": Budget(2, 2, 1), "seeds": (0, 1), "cv_folds": 3,
               "heartbeat_seconds": 600, **kwargs}
    benchmark["calls"].clear()
    return runner.run_benchmark(BenchmarkSettings(dataset=str(DATASET), output=benchmark["output"], **options))


def test_every_case_is_predicted_once_per_seed_and_the_folds_are_pooled(benchmark, capsys):
    results = _run(benchmark, missing_channels=("MRI",))
    splits = json.loads(benchmark["splits"].read_text())
    assert len(splits) == 3 and "wrote a 3-fold split of 6 training cases" in capsys.readouterr().out

    calls = benchmark["calls"]
    assert len([c for c in calls if c["kind"] == "train"]) == 2 * 2 * 3  # trainers x seeds x folds
    for kind in ("predict", "predict_missing"):
        for trainer in ("nnUNetTrainer", METHOD):
            for seed in (0, 1):
                predicted = [c for c in calls if c["kind"] == kind and c["trainer"].startswith(trainer + "_e")
                             and c["seed"] == seed]
                # fold k's model predicts exactly fold k's validation cases: every case once
                assert {int(c["fold"]): c["cases"] for c in predicted} == {
                    k: sorted(s["val"]) for k, s in enumerate(splits)}

    runs = {(r["label"], r["seed"]): r for r in results["runs"]}
    assert set(runs) == {("nnUNetTrainer", 0), ("nnUNetTrainer", 1), (METHOD, 0), (METHOD, 1)}
    for (label, seed), run in runs.items():
        assert run["status"] == "ok" and [c["case"] for c in run["evaluation"]["per_case"]] == CASES
        assert [c["case"] for c in run["missing"]["evaluation"]["per_case"]] == CASES
        assert [f["fold"] for f in run["folds"]] == [0, 1, 2]
        assert sorted(c for f in run["folds"] for c in f["cases"]) == CASES
    # stock missed tr_000 entirely (Dice 0 for both classes), the method found everything
    stock, method = runs[("nnUNetTrainer", 0)]["evaluation"], runs[(METHOD, 0)]["evaluation"]
    assert stock["per_case"][0]["metrics"]["1"]["Dice"] == 0.0 and method["foreground_mean"]["Dice"] == 1.0
    assert stock["foreground_mean"]["Dice"] == pytest.approx(5 / 6)
    # cost: the mean of the folds' seconds per iteration (each fold timed from its own checkpoint)
    assert runs[(METHOD, 0)]["training"]["seconds_per_iteration"] == pytest.approx(0.3)

    (comparison,) = results["statistics"]
    assert comparison["differences"] == pytest.approx([100 / 6, 100 / 6]) and comparison["wins"] == 2
    assert comparison["wilcoxon"]["n"] == 12  # 6 cases x 2 seeds
    assert results["cross_validation"]["folds"] == 3 and results["cross_validation"]["split_created"]
    assert results["cross_validation"]["validation_cases"] == [s["val"] for s in splits]
    assert results["n_test_cases"] == 6 and results["settings"]["cv_folds"] == 3

    report = (benchmark["output"] / "report.md").read_text()
    assert "3-fold cross-validation over 6 training cases" in report
    assert "## Segmentation in cross-validation, folds pooled" in report and "## Paired comparisons" in report
    assert "## Cross-validation: 3 folds" in report and "## Without MRI at inference" in report
    assert f"| {METHOD} | 0 | 1.000 | 1.000 | 1.000 | 1.000 |" in report
    assert "imagesTs` is not used" not in report
    fold_dir = benchmark["output"] / "runs" / NAME / f"{METHOD}_e2i2s0__nnUNetCPUPlans__3d_fullres"
    assert sorted(p.name for p in fold_dir.iterdir()) == ["fold_0", "fold_1", "fold_2"]
    record = json.loads((fold_dir / "fold_1" / "provenance.json").read_text())
    assert record["steps"]["training"]["fold"] == "1" and record["steps"]["training"]["splits_final.json fold 1"]
    assert set(record["steps"]["prediction"]) == {"imagesVal", "tta"} and "labelsVal" in record["steps"]["evaluation"]


def test_a_rerun_reuses_every_fold_and_a_changed_split_is_refused(benchmark):
    first = _run(benchmark)
    again = _run(benchmark)
    assert benchmark["calls"] == []
    assert all(r["reused_steps"] == ["training", "prediction", "evaluation"] for r in again["runs"])
    assert [r["evaluation"] for r in again["runs"]] == [r["evaluation"] for r in first["runs"]]
    # the same number of folds, other cases per fold: the trained models no longer match their split
    splits = json.loads(benchmark["splits"].read_text())
    splits[0]["val"][0], splits[1]["val"][0] = splits[1]["val"][0], splits[0]["val"][0]
    for split in splits:
        split["train"] = sorted(set(CASES) - set(split["val"]))
    benchmark["splits"].write_text(json.dumps(splits))
    with pytest.raises(BenchmarkError, match="fold_0: the trained model .* was made from other inputs "
                                             r"\(splits_final.json fold 0 changed.*--overwrite"):
        _run(benchmark)
    assert benchmark["calls"] == []
    with pytest.raises(BenchmarkError, match="defines 3 fold"):
        _run(benchmark, cv_folds=2)


def test_an_unused_test_split_is_named_and_equal_time_trains_every_fold(benchmark, capsys):
    import shutil

    for sub in ("imagesTs", "labelsTs"):  # present, but cross-validation does not read it
        shutil.copytree(benchmark["raw"] / sub.replace("Ts", "Tr"), benchmark["raw"] / sub)
    results = _run(benchmark, seeds=(0,), equal_time=True)
    assert "is not used (the folds' validation cases are the test cases)" in capsys.readouterr().out
    (plan,) = results["equal_time"]  # the method costs 0.3 / 0.1 = 3 times stock: stock for 2 x 6 iterations
    assert plan["cost_ratio"] == pytest.approx(3.0) and plan["budget_trainer"] == "nnUNetTrainer_e2i6s0"
    trained = [(c["trainer"], c["fold"]) for c in benchmark["calls"] if c["kind"] == "train"]
    assert trained[-3:] == [("nnUNetTrainer_e2i6s0", str(k)) for k in range(3)]
    same_time = next(r for r in results["runs"] if r["role"] == "equal_time")
    assert same_time["status"] == "ok" and [c["case"] for c in same_time["evaluation"]["per_case"]] == CASES
    assert [c["kind"] for c in results["statistics"]] == ["stock", "equal_time"]
    report = (benchmark["output"] / "report.md").read_text()
    assert "The dataset's `imagesTs` is not used." in report
