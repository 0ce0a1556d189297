"""Tests for nnunet_ext.ssl.unlabeled_preprocessing on a tiny planned dataset (CPU, ~10 s)."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import helpers_nnunet as h  # tests/ is on sys.path through tests/conftest.py
import numpy as np
import pytest

from nnunet_ext.ssl.unlabeled_preprocessing import (
    MANIFEST_FILE,
    UnlabeledDataError,
    load_unlabeled_manifest,
    preprocess_unlabeled,
    preprocessing_signature,
    unlabeled_folder,
)

DATASET_ID = 990
DATASET = "Dataset990_Tiny"
UNLABELED = ["unl_000", "unl_001", "unl_002", "unl_copy"]
HINT = "nnunet-ext preprocess-unlabeled -d 990 -c 3d_fullres -p nnUNetPlans"


@pytest.fixture(scope="module")
def done(pristine_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One preprocessing run (3d_fullres + 2d) on a module-wide copy, with hashes taken before and after."""
    root = h.clone_root(pristine_root, tmp_path_factory.mktemp("done") / "root")
    pre = root / "nnUNet_preprocessed" / DATASET
    labelled_before = sorted(os.listdir(pre / "nnUNetPlans_3d_fullres"))
    raw_before = h.hash_tree(root / "nnUNet_raw")
    pre_before = h.hash_tree(pre)
    with pytest.MonkeyPatch.context() as mp:
        h.set_nnunet_paths(mp, root, n_proc_da=0)
        outputs = preprocess_unlabeled(DATASET_ID, ("3d_fullres", "2d"))
    return {"root": root, "pre": pre, "outputs": outputs, "labelled_before": labelled_before,
            "raw_before": raw_before, "pre_before": pre_before}


def _plans(pre: Path):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(str(pre / "nnUNetPlans.json")), load_json(str(pre / "dataset.json"))


def _load(folder: Path, case: str) -> np.ndarray:
    import blosc2

    return blosc2.open(urlpath=str(folder / f"{case}.b2nd"), mode="r")[:]


def test_writes_one_b2nd_and_pkl_per_case_and_no_seg(done: dict) -> None:
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    pre = done["pre"]
    assert done["outputs"] == [str(pre / "nnUNetPlans_3d_fullres__unlabeled"), str(pre / "nnUNetPlans_2d__unlabeled")]
    for out in map(Path, done["outputs"]):
        expected = {f"{c}{ext}" for c in UNLABELED for ext in (".b2nd", ".pkl")} | {MANIFEST_FILE}
        assert set(os.listdir(out)) == expected
        assert not any("_seg" in f for f in os.listdir(out))
        for case in UNLABELED:
            assert load_pickle(str(out / f"{case}.pkl"))["class_locations"] == {}
    manifest = json.loads((pre / "nnUNetPlans_2d__unlabeled" / MANIFEST_FILE).read_text())
    assert manifest["cases"] == UNLABELED
    assert (manifest["plans_identifier"], manifest["plans_name"]) == ("nnUNetPlans", "nnUNetPlans")
    assert (manifest["configuration"], manifest["data_identifier"]) == ("2d", "nnUNetPlans_2d")
    assert manifest["nnunetv2_version"] and manifest["created"]


def test_labelled_and_raw_data_untouched(done: dict) -> None:
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    pre = done["pre"]
    assert h.hash_tree(done["root"] / "nnUNet_raw") == done["raw_before"]
    assert sorted(os.listdir(pre / "nnUNetPlans_3d_fullres")) == done["labelled_before"]
    assert sorted(nnUNetDatasetBlosc2.get_identifiers(str(pre / "nnUNetPlans_3d_fullres"))) == \
        [f"tr_{i:03d}" for i in range(6)]
    # every pre-existing file (plans, fingerprint, labelled data) is byte-identical; only the new folders appeared
    after = h.hash_tree(pre)
    assert {k: after[k] for k in done["pre_before"]} == done["pre_before"]
    assert {k.split(os.sep)[0] for k in set(after) - set(done["pre_before"])} == \
        {"nnUNetPlans_3d_fullres__unlabeled", "nnUNetPlans_2d__unlabeled"}


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_data_equals_run_case(done: dict, configuration: str) -> None:
    pre, raw = done["pre"], done["root"] / "nnUNet_raw" / DATASET / "imagesUnlabeled"
    plans_manager, dataset_json = _plans(pre)
    configuration_manager = plans_manager.get_configuration(configuration)
    out = Path(unlabeled_folder(str(pre), configuration_manager.data_identifier))
    for case in UNLABELED:
        files = [str(raw / f"{case}_{c:04d}.nii.gz") for c in range(2)]
        expected, _, _ = configuration_manager.preprocessor_class(verbose=False).run_case(
            files, None, plans_manager, configuration_manager, dataset_json)
        stored = _load(out, case)
        assert stored.dtype == np.float32
        np.testing.assert_array_equal(stored, expected)


