"""``convert folders`` on a Hippocampus sample (real data) and ``convert per-case`` on a BraTS sample, plus bad
inputs built from small generated volumes."""
from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.conversion.common import ConversionError
from nnunet_ext.conversion.folders import convert_folders, convert_per_case, make_semi_supervised_pair

pytestmark = pytest.mark.filterwarnings("ignore::nnunet_ext.conversion.common.ConversionWarning")

HIPPO_CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006", "hippocampus_007",
               "hippocampus_008"]
HIPPO_LABELS = ["background=0", "anterior=1", "posterior=2"]


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def hippo_source(tmp_path_factory):
    """6 labelled cases, hippocampus_118 (image without label) and hippocampus_010 (label without image)."""
    data = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "Hippocampus"
    if not data.is_dir():
        pytest.skip(f"real data folder {data} is absent (see ../shared/data/README.md)")
    source = tmp_path_factory.mktemp("hippo_src")
    (source / "images").mkdir()
    (source / "labels").mkdir()
    for case in HIPPO_CASES:
        shutil.copy(data / "images" / f"{case}.nii.gz", source / "images")
        shutil.copy(data / "labels" / f"{case}.nii.gz", source / "labels")
    shutil.copy(data / "images" / "hippocampus_118.nii.gz", source / "images")
    shutil.copy(data / "labels" / "hippocampus_010.nii.gz", source / "labels")
    return source


@pytest.fixture(scope="module")
def hippo_cli(hippo_source, tmp_path_factory):
    """The CLI in a fresh process: --labeled 3 --test 1 --seed 0."""
    raw = tmp_path_factory.mktemp("raw_cli")
    cmd = [str(Path(sys.executable).parent / "nnunet-ext"), "convert", "folders", str(hippo_source), "-d", "4",
           "-n", "Hippo", "-o", str(raw), "--labels", *HIPPO_LABELS, "--labeled", "3", "--test", "1", "--seed", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return raw / "Dataset004_Hippo", cmd, result


def test_folders_cli_layout_and_content(hippo_source, hippo_cli):
    folder, _, result = hippo_cli
    assert "Dataset written to" in result.stdout and "label file(s) without an image" in result.stderr
    split = json.loads((folder / "split.json").read_text())
    assert len(split["labeled"]) == 3 and len(split["unlabeled"]) == 2 and len(split["test"]) == 1
    assert split["unlabeled_only"] == ["hippocampus_118"] and split["labels_without_image"] == ["hippocampus_010"]
    assert sorted(split["labeled"] + split["unlabeled"] + split["test"]) == HIPPO_CASES
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "anterior": 1, "posterior": 2}
    assert dataset_json["numTraining"] == 3 and dataset_json["channel_names"] == {"0": "image"}
    assert sorted(p.name for p in (folder / "imagesUnlabeled").iterdir()) == sorted(
        f"{c}_0000.nii.gz" for c in split["unlabeled"] + ["hippocampus_118"])
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == [f"{split['test'][0]}.nii.gz"]
    assert not (folder / "labelsTr" / "hippocampus_010.nii.gz").exists()
    for case in split["labeled"]:
        # images are copied byte for byte; labels keep values and geometry
        assert filecmp.cmp(hippo_source / "images" / f"{case}.nii.gz", folder / "imagesTr" / f"{case}_0000.nii.gz",
                           shallow=False)
        source_label = sitk.ReadImage(str(hippo_source / "labels" / f"{case}.nii.gz"))
        written = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(source_label))
        assert written.GetDirection() == source_label.GetDirection()
        assert written.GetOrigin() == source_label.GetOrigin()


def test_folders_cli_refuses_overwrite(hippo_cli):
    folder, cmd, _ = hippo_cli
    before = (folder / "split.json").read_text()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "exists; pass --overwrite" in result.stderr
    assert (folder / "split.json").read_text() == before


def test_semi_supervised_pair_same_seed_same_split(hippo_source, hippo_cli, tmp_path):
    """The pair reproduces the CLI split (same seed) and the upper bound labels every training case."""
    semi, full = make_semi_supervised_pair(hippo_source, tmp_path, dataset_id=41, upper_bound_id=42,
                                           name="HippoSSL", labeled="3", test="1", seed=0,
                                           labels={"background": 0, "anterior": 1, "posterior": 2})
    cli_split = json.loads((hippo_cli[0] / "split.json").read_text())
    semi_split = json.loads((semi / "split.json").read_text())
    full_split = json.loads((full / "split.json").read_text())
    for part in ("labeled", "unlabeled", "test"):
        assert semi_split[part] == cli_split[part]
    assert full_split["test"] == semi_split["test"] and full_split["unlabeled"] == []
    assert full_split["labeled"] == sorted(semi_split["labeled"] + semi_split["unlabeled"])
    assert full.name == "Dataset042_HippoSSLFull"
    assert json.loads((full / "dataset.json").read_text())["numTraining"] == 5
    assert sorted(p.name for p in (full / "imagesUnlabeled").iterdir()) == ["hippocampus_118_0000.nii.gz"]
    assert sorted(p.name for p in (full / "imagesTs").iterdir()) == sorted(
        p.name for p in (semi / "imagesTs").iterdir())


