"""``nnunet-ext benchmark-cls``: classification trainers cross-validated with one budget on a tiny synthetic
image + table dataset (real CLI, child processes), its input checks, and the aggregation on constructed records.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_cli import console_script, run_cli, subprocess_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cfcml"))  # the shared tiny CFCML dataset builder
from cfcml_fixtures import planned_classification_root  # noqa: E402

from nnunet_ext.benchmark.classification import (  # noqa: E402
    ClassificationBenchmarkSettings,
    check_trainers,
    resolve_budget,
    resolve_classification_dataset,
    run_classification_benchmark,
)
from nnunet_ext.benchmark.classification_report import best_baseline, paired_differences, summarise  # noqa: E402
from nnunet_ext.benchmark.runner import BenchmarkError  # noqa: E402

DATASET = 801
NAME = "Dataset801_CfcmlTiny"
PLANS = "nnUNetCPUPlans_CFCML"
TRAINERS = ("CFCMLTrainer_tabularOnly", "CFCMLTrainer")
BROKEN_TRAINER_FILE = '''
from nnunet_ext.cfcml.trainer import CFCMLTrainerCore


class CFCMLTrainer_brokenStep(CFCMLTrainerCore):
    def compute_loss(self, batch):
        raise RuntimeError("deliberately broken training step")
'''


@pytest.fixture(scope="module")
def configured_root(tmp_path_factory):
    """A copy of the planned tiny dataset (15 training cases, 3 classes, lesion masks, 3 test cases with labels)
    configured for CFCML: derived plans and a class-stratified 5-fold ``splits_final.json``."""
    source = planned_classification_root(tmp_path_factory.getbasetemp(), DATASET, masks=True)
    root = Path(shutil.copytree(source, tmp_path_factory.mktemp("bench_cls") / "root"))
    env = subprocess_env(root)
    raw = root / "nnUNet_raw" / NAME
    # the converters leave test labels empty; give the three test cases their true class so --test can evaluate
    rows = list(csv.DictReader(open(raw / "tabular.csv", newline="")))
    for row in rows:
        if row["case_id"].startswith("ts_"):
            row["label"] = ("benign", "atypical", "malignant")[int(row["case_id"][-3:]) % 3]
    for folder in (raw, root / "nnUNet_preprocessed" / NAME):
        with open(folder / "tabular.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    # after the edit: the trainer refuses a raw table changed since configure (issue 17.3)
    run_cli([console_script("nnunet-ext"), "configure", "cfcml", "-d", str(DATASET), "-p", "nnUNetCPUPlans", "-o",
             PLANS], env)
    return root


@pytest.fixture(scope="module")
def benchmark(configured_root):
    env = subprocess_env(configured_root)
    output = configured_root / "bench"
    cmd = [console_script("nnunet-ext"), "benchmark-cls", "-d", str(DATASET), "-c", "2d", "-p", PLANS,
           "--trainers", *TRAINERS, "--baseline", TRAINERS[0], "-f", "0", "1", "--seeds", "0",
           "--epochs", "2", "--iterations", "2", "--test", "--heartbeat", "30", "--output", str(output)]
    result = run_cli(cmd, env, timeout=1200)
    return {"root": configured_root, "env": env, "output": output, "cmd": cmd, "stdout": result.stdout,
            "results": json.loads((output / "results.json").read_text())}


def _auc_from_csv(path: Path, labels: dict[str, str]) -> float:
    from sklearn.metrics import roc_auc_score

    rows = list(csv.DictReader(open(path, newline="")))
    classes = [c[len("prob_"):] for c in rows[0] if c.startswith("prob_")]
    y = np.array([classes.index(labels[r["case_id"]]) for r in rows])
    p = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(len(classes)))))


def _labels(root: Path) -> dict[str, str]:
    return {r["case_id"]: r["label"] for r in csv.DictReader(open(root / "nnUNet_preprocessed" / NAME /
                                                                   "tabular.csv", newline=""))}


@pytest.mark.slow
def test_benchmark_runs_every_fold_with_the_same_budget_and_reports(benchmark):
    results, output = benchmark["results"], benchmark["output"]
    runs = results["runs"]
    assert [(r["trainer"], r["fold"]) for r in runs] == [(t, f) for f in (0, 1) for t in TRAINERS]
    assert all(r["status"] == "ok" for r in runs), [r["error"] for r in runs]
    splits = json.loads((benchmark["root"] / "nnUNet_preprocessed" / NAME / "splits_final.json").read_text())
    labels = _labels(benchmark["root"])
    for run in runs:
        fold_dir = Path(run["paths"]["model"])
        checkpoint = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert checkpoint["trainer_name"] == f"{run['trainer']}_e2i2s0"
        assert len(checkpoint["logging"]["train_losses"]) == 2 == run["training"]["epochs"]
        # the benchmark's metric equals an independent computation on the fold's own validation cases
        cases = sorted(r["case_id"] for r in csv.DictReader(open(fold_dir / "validation_cls.csv")))
        assert cases == sorted(splits[run["fold"]]["val"])
        assert run["validation"]["auc"] == pytest.approx(_auc_from_csv(fold_dir / "validation_cls.csv", labels))
        assert run["training"]["seconds_per_iteration"] > 0 and run["training"]["peak_rss_mb"] > 100
        assert not (fold_dir / "validation").exists()  # nnU-Net's segmentation validation is skipped by default
    generated = (output / "budget_trainers" / "nnunet_ext_budget_trainers.py").read_text()
    assert generated.count("self.num_iterations_per_epoch = 2") == len(TRAINERS)
    assert generated.count("segmentation_validation = False") == len(TRAINERS)

    # pooled out-of-fold predictions: every validation case of both folds once
    for pooled in results["out_of_fold"]:
        rows = list(csv.DictReader(open(pooled["file"])))
        assert sorted(r["case_id"] for r in rows) == sorted(splits[0]["val"] + splits[1]["val"])
        assert pooled["metrics"]["auc"] == pytest.approx(_auc_from_csv(Path(pooled["file"]), labels))
    # the test split through predict-cls, both folds averaged
    assert [t["trainer"] for t in results["test"]] == list(TRAINERS)
    for test in results["test"]:
        assert test["status"] == "ok" and test["folds"] == [0, 1]
        assert test["metrics"]["num_cases"] == 3

    summary = {row["trainer"]: row for row in results["summary"]}
    method, baseline = summary["CFCMLTrainer"], summary["CFCMLTrainer_tabularOnly"]
    aucs = [r["validation"]["auc"] for r in runs if r["trainer"] == "CFCMLTrainer"]
    assert method["metrics"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert method["metrics"]["auc"]["std"] == pytest.approx(np.std(aucs, ddof=1))
    assert method["delta"]["auc"]["baseline"] == "CFCMLTrainer_tabularOnly"
    assert method["delta"]["auc"]["points"] == pytest.approx(
        100 * (method["metrics"]["auc"]["mean"] - baseline["metrics"]["auc"]["mean"]))
    report = (output / "report.md").read_text()
    for text in ("## Cross-validation", "CFCMLTrainer_tabularOnly (baseline)", "| 2/2 |", "## Out-of-fold",
                 "## Held-out test split", "## Cost", "s/iteration", "2 epochs x 2 iterations",
                 f"{method['delta']['auc']['points']:+.1f}"):
        assert text in report, text
    assert (output / "plots" / "classification_metrics.png").stat().st_size > 1000
    assert report in benchmark["stdout"]


@pytest.mark.slow
def test_rerun_reuses_finished_runs(benchmark):
    first = benchmark["results"]
    result = run_cli(benchmark["cmd"], benchmark["env"], timeout=600)
    assert "trained earlier, reusing" in result.stdout
    again = json.loads((benchmark["output"] / "results.json").read_text())
    assert all(r["reused_steps"] == ["training"] for r in again["runs"])
    assert [r["validation"]["auc"] for r in again["runs"]] == [r["validation"]["auc"] for r in first["runs"]]
    assert all(t.get("reused") for t in again["test"])


@pytest.mark.slow
def test_failed_run_is_reported_with_its_log(benchmark, tmp_path):
    trainer_dir = tmp_path / "trainers"
    trainer_dir.mkdir()
    (trainer_dir / "broken_cls_trainers.py").write_text(BROKEN_TRAINER_FILE)
    output = tmp_path / "out"
    cmd = [console_script("nnunet-ext"), "benchmark-cls", "-d", str(DATASET), "-c", "2d", "-p", PLANS,
           "--trainers", "CFCMLTrainer_brokenStep", "-f", "0", "--epochs", "1", "--iterations", "1",
           "--trainer-dirs", str(trainer_dir), "--output", str(output)]
    result = run_cli(cmd, benchmark["env"], check=False, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:]
    run = json.loads((output / "results.json").read_text())["runs"][0]
    assert run["status"] == "failed" and run["failed_step"] == "training"
    assert "deliberately broken training step" in run["error"]
    report = (output / "report.md").read_text()
    assert "## Failed runs" in report and "deliberately broken training step" in report and "| 0/1 |" in report


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture
def configured_env(configured_root, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(configured_root / var))
    return configured_root


def _settings(output: Path, **kwargs) -> ClassificationBenchmarkSettings:
    values = {"dataset": str(DATASET), "output": output, "trainers": ("CFCMLTrainer",), "plans": PLANS,
              "folds": (0,), "epochs": 1, "iterations": 1}
    values.update(kwargs)
    return ClassificationBenchmarkSettings(**values)


@pytest.mark.slow  # the configured dataset fixture plans and configures (~1 min)
@pytest.mark.parametrize("kwargs, message", [
    ({"trainers": ("nnUNetTrainer",)}, "task_kind = 'segmentation'"),
    ({"trainers": ("CFCMLTrainer", "NoSuchTrainer")}, "NoSuchTrainer"),
    ({"plans": "nnUNetCPUPlans"}, "carry no 'cfcml' settings (needed by CFCMLTrainer): run nnunet-ext configure "
                                  "cfcml -d Dataset801_CfcmlTiny -p nnUNetCPUPlans -o nnUNetCPUPlans_CFCML"),
    ({"plans": "MissingPlans"}, "MissingPlans.json not found"),
    ({"configuration": "3d_fullres"}, "configuration '3d_fullres' is not in"),
    ({"folds": (0, 7)}, "fold(s) [7] do not exist"),
    ({"dataset": "999"}, "dataset '999'"),
])
def test_bad_inputs_stop_before_training(configured_env, tmp_path, kwargs, message):
    with pytest.raises(BenchmarkError, match=None) as error:
        run_classification_benchmark(_settings(tmp_path / "out", **kwargs))
    assert message in str(error.value)
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"trainers": ()}, "no trainers given"),
    ({"trainers": ("CFCMLTrainer", "CFCMLTrainer")}, "trainers must be distinct"),
    ({"baselines": ("CFCMLTrainer_concat",)}, "not among the trainers"),
    ({"folds": ("all",)}, "fold 'all' has no validation cases"),
    ({"folds": (0, 0)}, "folds must be distinct"),
    ({"seeds": (-1,)}, "seeds must be distinct non-negative"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"device": "tpu"}, "device must be"),
    ({"extra_trainer_dirs": ("/no/such/folder",)}, "does not exist"),
])
def test_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(BenchmarkError) as error:
        _settings(tmp_path, **kwargs)
    assert message in str(error.value)


@pytest.mark.slow  # the configured dataset fixture plans and configures (~1 min)
def test_missing_splits_and_unlabelled_test_cases_are_named(configured_env, tmp_path):
    preprocessed = configured_env / "nnUNet_preprocessed" / NAME
    settings = _settings(tmp_path / "out")
    data = resolve_classification_dataset(settings, check_trainers(settings))
    assert data.classes == ("atypical", "benign", "malignant") and len(data.splits) == 5
    # the raw table without test labels (as the converters write it): --test names the unlabelled cases
    raw = configured_env / "nnUNet_raw" / NAME
    backup = (raw / "tabular.csv").read_text()
    try:
        rows = list(csv.DictReader(open(raw / "tabular.csv", newline="")))
        for row in rows:
            row["label"] = "" if row["case_id"].startswith("ts_") else row["label"]
        with open(preprocessed / "tabular.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with pytest.raises(BenchmarkError, match=r"test case\(s\) without a label .*ts_000"):
            resolve_classification_dataset(_settings(tmp_path / "out", test=True), check_trainers(settings))
        splits = preprocessed / "splits_final.json"
        moved = splits.rename(tmp_path / "splits_final.json")
        with pytest.raises(BenchmarkError, match="splits_final.json not found"):
            resolve_classification_dataset(settings, check_trainers(settings))
        moved.rename(splits)
    finally:
        (preprocessed / "tabular.csv").write_text(backup)


@pytest.mark.slow  # the configured dataset fixture plans and configures (~1 min)
def test_default_budget_is_the_cfcml_schedule(configured_env, tmp_path):
    settings = _settings(tmp_path / "out", epochs=None, iterations=None, folds=(0, 1, 2))
    data = resolve_classification_dataset(settings, check_trainers(settings))
    budget, source = resolve_budget(settings, data)
    plans = json.loads((configured_env / "nnUNet_preprocessed" / NAME / f"{PLANS}.json").read_text())
    batch = plans["configurations"]["2d"]["batch_size"]
    per_class = batch // 3
    majority = max(max([data.labels[c] for c in data.splits[f]["train"]].count(k) for k in data.classes)
                   for f in (0, 1, 2))
    assert budget.epochs == plans["nnunet_ext"]["cfcml"]["settings"]["num_epochs"]
    assert budget.iterations == math.ceil(majority / per_class) and source == "CFCML schedule of the plans"
    explicit, source = resolve_budget(_settings(tmp_path / "out", epochs=3, iterations=None), data)
    assert explicit.epochs == 3 and explicit.iterations == budget.iterations and source.startswith("partly")


# ------------------------------------------------------------------------------------------- aggregation
def _record(trainer: str, fold: int, seed: int, auc: float, bacc: float = 0.5, status: str = "ok") -> dict:
    metrics = {"auc": auc, "balanced_accuracy": bacc, "accuracy": bacc, "f1_macro": bacc}
    return {"trainer": trainer, "fold": fold, "seed": seed, "status": status,
            "validation": metrics if status == "ok" else None,
            "training": {"seconds_per_iteration": 1.0, "peak_rss_mb": 100.0, "wall_seconds": 10.0}
            if status == "ok" else None}


def _results(runs: list[dict], trainers: list[str], baselines: list[str]) -> dict:
    return {"settings": {"trainers": trainers, "baselines": baselines}, "runs": runs, "out_of_fold": [], "test": []}


@pytest.mark.parametrize("aucs, expected_delta, expected_reference", [
    # method vs the better of two baselines (B: 0.80 mean > C: 0.70)
    ({"A": [0.90, 0.86], "B": [0.80, 0.80], "C": [0.70, 0.70]}, 8.0, "B"),
    ({"A": [0.60, 0.64], "B": [0.80, 0.80], "C": [0.90, 0.92]}, -29.0, "C"),
])
def test_delta_to_best_baseline(aucs, expected_delta, expected_reference):
    runs = [_record(t, f, 0, v) for t, values in aucs.items() for f, v in enumerate(values)]
    rows = {r["trainer"]: r for r in summarise(_results(runs, ["A", "B", "C"], ["B", "C"]))}
    assert rows["A"]["delta"]["auc"]["points"] == pytest.approx(expected_delta)
    other = "C" if expected_reference == "B" else "B"  # the weaker baseline is compared with the same reference
    assert rows[other]["delta"]["auc"]["baseline"] == expected_reference
    assert rows[other]["delta"]["auc"]["points"] < 0 and rows[expected_reference]["delta"]["auc"]["points"] == 0
    assert rows["A"]["delta"]["auc"]["baseline"] == expected_reference
    assert rows["A"]["paired_auc"]["reference"] == expected_reference
    assert best_baseline(list(rows.values()), "auc")["trainer"] == expected_reference


def test_paired_differences_and_failed_runs():
    runs = [_record("A", 0, 0, 0.9), _record("A", 1, 0, 0.7), _record("A", 2, 0, 0.0, status="failed"),
            _record("B", 0, 0, 0.8), _record("B", 1, 0, 0.75), _record("B", 2, 0, 0.6)]
    paired = paired_differences(runs, "A", "B", "auc")
    assert paired["n"] == 2 and paired["wins"] == 1 and paired["mean"] == pytest.approx(2.5)
    assert paired["std"] == pytest.approx(np.std([10.0, -5.0], ddof=1))
    rows = {r["trainer"]: r for r in summarise(_results(runs, ["A", "B"], ["B"]))}
    assert rows["A"]["runs"] == 3 and rows["A"]["runs_ok"] == 2
    assert rows["A"]["metrics"]["auc"]["mean"] == pytest.approx(0.8)
    assert rows["B"]["delta"]["auc"] == {"baseline": "B", "points": 0.0}  # the best baseline is the reference
    assert rows["B"]["paired_auc"] is None
    assert paired_differences(runs, "A", "missing", "auc") is None


def _report_results(runs: list[dict], trainers: list[str], baselines: list[str]) -> dict:
    results = _results(runs, trainers, baselines)
    results["settings"].update(
        dataset_name=NAME, configuration="2d", plans=PLANS, device="cpu", nnUNet_n_proc_DA="0", batch_size=4,
        budget={"epochs": 2, "iterations": 2, "val_iterations": 1}, budget_source="given", folds=[0, 1, 2],
        seeds=[0, 1], classes=["a", "b"], versions={}, command="nnunet-ext benchmark-cls", test=False)
    results.update(created="now", n_test_cases=0)
    return results


@pytest.mark.parametrize("a_aucs, verdict", [
    ([0.90, 0.91, 0.92, 0.90, 0.93, 0.91], "better than B (95 % interval above 0)"),
    ([0.70, 0.71, 0.72, 0.70, 0.73, 0.71], "worse than B (95 % interval below 0)"),
    ([0.90, 0.70, 0.85, 0.75, 0.80, 0.80], "not distinguishable from B (95 % interval contains 0)"),
])
def test_report_paired_statistics_over_folds_and_seeds(a_aucs, verdict):
    from scipy import stats

    from nnunet_ext.benchmark.classification_report import format_report, paired_statistics

    pairs = [(f, s) for s in (0, 1) for f in (0, 1, 2)]
    runs = [_record("A", f, s, auc, bacc=0.6) for (f, s), auc in zip(pairs, a_aucs)]
    runs += [_record("B", f, s, 0.80, bacc=0.6) for f, s in pairs]
    results = _report_results(runs, ["A", "B"], ["B"])
    auc, bacc = paired_statistics(results, summarise(results))
    assert (auc["candidate"], auc["reference"], auc["metric"], auc["n"]) == ("A", "B", "auc", 6)
    differences = [100 * (v - 0.8) for v in a_aucs]
    assert auc["mean"] == pytest.approx(np.mean(differences))
    assert auc["wilcoxon"]["p_value"] == pytest.approx(stats.wilcoxon(differences).pvalue)
    assert bacc["metric"] == "balanced_accuracy" and bacc["differences"] == [0.0] * 6 and bacc["wins"] == 0
    report = format_report(results)
    assert f"- **A**, macro AUC: {verdict}." in report
    assert "- **A**, balanced accuracy: not distinguishable from B (95 % interval contains 0)." in report
    assert "| A | balanced accuracy | B | 6 | 0.0 [0.0, 0.0] | 0/6 | 1 (n = 6) |" in report


def test_report_one_fold_one_seed_is_an_observation():
    from nnunet_ext.benchmark.classification_report import format_report

    results = _report_results([_record("A", 0, 0, 0.9), _record("B", 0, 0, 0.8)], ["A", "B"], ["B"])
    assert "- **A**, macro AUC: one run (fold, seed): an observation, not a result." in format_report(results)