def test_copied_labelled_image_equals_labelled_preprocessing(done: dict) -> None:
    from batchgenerators.utilities.file_and_folder_operations import load_pickle

    pre = done["pre"]
    unlabeled, labelled = pre / "nnUNetPlans_3d_fullres__unlabeled", pre / "nnUNetPlans_3d_fullres"
    np.testing.assert_array_equal(_load(unlabeled, "unl_copy"), _load(labelled, "tr_000"))
    props_u, props_l = load_pickle(str(unlabeled / "unl_copy.pkl")), load_pickle(str(labelled / "tr_000.pkl"))
    for key in ("spacing", "shape_before_cropping", "bbox_used_for_cropping",
                "shape_after_cropping_and_before_resampling"):
        assert np.array_equal(np.asarray(props_u[key]), np.asarray(props_l[key])), key
    # the zero border of tr_000 was cropped, so this exercised crop_to_nonzero
    assert tuple(props_u["shape_after_cropping_and_before_resampling"]) != tuple(props_u["shape_before_cropping"])


def _rm(rel: str) -> Callable[[Path], None]:
    return lambda raw: os.remove(raw / rel)


def _copy(src: str, dst: str) -> Callable[[Path], None]:
    return lambda raw: shutil.copy(raw / src, raw / dst)


def _empty(raw: Path) -> None:
    for f in os.listdir(raw / "imagesUnlabeled"):
        os.remove(raw / "imagesUnlabeled" / f)


def _collide(raw: Path) -> None:
    for c in range(2):
        shutil.copy(raw / "imagesTr" / f"tr_001_{c:04d}.nii.gz", raw / "imagesUnlabeled" / f"tr_001_{c:04d}.nii.gz")


def _collide_test(raw: Path) -> None:
    (raw / "imagesTs").mkdir()
    for case in ("unl_001", "unl_002"):
        for c in range(2):
            shutil.copy(raw / "imagesUnlabeled" / f"{case}_{c:04d}.nii.gz", raw / "imagesTs" / f"{case}_{c:04d}.nii.gz")


def _truncate(rel: str) -> Callable[[Path], None]:
    def truncate(raw: Path) -> None:
        (raw / rel).write_bytes((raw / rel).read_bytes()[:2500])  # SimpleITK would read zeros after the header
    return truncate


def _image(rel: str, shape: tuple[int, ...], spacing: float = 1.0) -> Callable[[Path], None]:
    def write(raw: Path) -> None:
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ones(shape, np.float32), isVector=False)  # 4 axes: a 4D image
        image.SetSpacing([spacing] * len(shape))
        sitk.WriteImage(image, str(raw / rel))
    return write


