"""A re-run of ``nnunet-ext benchmark`` never silently reuses a stale step (``nnunet_ext.benchmark.provenance``).

Runs are faked without training: the child processes (``_run_logged``) write a checkpoint, or copy the test
labels of the first prediction as "predictions"; the evaluation is the real one against ``labelsTs``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers_nnunet import make_tiny_dataset, set_nnunet_paths

from nnunet_ext.benchmark import provenance, runner
from nnunet_ext.benchmark.budget import Budget
from nnunet_ext.benchmark.runner import BenchmarkError, BenchmarkSettings, run_benchmark

DATASET = 971
NAME = f"Dataset{DATASET}_Prov"
CURVES = {k: [1.0] for k in runner.SEGMENTATION_CURVES}


@pytest.fixture
def dataset(tmp_path, monkeypatch) -> dict:
    """A tiny dataset with a test split, plans and (fake) preprocessed data; child processes faked."""
    folders = set_nnunet_paths(monkeypatch, tmp_path)
    raw = make_tiny_dataset(folders["nnUNet_raw"], DATASET, name="Prov", n_labelled=3, n_unlabeled=0,
                            shape=(10, 12, 12))
    (raw / "imagesTs").mkdir()
    (raw / "labelsTs").mkdir()
    for i in range(2):
        for c in range(2):
            shutil.copy(raw / "imagesTr" / f"tr_{i:03d}_{c:04d}.nii.gz",
                        raw / "imagesTs" / f"ts_{i:03d}_{c:04d}.nii.gz")
        shutil.copy(raw / "labelsTr" / f"tr_{i:03d}.nii.gz", raw / "labelsTs" / f"ts_{i:03d}.nii.gz")
    preprocessed = folders["nnUNet_preprocessed"] / NAME
    (preprocessed / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (preprocessed / "nnUNetPlans_3d_fullres" / "tr_000.b2nd").write_bytes(b"x")
    plans = {"plans_name": "nnUNetCPUPlans",
             "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2}}}
    (preprocessed / "nnUNetCPUPlans.json").write_text(json.dumps(plans))
    (preprocessed / "splits_final.json").write_text(json.dumps(
        [{"train": ["tr_000", "tr_001"], "val": ["tr_002"]}, {"train": ["tr_001", "tr_002"], "val": ["tr_000"]}]))
    calls = []
    predicted_labels = {}  # the labels at the first prediction: what every fake model "predicts"

    def fake_run_logged(cmd, env, log_file, progress, settings):
        kind, args = cmd[cmd.index("--") - 1], cmd[cmd.index("--") + 1:]
        calls.append(kind)
        stats = Path(cmd[cmd.index("--stats") + 1])
        if kind == "train":
            dataset_name, configuration, fold = args[0], args[1], args[2]
            trainer, plans_name = args[args.index("-tr") + 1], args[args.index("-p") + 1]
            fold_dir = Path(env["nnUNet_results"]) / dataset_name / f"{trainer}__{plans_name}__{configuration}" / \
                f"fold_{fold}"
            fold_dir.mkdir(parents=True, exist_ok=True)
            (fold_dir / "checkpoint_final.pth").write_bytes(b"model")
        else:
            output = Path(args[args.index("-o") + 1])
            output.mkdir(parents=True, exist_ok=True)
            for label in sorted((raw / "labelsTs").iterdir()):
                predicted_labels.setdefault(label.name, label.read_bytes())
                (output / label.name).write_bytes(predicted_labels[label.name])
            stats.write_text(json.dumps({"returncode": 0, "predict_from_files_seconds": 1.0, "network_seconds": 1.0,
                                         "network_seconds_calls": 2}))
        return 0

    monkeypatch.setattr(runner, "_run_logged", fake_run_logged)
    monkeypatch.setattr(runner, "training_record", lambda fold_dir, run_dir, iterations: {
        "seconds_per_iteration": 0.1, "peak_rss_mb": 100.0, "epochs": 1, "curves": CURVES})
    monkeypatch.setattr(runner, "write_outputs", lambda results, output: None)
    return {"raw": raw, "preprocessed": preprocessed, "calls": calls, "output": tmp_path / "out"}


def _benchmark(dataset: dict, **kwargs) -> dict:
    options = {"budget": Budget(1, 2, 1), "fold": "0", **kwargs}
    dataset["calls"].clear()
    return run_benchmark(BenchmarkSettings(dataset=str(DATASET), output=dataset["output"], **options))


def _mean_dice(results: dict) -> float:
    return results["runs"][0]["evaluation"]["foreground_mean"]["Dice"]


def _edit_label(path: Path) -> None:
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    array[:] = 0
    array[:3] = 1
    edited = sitk.GetImageFromArray(array.astype(np.uint8))
    edited.CopyInformation(image)
    sitk.WriteImage(edited, str(path))


def test_unchanged_inputs_reuse_every_step(dataset):
    first = _benchmark(dataset)
    assert dataset["calls"] == ["train", "predict"] and first["runs"][0]["reused_steps"] == []
    again = _benchmark(dataset)
    assert dataset["calls"] == [] and again["runs"][0]["reused_steps"] == ["training", "prediction", "evaluation"]
    assert _mean_dice(again) == _mean_dice(first) == 1.0
    record = json.loads((Path(again["runs"][0]["paths"]["run"]) / provenance.RECORD_FILE).read_text())
    assert list(record["steps"]) == ["training", "prediction", "evaluation"]
    assert record["steps"]["training"]["splits_final.json fold 0"] is not None


def _change_split(dataset):
    path = dataset["preprocessed"] / "splits_final.json"
    splits = json.loads(path.read_text())
    splits[0] = {"train": ["tr_000", "tr_002"], "val": ["tr_001"]}
    path.write_text(json.dumps(splits))


def _change_plans(dataset):
    path = dataset["preprocessed"] / "nnUNetCPUPlans.json"
    plans = json.loads(path.read_text())
    plans["configurations"]["3d_fullres"]["batch_size"] = 4
    path.write_text(json.dumps(plans))


def _change_training_label(dataset):
    _edit_label(dataset["raw"] / "labelsTr" / "tr_002.nii.gz")


def _add_training_case(dataset):
    raw = dataset["raw"]
    for c in range(2):
        shutil.copy(raw / "imagesTr" / f"tr_000_{c:04d}.nii.gz", raw / "imagesTr" / f"tr_009_{c:04d}.nii.gz")
    shutil.copy(raw / "labelsTr" / "tr_000.nii.gz", raw / "labelsTr" / "tr_009.nii.gz")


def _write_split_json(dataset):
    (dataset["raw"] / "split.json").write_text(json.dumps({"seed": 1}))


@pytest.mark.parametrize("change, changed", [
    (_change_split, "splits_final.json fold 0 changed"),
    (_change_plans, "nnUNetCPUPlans.json changed"),
    (_change_training_label, "labelsTr changed"),
    (_add_training_case, "imagesTr changed; labelsTr changed"),
    (_write_split_json, "split.json: null when trained"),
])
def test_changed_training_inputs_are_refused_before_any_work(dataset, change, changed):
    _benchmark(dataset)
    change(dataset)
    with pytest.raises(BenchmarkError, match=f"{NAME}.*fold_0: the trained model .* was made from other inputs "
                                             f"\\({changed}.*--overwrite.*--output"):
        _benchmark(dataset)
    assert dataset["calls"] == []
    redone = _benchmark(dataset, overwrite=True)  # the way out named in the message
    assert dataset["calls"] == ["train", "predict"] and redone["runs"][0]["reused_steps"] == []


@pytest.mark.parametrize("kwargs, changed", [
    ({"budget": Budget(1, 2, 3)}, "val_iterations: 1 when trained, 3 now"),
    ({"final_validation": True}, "final_validation: false when trained, true now"),
    ({"da_workers": 2}, 'nnUNet_n_proc_DA: "0" when trained, "2" now'),
])
def test_changed_settings_are_refused(dataset, kwargs, changed):
    _benchmark(dataset)
    run_json = next((dataset["output"] / "runs").rglob("run.json"))
    run_json.unlink()  # leaves only the provenance record to notice the change
    with pytest.raises(BenchmarkError, match=changed):
        _benchmark(dataset, **kwargs)
    assert dataset["calls"] == []


def test_edited_test_label_redoes_only_the_evaluation(dataset, capsys):
    assert _mean_dice(_benchmark(dataset)) == 1.0
    _edit_label(dataset["raw"] / "labelsTs" / "ts_000.nii.gz")
    again = _benchmark(dataset)
    assert dataset["calls"] == [] and again["runs"][0]["reused_steps"] == ["training", "prediction"]
    assert _mean_dice(again) < 1.0
    assert "evaluation is redone: labelsTs changed" in capsys.readouterr().out
    assert _benchmark(dataset)["runs"][0]["reused_steps"] == ["training", "prediction", "evaluation"]


def test_changed_test_image_redoes_prediction_and_evaluation(dataset, capsys):
    _benchmark(dataset)
    image = dataset["raw"] / "imagesTs" / "ts_001_0001.nii.gz"
    shutil.copy(dataset["raw"] / "imagesTr" / "tr_002_0001.nii.gz", image)
    again = _benchmark(dataset)
    assert dataset["calls"] == ["predict"] and again["runs"][0]["reused_steps"] == ["training"]
    out = capsys.readouterr().out
    assert "prediction is redone: imagesTs changed" in out and "evaluation is redone: prediction redone" in out


def test_a_model_without_record_is_refused_as_unknown(dataset):
    first = _benchmark(dataset)
    (Path(first["runs"][0]["paths"]["run"]) / provenance.RECORD_FILE).unlink()  # as made by an older version
    with pytest.raises(BenchmarkError, match="fold_0: the trained model .*checkpoint_final.pth has no "
                                             "provenance.json .*--overwrite"):
        _benchmark(dataset)
    assert dataset["calls"] == []


def test_cli_prints_one_line_and_exits_2(dataset, capsys):
    from nnunet_ext.cli import main

    _benchmark(dataset)
    _change_split(dataset)
    dataset["calls"].clear()
    code = main(["benchmark", "-d", str(DATASET), "-f", "0", "--epochs", "1", "--iterations", "2",
                 "--val-iterations", "1", "--output", str(dataset["output"])])
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "splits_final.json fold 0 changed" in lines[0]
    assert dataset["calls"] == []


def test_retraining_makes_earlier_predictions_stale(dataset):
    first = _benchmark(dataset)
    (Path(first["runs"][0]["paths"]["model"]) / "checkpoint_final.pth").unlink()  # e.g. deleted by the user
    again = _benchmark(dataset)
    assert dataset["calls"] == ["train", "predict"] and again["runs"][0]["reused_steps"] == []


@pytest.mark.parametrize("recorded, current, expected", [
    ({"a": "0" * 64}, {"a": "1" * 64}, ["a changed"]),
    ({"seed": 0}, {"seed": 1}, ["seed: 0 when trained, 1 now"]),
    ({"a": "x"}, {"a": "x", "b": None}, []),
    (None, {"a": "x"}, ["no record"]),
])
def test_changed_inputs_are_described(recorded, current, expected):
    assert provenance.changed_inputs(recorded, current) == expected


def test_folder_hash_depends_on_names_and_contents(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"1")
    (tmp_path / "b.nii.gz").write_bytes(b"2")
    (tmp_path / "notes.txt").write_text("ignored: nnU-Net reads only the file ending")
    before = provenance.folder_sha256(tmp_path, ".nii.gz")
    (tmp_path / "notes.txt").write_text("edited")
    assert provenance.folder_sha256(tmp_path, ".nii.gz") == before
    (tmp_path / "b.nii.gz").write_bytes(b"3")
    assert provenance.folder_sha256(tmp_path, ".nii.gz") != before
    (tmp_path / "b.nii.gz").rename(tmp_path / "c.nii.gz")
    assert provenance.folder_sha256(tmp_path, ".nii.gz") not in (before, None)
    assert provenance.folder_sha256(tmp_path / "missing", ".nii.gz") is None
