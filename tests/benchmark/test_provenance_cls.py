"""``nnunet-ext benchmark-cls`` never silently reuses a stale fold model or test prediction
(``nnunet_ext.benchmark.provenance``). Runs are faked: the child processes write a checkpoint and a
``validation_cls.csv`` (or the test ``predictions.csv``); the evaluation is the real one against ``tabular.csv``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers_nnunet import set_nnunet_paths

from nnunet_ext.benchmark import classification
from nnunet_ext.benchmark.classification import ClassificationBenchmarkSettings, run_classification_benchmark
from nnunet_ext.benchmark.runner import BenchmarkError

DATASET = 972
NAME = f"Dataset{DATASET}_ProvCls"
PLANS = "nnUNetCPUPlans_CFCML"
CASES = [f"tr_{i:03d}" for i in range(6)]
TEST_CASES = ["ts_000", "ts_001"]


def _write_table(path: Path, labels: dict[str, str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "age", "label"])
        writer.writerows([case, 50 + i, label] for i, (case, label) in enumerate(labels.items()))


@pytest.fixture
def dataset(tmp_path, monkeypatch) -> dict:
    folders = set_nnunet_paths(monkeypatch, tmp_path)
    raw, preprocessed = folders["nnUNet_raw"] / NAME, folders["nnUNet_preprocessed"] / NAME
    for folder in (raw / "imagesTr", raw / "imagesTs", preprocessed / "nnUNetPlans_2d"):
        folder.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "R"}, "labels": {"background": 0, "roi": 1},
                                                  "file_ending": ".png", "numTraining": len(CASES)}))
    for case in CASES:
        (raw / "imagesTr" / f"{case}_0000.png").write_bytes(case.encode())
    for case in TEST_CASES:
        (raw / "imagesTs" / f"{case}_0000.png").write_bytes(case.encode())
    (preprocessed / "nnUNetPlans_2d" / "tr_000.b2nd").write_bytes(b"x")
    plans = {"plans_name": PLANS, "configurations": {"2d": {"data_identifier": "nnUNetPlans_2d", "batch_size": 2}},
             "nnunet_ext": {"cfcml": {"schema": {"id_column": "case_id", "label_column": "label",
                                                 "classes": ["a", "b"]}, "settings": {"num_epochs": 1}}}}
    (preprocessed / f"{PLANS}.json").write_text(json.dumps(plans))
    (preprocessed / "splits_final.json").write_text(json.dumps(
        [{"train": CASES[2:], "val": CASES[:2]}, {"train": CASES[:4], "val": CASES[4:]}]))
    labels = {case: "ab"[i % 2] for i, case in enumerate(CASES + TEST_CASES)}
    _write_table(preprocessed / "tabular.csv", labels)
    calls = []

    def fake_run_logged(cmd, env, log_file, progress, settings):
        if "predict-cls" in cmd:
            calls.append("predict")
            output = Path(cmd[cmd.index("-o") + 1])
            cases = TEST_CASES
        else:
            calls.append("train")
            args = cmd[cmd.index("--") + 1:]
            trainer, fold = args[args.index("-tr") + 1], int(args[2])
            output = Path(env["nnUNet_results"]) / NAME / f"{trainer}__{PLANS}__2d" / f"fold_{fold}" / \
                classification.VALIDATION_CSV
            output.parent.mkdir(parents=True, exist_ok=True)
            (output.parent / "checkpoint_final.pth").write_bytes(b"model")
            cases = json.loads((preprocessed / "splits_final.json").read_text())[fold]["val"]
        with open(output, "w", newline="") as f:  # always right: AUC 1
            writer = csv.writer(f)
            writer.writerow(["case_id", "prob_a", "prob_b"])
            writer.writerows([c, 0.9, 0.1] if labels[c] == "a" else [c, 0.1, 0.9] for c in cases)
        return 0

    monkeypatch.setattr(classification, "_run_logged", fake_run_logged)
    monkeypatch.setattr(classification, "training_record", lambda fold_dir, run_dir, iterations, keys: {
        "seconds_per_iteration": 0.1, "peak_rss_mb": 100.0, "wall_seconds": 1.0, "epochs": 1})
    monkeypatch.setattr(classification, "write_outputs", lambda results, output: None)
    return {"raw": raw, "preprocessed": preprocessed, "calls": calls, "output": tmp_path / "out", "labels": labels}


def _benchmark(dataset: dict, **kwargs) -> dict:
    options = {"trainers": ("CFCMLTrainer",), "plans": PLANS, "folds": (0, 1), "epochs": 1, "iterations": 2,
               "test": True, **kwargs}
    dataset["calls"].clear()
    return run_classification_benchmark(ClassificationBenchmarkSettings(dataset=str(DATASET),
                                                                        output=dataset["output"], **options))


def test_unchanged_inputs_reuse_the_fold_models_and_the_test_prediction(dataset):
    first = _benchmark(dataset)
    assert dataset["calls"] == ["train", "train", "predict"]
    assert all(r["status"] == "ok" and r["validation"]["auc"] == 1.0 for r in first["runs"])
    again = _benchmark(dataset)
    assert dataset["calls"] == [] and all(r["reused_steps"] == ["training"] for r in again["runs"])
    assert again["test"][0]["reused"] and again["test"][0]["metrics"]["auc"] == 1.0


def _change_split(dataset):
    path = dataset["preprocessed"] / "splits_final.json"
    splits = json.loads(path.read_text())
    splits[1] = {"train": CASES[1:5], "val": [CASES[0], CASES[5]]}
    path.write_text(json.dumps(splits))


def _change_label(dataset):
    dataset["labels"]["tr_003"] = "a"
    _write_table(dataset["preprocessed"] / "tabular.csv", dataset["labels"])


@pytest.mark.parametrize("change, changed", [
    (_change_split, "fold_1: .*splits_final.json fold 1 changed"),
    (_change_label, "fold_0: .*tabular.csv changed"),
])
def test_changed_training_inputs_are_refused_before_any_work(dataset, change, changed):
    _benchmark(dataset)
    change(dataset)
    with pytest.raises(BenchmarkError, match=f"{changed}.*--overwrite"):
        _benchmark(dataset)
    assert dataset["calls"] == []


def test_changed_val_iterations_are_refused(dataset):
    _benchmark(dataset)
    for run_json in (dataset["output"] / "runs").rglob("run.json"):
        run_json.unlink()  # leaves only the provenance record to notice the change
    with pytest.raises(BenchmarkError, match="val_iterations: 1 when trained, 3 now"):
        _benchmark(dataset, val_iterations=3)


def test_changed_test_image_redoes_the_test_prediction(dataset):
    _benchmark(dataset)
    (dataset["raw"] / "imagesTs" / "ts_001_0000.png").write_bytes(b"another image")
    again = _benchmark(dataset)
    assert dataset["calls"] == ["predict"] and not again["test"][0].get("reused")


def test_a_fold_model_without_record_is_refused(dataset):
    _benchmark(dataset)
    next((dataset["output"] / "runs").rglob("fold_0/provenance.json")).unlink()
    with pytest.raises(BenchmarkError, match="fold_0: the trained model .* has no provenance.json"):
        _benchmark(dataset)