BAD_RAW = [
    # (id, mutation of the raw dataset folder, substrings the message must contain)
    ("missing_folder", lambda raw: shutil.rmtree(raw / "imagesUnlabeled"), ["imagesUnlabeled", "does not exist"]),
    ("empty_folder", _empty, ["imagesUnlabeled", "is empty"]),
    ("missing_channel", _rm("imagesUnlabeled/unl_001_0001.nii.gz"), ["case 'unl_001'", "_0000", "2 channel(s)"]),
    ("extra_channel", _copy("imagesUnlabeled/unl_001_0001.nii.gz", "imagesUnlabeled/unl_001_0002.nii.gz"),
     ["case 'unl_001'", "_0002", "2 channel(s)"]),
    ("wrong_ending", _copy("imagesUnlabeled/unl_000_0000.nii.gz", "imagesUnlabeled/unl_009_0000.nii"),
     ["unl_009_0000.nii:", "file_ending '.nii.gz'"]),
    ("no_channel_suffix", _copy("imagesUnlabeled/unl_000_0000.nii.gz", "imagesUnlabeled/unl_009.nii.gz"),
     ["unl_009.nii.gz:", "<case>_<XXXX>.nii.gz"]),
    ("three_digit_suffix", _copy("imagesUnlabeled/unl_000_0000.nii.gz", "imagesUnlabeled/unl_009_000.nii.gz"),
     ["unl_009_000.nii.gz:", "4-digit"]),
    ("sub_folder", lambda raw: os.mkdir(raw / "imagesUnlabeled" / "more"), ["more:", "not a file"]),
    ("collision_with_imagesTr", _collide, ["case 'tr_001'", "imagesTr"]),
    ("collision_with_imagesTs", _collide_test, ["['unl_001', 'unl_002']", "imagesTs", "test images"]),
    ("truncated_gz", _truncate("imagesUnlabeled/unl_001_0000.nii.gz"),
     ["case 'unl_001'", "unl_001_0000.nii.gz: the gzip stream ends early"]),
    ("4d_file", _image("imagesUnlabeled/unl_001_0001.nii.gz", (2, 20, 24, 28)),
     ["case 'unl_001'", "unl_001_0001.nii.gz is a 4D image"]),
    ("channel_sizes_differ", _image("imagesUnlabeled/unl_002_0001.nii.gz", (20, 24, 27)),
     ["case 'unl_002'", "differ in size", "'unl_002_0000.nii.gz': (28, 24, 20)", "(27, 24, 20)"]),
    ("channel_spacings_differ", _image("imagesUnlabeled/unl_002_0001.nii.gz", (20, 24, 28), spacing=2.0),
     ["case 'unl_002'", "differ in spacing"]),
]


@pytest.mark.parametrize("mutate, expected", [pytest.param(m, e, id=i) for i, m, e in BAD_RAW])
def test_bad_raw_input_is_rejected_before_any_work(root: Path, mutate: Callable[[Path], None],
                                                   expected: list[str]) -> None:
    mutate(root / "nnUNet_raw" / DATASET)
    with pytest.raises(UnlabeledDataError) as info:
        preprocess_unlabeled(DATASET_ID, ("3d_fullres",))
    for text in expected:
        assert text in str(info.value)
    assert not any(p.name.endswith("__unlabeled") for p in (root / "nnUNet_preprocessed" / DATASET).iterdir())


@pytest.mark.parametrize("kwargs, expected", [
    pytest.param({"configurations": ("3d_fullres", "3d_lowres")}, ["'3d_lowres'", "available"], id="unknown_config"),
    pytest.param({"plans_identifier": "nnUNetResEncUNetMPlans"}, ["nnUNetResEncUNetMPlans.json", "Plan the dataset"],
                 id="missing_plans"),
    pytest.param({"num_processes": 0}, ["num_processes"], id="zero_processes"),
    pytest.param({"dataset": 991}, ["991"], id="unknown_dataset"),
])
def test_bad_request_is_rejected_before_any_work(root: Path, kwargs: dict, expected: list[str]) -> None:
    with pytest.raises(UnlabeledDataError) as info:
        preprocess_unlabeled(**{"dataset": DATASET, **kwargs})
    for text in expected:
        assert text in str(info.value)
    assert not any(p.name.endswith("__unlabeled") for p in (root / "nnUNet_preprocessed" / DATASET).iterdir())


def test_idempotent_skip_and_overwrite(root: Path) -> None:
    (out,) = map(Path, preprocess_unlabeled(DATASET_ID))
    old = 1_000_000_000  # mark every case file as old: a skipped case keeps this mtime
    for f in out.glob("unl_*"):
        os.utime(f, ns=(old, old))
    os.remove(out / "unl_001.pkl")  # an interrupted case (data written, properties not) is redone
    preprocess_unlabeled(DATASET_ID)
    redone = {f.name for f in out.glob("unl_*") if f.stat().st_mtime_ns != old}
    assert redone == {"unl_001.b2nd", "unl_001.pkl"}
    preprocess_unlabeled(DATASET_ID, overwrite=True)
    assert all(f.stat().st_mtime_ns != old for f in out.glob("unl_*"))