def test_folders_bad_inputs(hippo_source, tmp_path):
    with pytest.raises(ConversionError, match=r"missing label .*hippocampus_118\.nii\.gz"):
        convert_folders(hippo_source, 5, "X", tmp_path, missing_label="error")
    with pytest.raises(ConversionError, match=r"without an image.*hippocampus_010"):
        convert_folders(hippo_source, 5, "X", tmp_path, orphan_labels="error")
    with pytest.raises(ConversionError, match=r"hippocampus_\d+\.nii\.gz: label values \[2\] are not in dataset"):
        convert_folders(hippo_source, 5, "X", tmp_path, labels={"background": 0, "anterior": 1})
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_folders_image_label_mismatch(tmp_path):
    source = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(2):
        _write(rng.random((6, 8, 10), dtype=np.float32), source / "images" / f"c{i}.nii.gz")
    _write(np.zeros((6, 8, 10), np.uint8), source / "labels" / "c0.nii.gz")
    _write(np.zeros((6, 8, 9), np.uint8), source / "labels" / "c1.nii.gz")
    with pytest.raises(ConversionError, match=r"case c1: image and label differ: .*size \(9, 8, 6\).*\(10, 8, 6\)"):
        convert_folders(source, 6, "Bad", tmp_path / "raw")
    _write(np.zeros((6, 8, 10), np.uint8), source / "labels" / "c1.nii.gz", spacing=(1.0, 1.0, 2.0))
    with pytest.raises(ConversionError, match=r"case c1: image and label differ: .*spacing"):
        convert_folders(source, 6, "Bad", tmp_path / "raw")
    _write(np.full((6, 8, 10), 0.5, np.float32), source / "labels" / "c1.nii.gz")
    with pytest.raises(ConversionError, match="c1.nii.gz: label map has non-integer values"):
        convert_folders(source, 6, "Bad", tmp_path / "raw")


@pytest.fixture(scope="module")
def brats_source(tmp_path_factory):
    data = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "BraTS2018_FLAIR_T1"
    if not data.is_dir():
        pytest.skip(f"real data folder {data} is absent (see ../shared/data/README.md)")
    source = tmp_path_factory.mktemp("brats_src")
    for i in range(3):  # symlinks: 240x240x155 volumes, the converter only reads them
        (source / f"case_{i}").mkdir()
        for name in ("FLAIR.nii.gz", "T1.nii.gz", "GT_W.nii.gz", "subject_id.txt"):
            (source / f"case_{i}" / name).symlink_to(data / f"case_{i}" / name)
    return source


def test_per_case_brats(brats_source, tmp_path):
    folder = convert_per_case(brats_source, 5, "BraTS", ["FLAIR", "T1"], "GT_W", tmp_path, test="1",
                              labels={"background": 0, "whole_tumour": 1})
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "FLAIR", "1": "T1"}
    assert dataset_json["labels"] == {"background": 0, "whole_tumour": 1} and dataset_json["numTraining"] == 2
    split = json.loads((folder / "split.json").read_text())
    case = split["labeled"][0]
    for channel, modality in enumerate(("FLAIR", "T1")):
        assert filecmp.cmp(brats_source / case / f"{modality}.nii.gz",
                           folder / "imagesTr" / f"{case}_{channel:04d}.nii.gz", shallow=False)
    label = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
    assert label.GetPixelID() == sitk.sitkUInt8  # the source label is float32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), _read(brats_source / case / "GT_W.nii.gz"))
    test_case = split["test"][0]
    assert (folder / "imagesTs" / f"{test_case}_0001.nii.gz").is_file()
    assert (folder / "labelsTs" / f"{test_case}.nii.gz").is_file()


def test_per_case_bad_inputs(brats_source, tmp_path):
    with pytest.raises(ConversionError, match=r"unknown modality 'T2'.*\['FLAIR', 'GT_W', 'T1'\]"):
        convert_per_case(brats_source, 5, "B", ["FLAIR", "T2"], "GT_W", tmp_path)
    with pytest.raises(ConversionError, match="also listed as a modality"):
        convert_per_case(brats_source, 5, "B", ["FLAIR", "GT_W"], "GT_W", tmp_path)
    with pytest.raises(ConversionError, match=r"case case_0: missing label: no file GT_X"):
        convert_per_case(brats_source, 5, "B", ["FLAIR"], "GT_X", tmp_path, missing_label="error")

    source = tmp_path / "gen"
    _write(np.zeros((6, 8, 10), np.float32), source / "a" / "M1.nii.gz")
    _write(np.zeros((6, 8, 11), np.float32), source / "a" / "M2.nii.gz")
    _write(np.zeros((6, 8, 10), np.uint8), source / "a" / "seg.nii.gz")
    with pytest.raises(ConversionError, match=r"case a: modalities differ: .*M2.nii.gz has size \(11, 8, 6\)"):
        convert_per_case(source, 5, "B", ["M1", "M2"], "seg", tmp_path / "raw")
    _write(np.zeros((6, 8, 10), np.float32), source / "b" / "M1.nii.gz")
    with pytest.raises(ConversionError, match=r"case b: no file for modality 'M2'"):
        convert_per_case(source, 5, "B", ["M1", "M2"], "seg", tmp_path / "raw")
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # the header and some voxels survive: SimpleITK reads zeros


def _break_checksum(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-8] + bytes(8))  # complete deflate stream, wrong CRC-32/length trailer


@pytest.mark.parametrize("damage", [_truncate, _break_checksum])
@pytest.mark.parametrize("relative", ["images/c3.nii.gz", "labels/c3.nii.gz"])
def test_incomplete_gzip_files_are_rejected(tmp_path, relative, damage):
    source = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(5):  # random voxels: the compressed image is far larger than 2,500 bytes
        _write(rng.random((12, 16, 20), dtype=np.float32), source / "images" / f"c{i}.nii.gz")
        _write((rng.random((12, 16, 20)) > 0.5).astype(np.uint8), source / "labels" / f"c{i}.nii.gz")
    damage(source / relative)
    with pytest.raises(ConversionError, match=rf"{source / relative}: .*(ends early|checksum|CRC)"):
        convert_folders(source, 6, "Gz", tmp_path / "raw", test="1")
    assert list((tmp_path / "raw").iterdir()) == []  # the staging folder is gone
