"""Inputs of ``nnunet-ext benchmark`` are checked before any run starts, with errors naming what is wrong."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers_nnunet import make_tiny_dataset, set_nnunet_paths

from nnunet_ext.benchmark.budget import Budget
from nnunet_ext.benchmark.report import format_report
from nnunet_ext.benchmark.runner import (
    BenchmarkError,
    BenchmarkSettings,
    check_missing_channels,
    check_same_test_cases,
    ensure_plans,
    plans_differences,
    resolve_dataset,
    training_environment,
)


def _with_test_split(raw: Path, dataset_id: int, name: str, n_test: int = 2) -> Path:
    folder = make_tiny_dataset(raw, dataset_id, name=name, n_labelled=3, n_unlabeled=0, shape=(10, 12, 12))
    (folder / "imagesTs").mkdir()
    (folder / "labelsTs").mkdir()
    for i in range(n_test):
        for c in range(2):
            shutil.copy(folder / "imagesTr" / f"tr_{i:03d}_{c:04d}.nii.gz",
                        folder / "imagesTs" / f"ts_{i:03d}_{c:04d}.nii.gz")
        shutil.copy(folder / "labelsTr" / f"tr_{i:03d}.nii.gz", folder / "labelsTs" / f"ts_{i:03d}.nii.gz")
    return folder


@pytest.fixture
def raw(tmp_path, monkeypatch):
    return set_nnunet_paths(monkeypatch, tmp_path)["nnUNet_raw"]


def test_resolve_dataset_reads_the_test_split(raw):
    _with_test_split(raw, 981, "A")
    info = resolve_dataset("981")
    assert info.name == "Dataset981_A" and info.test_cases == ("ts_000", "ts_001")
    assert info.image_cases == ("ts_000", "ts_001")


@pytest.mark.parametrize("damage, message", [
    (lambda f: shutil.rmtree(f / "labelsTs"), "labelsTs does not exist"),
    (lambda f: shutil.rmtree(f / "imagesTs"), "imagesTs does not exist"),
    (lambda f: (f / "imagesTs" / "ts_001_0001.nii.gz").unlink(), "ts_001_0001.nii.gz"),
    (lambda f: [p.unlink() for p in (f / "labelsTs").iterdir()], "holds no segmentation"),
])
def test_resolve_dataset_errors_name_the_problem(raw, damage, message):
    damage(_with_test_split(raw, 982, "B"))
    with pytest.raises(BenchmarkError, match=message):
        resolve_dataset("982")


def test_resolve_unknown_dataset(raw):
    with pytest.raises(BenchmarkError, match="983"):
        resolve_dataset("983")


def test_upper_bound_needs_identical_test_cases(raw):
    main = resolve_dataset(_with_test_split(raw, 984, "Main").name)
    same = resolve_dataset(_with_test_split(raw, 985, "Same").name)
    check_same_test_cases(main, same)  # same files: accepted
    fewer = resolve_dataset(_with_test_split(raw, 986, "Fewer", n_test=1).name)
    with pytest.raises(BenchmarkError, match="ts_001"):
        check_same_test_cases(main, fewer)
    label = raw / "Dataset985_Same" / "labelsTs" / "ts_000.nii.gz"
    image = sitk.ReadImage(str(label))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = 2 if array[0, 0, 0] != 2 else 1
    changed = sitk.GetImageFromArray(array.astype(np.uint8))
    changed.CopyInformation(image)
    sitk.WriteImage(changed, str(label))
    with pytest.raises(BenchmarkError, match="test case ts_000: the reference segmentation differs"):
        check_same_test_cases(main, resolve_dataset("985"))


def _settings(tmp_path, **kwargs) -> BenchmarkSettings:
    return BenchmarkSettings(dataset="987", output=tmp_path / "out", budget=Budget(1, 1), **kwargs)


def test_missing_plans_name_the_command(raw, tmp_path):
    info = resolve_dataset(_with_test_split(raw, 987, "Plans").name)
    with pytest.raises(BenchmarkError, match="nnunet-ext plan -d Dataset987_Plans -pl CPUPlanner -c 3d_fullres"):
        ensure_plans(info, _settings(tmp_path), {}, print)
    info.preprocessed.mkdir(parents=True)
    plans = {"configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres"}}}
    (info.preprocessed / "nnUNetCPUPlans.json").write_text(json.dumps(plans))
    with pytest.raises(BenchmarkError, match="configuration '2d' is not in"):
        ensure_plans(info, _settings(tmp_path, configuration="2d"), {}, print)
    with pytest.raises(BenchmarkError, match="nnUNetPlans_3d_fullres is missing"):
        ensure_plans(info, _settings(tmp_path), {}, print)
    (info.preprocessed / "nnUNetPlans_3d_fullres").mkdir()
    (info.preprocessed / "nnUNetPlans_3d_fullres" / "case.b2nd").write_bytes(b"x")
    assert ensure_plans(info, _settings(tmp_path), {}, print) == info.preprocessed / "nnUNetCPUPlans.json"


@pytest.mark.parametrize("kwargs, message", [
    ({"fold": "x"}, "fold"), ({"fold": "-1"}, "fold"), ({"device": "tpu"}, "device"), ({"seeds": ()}, "seeds"),
    ({"seeds": (1, 1)}, "seeds"), ({"da_workers": -1}, "da_workers"), ({"predict_processes": 0}, "predict"),
    ({"extra_trainer_dirs": ("/no/such/folder",)}, "does not exist"),
])
def test_settings_validation(tmp_path, kwargs, message):
    with pytest.raises(BenchmarkError, match=message):
        _settings(tmp_path, **kwargs)


@pytest.mark.parametrize("device, da_workers, user_value, expected", [
    ("cpu", None, None, "0"), ("cpu", 3, None, "3"), ("cuda", None, None, None), ("cuda", None, "6", "6"),
])
def test_training_environment_augmentation_workers(tmp_path, monkeypatch, device, da_workers, user_value, expected):
    if user_value is None:
        monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    else:
        monkeypatch.setenv("nnUNet_n_proc_DA", user_value)
    env = training_environment(_settings(tmp_path, device=device, da_workers=da_workers), {})
    assert env.get("nnUNet_n_proc_DA") == expected


def test_plans_differences_and_report_note(tmp_path):
    config = {"patch_size": [40, 56, 40], "spacing": [1, 1, 1], "batch_size": 2}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"configurations": {"3d_fullres": config}}))
    b.write_text(json.dumps({"configurations": {"3d_fullres": {**config, "patch_size": [40, 56, 48]}}}))
    assert plans_differences(a, b, "3d_fullres") == {"patch_size": [[40, 56, 40], [40, 56, 48]]}
    assert plans_differences(a, a, "3d_fullres") == {}
    results = {"settings": {"dataset_name": "D", "configuration": "3d_fullres", "plans": "P", "fold": "all",
                            "device": "cpu", "seeds": [0], "tta": False, "test_labels": "t", "upper_bound_dataset": "2",
                            "upper_bound_dataset_name": "D2",
                            "budget": {"epochs": 1, "iterations": 1, "val_iterations": 1}},
               "labels": {"1": "a"}, "runs": [], "upper_bound_plans_differences": {"patch_size": [1, 2]}}
    report = format_report(results)
    assert "plans differ in patch_size" in report and "The gap bound is undefined" in report


@pytest.mark.parametrize("log, expected", [
    ("Epoch 0\nTraceback (most recent call last):\n  File 'x'\nRuntimeError: boom\nshutting down\n",
     "nnUNetv2_train exited with code 1: RuntimeError: boom"),
    ("Epoch 0\nKilled\n", "nnUNetv2_train exited with code 1: Killed"),
    ("", "nnUNetv2_train exited with code 1"),
])
def test_failed_step_names_the_exception(tmp_path, log, expected):
    from nnunet_ext.benchmark.runner import _fail

    (tmp_path / "train.log").write_text(log)
    record = _fail({}, "training", "nnUNetv2_train exited with code 1", tmp_path / "train.log")
    assert record["status"] == "failed" and record["failed_step"] == "training" and record["error"] == expected
    assert record["log_tail"] == log.rstrip("\n")


def test_planner_command_uses_the_numeric_dataset_id(tmp_path):
    from nnunet_ext.benchmark.runner import _plan_command

    command = _plan_command("Dataset041_HippocampusSSL10", _settings(tmp_path, planner="CPUPlanner"))
    assert command[1:] == ["-m", "nnunet_ext.cli", "plan", "-d", "041", "-pl", "CPUPlanner", "-c", "3d_fullres",
                           "-np", "2"]


def test_a_run_made_with_other_settings_is_not_reused(raw, tmp_path):
    from nnunet_ext.benchmark.runner import Run, check_reusable

    info = resolve_dataset(_with_test_split(raw, 988, "Reuse").name)
    settings = _settings(tmp_path)
    run = Run("baseline", "nnUNetTrainer", "nnUNetTrainer", "nnUNetTrainer_e1i1s0", info, 0)
    check_reusable(run, settings)  # nothing there yet
    run.run_dir(settings).mkdir(parents=True)
    (run.run_dir(settings) / "run.json").write_text(json.dumps(
        {"settings_key": {"device": "cpu", "tta": True, "final_validation": False}}))
    with pytest.raises(BenchmarkError, match="other settings.*--overwrite"):
        check_reusable(run, settings)
    check_reusable(run, _settings(tmp_path, tta=True))


@pytest.mark.parametrize("missing, message", [
    (("T1",), r"not a channel of Dataset986_Missing; its channels are \['CT', 'MRI'\]"),
    (("CT", "MRI"), "would remove every channel"),
])
def test_missing_channels_must_name_a_channel_and_leave_one(raw, missing, message):
    _with_test_split(raw, 986, "Missing")
    info = resolve_dataset("986")
    with pytest.raises(BenchmarkError, match=message):
        check_missing_channels(info, missing)
    check_missing_channels(info, ("MRI",))  # a present name, one channel left: accepted


def test_missing_channels_are_deduplicated_in_order(tmp_path):
    assert _settings(tmp_path, missing_channels=["MRI", "CT", "MRI"]).missing_channels == ("MRI", "CT")


@pytest.mark.parametrize("trainer, handles", [("CIMLTrainer", True), ("CIMLTrainer_noMessages", True),
                                              ("nnUNetTrainer", False), ("CAMLTrainer", False)])
def test_which_trainers_handle_missing_modalities(trainer, handles):
    from nnunet_ext.benchmark.trainer_info import trainer_traits

    assert trainer_traits(trainer).handles_missing_modalities is handles


def test_labels_without_any_evaluation_are_keyed_like_the_evaluation(raw):
    """Regions too: the report's columns need the evaluation's keys even when no run finished."""
    from nnunet_ext.benchmark.runner import _labels

    folder = _with_test_split(raw, 989, "Regions")
    dataset_json = json.loads((folder / "dataset.json").read_text())
    dataset_json.update(labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1, 2])
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    assert _labels(resolve_dataset("989"), []) == {"(1, 2)": "whole", "2": "core"}