def test_parallel_equals_serial(root: Path) -> None:
    (out,) = map(Path, preprocess_unlabeled(DATASET_ID))
    serial = {c: _load(out, c) for c in UNLABELED}
    preprocess_unlabeled(DATASET_ID, num_processes=2, overwrite=True)
    for case in UNLABELED:
        np.testing.assert_array_equal(_load(out, case), serial[case])


def test_cases_whose_images_were_removed_are_dropped(root: Path) -> None:
    (out,) = map(Path, preprocess_unlabeled(DATASET_ID))
    for c in range(2):
        os.remove(root / "nnUNet_raw" / DATASET / "imagesUnlabeled" / f"unl_002_{c:04d}.nii.gz")
    with pytest.warns(UserWarning, match=r"dropping case\(s\) \['unl_002'\]"):
        preprocess_unlabeled(DATASET_ID)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert "unl_002" not in manifest["cases"] and "unl_002" not in manifest["sources"]
    assert not list(out.glob("unl_002*"))


def test_changed_source_is_redone_and_touched_source_is_not(root: Path) -> None:
    (out,) = map(Path, preprocess_unlabeled(DATASET_ID))
    old = 1_000_000_000
    for f in out.glob("unl_*"):
        os.utime(f, ns=(old, old))
    raw = root / "nnUNet_raw" / DATASET / "imagesUnlabeled"
    shutil.copy(raw / "unl_002_0000.nii.gz", raw / "unl_000_0000.nii.gz")  # other content
    os.utime(raw / "unl_001_0001.nii.gz", ns=(2_000_000_000, 2_000_000_000))  # same content, new time
    preprocess_unlabeled(DATASET_ID)
    assert {f.name for f in out.glob("unl_*") if f.stat().st_mtime_ns != old} == {"unl_000.b2nd", "unl_000.pkl"}
    np.testing.assert_array_equal(_load(out, "unl_000")[0], _load(out, "unl_002")[0])
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["complete"] is True and manifest["cases"] == UNLABELED
    assert manifest["sources"]["unl_001"][1]["mtime_ns"] == 2_000_000_000


def test_failed_run_then_replan_never_mixes_plans(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nnunet_ext.ssl.unlabeled_preprocessing as module

    pre = root / "nnUNet_preprocessed" / DATASET
    out = pre / "nnUNetPlans_3d_fullres__unlabeled"
    real, finished = module._preprocess_case, []

    def fail_on_the_third_case(case, *args):
        if len(finished) == 2:
            raise RuntimeError("boom")
        finished.append(real(case, *args))
        return finished[-1]

    monkeypatch.setattr(module, "_preprocess_case", fail_on_the_third_case)
    with pytest.raises(RuntimeError, match="boom"):
        preprocess_unlabeled(DATASET_ID)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["complete"] is False and manifest["cases"] == sorted(finished)
    with pytest.raises(RuntimeError, match=f"incomplete: its preprocessing was interrupted.*{HINT}"):
        load_unlabeled_manifest(str(out), "nnUNetPlans", "3d_fullres", "nnUNetPlans_3d_fullres")

    monkeypatch.setattr(module, "_preprocess_case", real)
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = [2.0, 2.0, 2.0]  # re-planned with another spacing
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    with pytest.raises(UnlabeledDataError, match=f"`{HINT} --overwrite`"):
        preprocess_unlabeled(DATASET_ID)
    assert json.loads((out / MANIFEST_FILE).read_text()) == manifest  # refused before any change

    preprocess_unlabeled(DATASET_ID, overwrite=True)
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["complete"] is True and manifest["cases"] == UNLABELED
    assert manifest["preprocessing"]["spacing"] == [2.0, 2.0, 2.0]
    for case in UNLABELED:  # every case, also the ones finished before the re-plan, has the new spacing
        properties = load_pickle(str(out / f"{case}.pkl"))
        expected = compute_new_shape(properties["shape_after_cropping_and_before_resampling"],
                                     properties["spacing"], [2.0, 2.0, 2.0])
        assert _load(out, case).shape[1:] == tuple(expected)


def test_replanned_dataset_requires_overwrite(root: Path) -> None:
    pre = root / "nnUNet_preprocessed" / DATASET
    (out,) = preprocess_unlabeled(DATASET_ID)
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["foreground_intensity_properties_per_channel"]["0"]["mean"] += 1.0  # as if re-planned
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    plans_manager, _ = _plans(pre)
    signature = preprocessing_signature(plans_manager, plans_manager.get_configuration("3d_fullres"))
    with pytest.raises(RuntimeError, match="--overwrite"):
        load_unlabeled_manifest(out, "nnUNetPlans", "3d_fullres", "nnUNetPlans_3d_fullres",
                                expected_preprocessing=signature)
    with pytest.raises(UnlabeledDataError, match="overwrite"):
        preprocess_unlabeled(DATASET_ID)
    preprocess_unlabeled(DATASET_ID, overwrite=True)
    assert load_unlabeled_manifest(out, "nnUNetPlans", "3d_fullres", "nnUNetPlans_3d_fullres",
                                   expected_preprocessing=signature)["preprocessing"] == signature


def _other_data_identifier(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["data_identifier"] = "nnUNetResEncUNetMPlans_3d_fullres"
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def _only_manifest(folder: Path) -> None:
    for f in folder.iterdir():
        if f.name != MANIFEST_FILE:
            os.remove(f)


@pytest.mark.parametrize("mutate, expected", [
    pytest.param(shutil.rmtree, "does not exist", id="missing_folder"),
    pytest.param(_only_manifest, "holds no preprocessed case", id="empty_folder"),
    pytest.param(lambda f: os.remove(f / MANIFEST_FILE), "manifest.json is missing", id="missing_manifest"),
    pytest.param(lambda f: os.remove(f / "unl_001.b2nd"), "unl_001", id="missing_case_file"),
    pytest.param(_other_data_identifier, "another data identifier", id="other_data_identifier"),
])
def test_load_unlabeled_manifest_errors_name_the_command(root: Path, mutate: Callable[[Path], None],
                                                         expected: str) -> None:
    (out,) = map(Path, preprocess_unlabeled(DATASET_ID))
    mutate(out)
    with pytest.raises(RuntimeError) as info:
        load_unlabeled_manifest(str(out), "nnUNetPlans", "3d_fullres", "nnUNetPlans_3d_fullres")
    assert expected in str(info.value) and HINT in str(info.value)


def test_manifest_configuration_and_plans_checks(root: Path) -> None:
    pre = root / "nnUNet_preprocessed" / DATASET
    (out,) = preprocess_unlabeled(DATASET_ID)
    # a derived plans file keeps the data identifier and so the data: accepted
    assert load_unlabeled_manifest(out, "nnUNetPlansDerived", "3d_fullres", "nnUNetPlans_3d_fullres")["cases"]
    # another configuration name with the same data identifier: only with a matching preprocessing signature
    with pytest.raises(RuntimeError, match="another configuration"):
        load_unlabeled_manifest(out, "nnUNetPlans", "3d_fullres_bs4", "nnUNetPlans_3d_fullres")
    plans_manager, _ = _plans(pre)
    signature = preprocessing_signature(plans_manager, plans_manager.get_configuration("3d_fullres"))
    load_unlabeled_manifest(out, "nnUNetPlans", "3d_fullres_bs4", "nnUNetPlans_3d_fullres",
                            expected_preprocessing=signature)


def test_cli_reports_bad_unlabeled_images_in_one_line_with_exit_2(root: Path, capsys: pytest.CaptureFixture) -> None:
    from nnunet_ext.cli import main

    raw = root / "nnUNet_raw" / DATASET
    _collide_test(raw)
    _truncate("imagesUnlabeled/unl_000_0001.nii.gz")(raw)
    assert main(["preprocess-unlabeled", "-d", str(DATASET_ID)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnunet-ext preprocess-unlabeled: error: Invalid unlabeled images in ")
    assert err.count("\n") == 1 and "imagesTs" in err  # the collision is found before the files are read
    assert not any(p.name.endswith("__unlabeled") for p in (root / "nnUNet_preprocessed" / DATASET).iterdir())
