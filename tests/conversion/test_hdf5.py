"""``convert h5`` (UA-MT/CAML Left Atrium layout) and ``convert acdc-h5`` (SSL4MIS) on generated HDF5 files."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.conversion.common import ConversionError
from nnunet_ext.conversion.hdf5 import ACDC_LABELS, LEFT_ATRIUM_LABELS, convert_acdc_h5, convert_h5
from nnunet_ext.conversion.splits import SplitError

h5py = pytest.importorskip("h5py")
pytestmark = pytest.mark.filterwarnings("ignore::nnunet_ext.conversion.common.ConversionWarning")

SHAPE_XYZ = (12, 10, 7)  # all different, so a wrong axis order cannot go unnoticed
LA_TRAIN_ORDER = (3, 0, 4, 1, 2)


def _volume(rng: np.random.Generator, shape, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    image = rng.random(shape, dtype=np.float32)
    label = np.zeros(shape, np.uint8)
    label[2:6, 3:7, 1:4] = 1
    if num_labels > 2:
        label[1:3, 1:3, 4:6] = num_labels - 1
    return image, label


@pytest.fixture(scope="module")
def la_root(tmp_path_factory):
    """``<root>/2018LA_Seg_Training Set/<case>/mri_norm2.h5`` (x, y, z arrays) + ``<root>/train.list|test.list``."""
    root = tmp_path_factory.mktemp("la")
    data = root / "2018LA_Seg_Training Set"
    rng = np.random.default_rng(0)
    volumes = {}
    for i in range(7):
        case = f"LA{i:02d}XYZ"
        (data / case).mkdir(parents=True)
        image, label = _volume(rng, SHAPE_XYZ, 2)
        with h5py.File(data / case / "mri_norm2.h5", "w") as f:
            f.create_dataset("image", data=image)
            f.create_dataset("label", data=label)
        volumes[case] = (image, label)
    cases = sorted(volumes)
    # like UA-MT's train.list, not sorted: "the first N" differs from the first N sorted names
    (root / "train.list").write_text("\n".join(cases[i] for i in LA_TRAIN_ORDER) + "\n")
    # list entries as some forks write them: a path to the file
    (root / "test.list").write_text("\n".join(f"{c}/mri_norm2.h5" for c in cases[5:]) + "\n\n")
    return data, volumes


def test_left_atrium_layout_axis_order_and_lists(la_root, tmp_path):
    data, volumes = la_root
    folder = convert_h5(data, 60, "LA", (0.625, 0.625, 0.625), tmp_path, labeled="2", seed=0,
                        labels=LEFT_ATRIUM_LABELS)
    split = json.loads((folder / "split.json").read_text())
    cases = sorted(volumes)
    assert split["test"] == cases[5:] and len(split["labeled"]) == 2 and len(split["unlabeled"]) == 3
    assert split["axis_order"] == "xyz" and split["spacing_xyz"] == [0.625, 0.625, 0.625]
    case = split["labeled"][0]
    image = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
    assert image.GetSize() == SHAPE_XYZ and image.GetSpacing() == (0.625, 0.625, 0.625)
    # SimpleITK arrays are z, y, x: the x, y, z source array must come back transposed
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volumes[case][0].transpose(2, 1, 0))
    label = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), volumes[case][1].transpose(2, 1, 0))
    assert json.loads((folder / "dataset.json").read_text())["labels"] == LEFT_ATRIUM_LABELS
    assert (folder / "labelsTs" / f"{cases[5]}.nii.gz").is_file()


def test_left_atrium_first_cases_of_train_list_and_split_file(la_root, tmp_path):
    """UA-MT/CAML label the first N of train.list; a split file replaces the lists (and says so)."""
    data, volumes = la_root
    cases = sorted(volumes)
    train_order = [cases[i] for i in LA_TRAIN_ORDER]
    folder = convert_h5(data, 63, "LA", (0.625, 0.625, 0.625), tmp_path / "first", labeled="2",
                        labeled_order="list")
    split = json.loads((folder / "split.json").read_text())
    assert split["labeled"] == sorted(train_order[:2]) and split["unlabeled"] == sorted(train_order[2:])
    assert split["labeled_order"] == "list" and split["test"] == cases[5:]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = convert_h5(data, 63, "LA", (0.625, 0.625, 0.625), tmp_path / "again",
                           split_file=folder / "split.json")
    assert not [w for w in caught if ".list" in str(w.message)]  # the lists are not used: no message about them
    reused = json.loads((again / "split.json").read_text())
    assert (reused["labeled"], reused["test"], reused["list_files"]) == (split["labeled"], split["test"], [])


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    """SSL4MIS ACDC: data/<case>.h5 (z, y, x), data/slices/<case>_slice_k.h5, train/val/test.list."""
    root = tmp_path_factory.mktemp("acdc")
    (root / "data" / "slices").mkdir(parents=True)
    rng = np.random.default_rng(1)
    volumes = {}
    for i in range(1, 8):
        case = f"patient{i:03d}_frame01"
        image, label = _volume(rng, (5, 14, 11), 4)  # z, y, x
        with h5py.File(root / "data" / f"{case}.h5", "w") as f:
            f.create_dataset("image", data=image)
            f.create_dataset("label", data=label)
            f.create_dataset("scribble", data=label)
        with h5py.File(root / "data" / "slices" / f"{case}_slice_0.h5", "w") as f:
            f.create_dataset("image", data=image[0])
            f.create_dataset("label", data=label[0])
        volumes[case] = (image, label)
    cases = sorted(volumes)
    (root / "train.list").write_text("\n".join(cases[:4]))
    (root / "val.list").write_text("\n".join(cases[4:5]))
    (root / "test.list").write_text("\n".join(cases[5:]))
    (root / "train_slices.list").write_text("\n".join(f"{c}_slice_0" for c in cases[:4]))
    return root, volumes


def test_acdc_volumes_zyx_and_val_joins_training(acdc_root, tmp_path):
    root, volumes = acdc_root
    folder = convert_acdc_h5(root, 27, "ACDC", (1.5, 1.5, 10.0), tmp_path)
    cases = sorted(volumes)
    split = json.loads((folder / "split.json").read_text())
    assert split["labeled"] == cases[:5] and split["test"] == cases[5:]
    assert json.loads((folder / "dataset.json").read_text())["labels"] == ACDC_LABELS
    image = sitk.ReadImage(str(folder / "imagesTr" / f"{cases[0]}_0000.nii.gz"))
    assert image.GetSize() == (11, 14, 5) and image.GetSpacing() == (1.5, 1.5, 10.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volumes[cases[0]][0])  # z, y, x kept
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTs" / f"{cases[5]}.nii.gz")))
    np.testing.assert_array_equal(label, volumes[cases[5]][1])
    assert not any("slice" in p.name for p in folder.rglob("*.nii.gz"))


def test_h5_bad_inputs(la_root, acdc_root, tmp_path):
    data, volumes = la_root
    with pytest.raises(ConversionError, match=r"no voxel spacing.*--spacing X Y Z"):
        convert_h5(data, 61, "LA", None, tmp_path)
    with pytest.raises(ConversionError, match="spacing values must be positive"):
        convert_h5(data, 61, "LA", (0.6, 0.0, 0.6), tmp_path)
    with pytest.raises(SplitError, match=r"--test cannot be combined with the source's list files.*--ignore-lists"):
        convert_h5(data, 61, "LA", (1, 1, 1), tmp_path, test="2")
    with pytest.raises(ConversionError, match="axis_order"):
        convert_h5(data, 61, "LA", (1, 1, 1), tmp_path, axis_order="yxz")
    with pytest.raises(ConversionError, match=r"label values \[1\] are not in dataset.json"):
        convert_h5(data, 61, "LA", (1, 1, 1), tmp_path, labels={"background": 0})
    root, _ = acdc_root
    with pytest.raises(ConversionError, match="SSL4MIS ACDC layout with a data/ folder"):
        convert_acdc_h5(root / "data", 61, "A", (1, 1, 1), tmp_path)

    bad = tmp_path / "bad"
    (bad / "c1").mkdir(parents=True)
    (bad / "c2").mkdir()
    (bad / "c3").mkdir()
    with h5py.File(bad / "c1" / "x.h5", "w") as f:
        f.create_dataset("image", data=np.zeros((4, 5, 6), np.float32))
        f.create_dataset("label", data=np.zeros((4, 5, 7), np.uint8))
    with h5py.File(bad / "c2" / "x.h5", "w") as f:  # no label: may only be an unlabeled image
        f.create_dataset("image", data=np.zeros((4, 5, 6), np.float32))
    with h5py.File(bad / "c3" / "x.h5", "w") as f:
        f.create_dataset("volume", data=np.zeros((4, 5, 6), np.float32))
    with pytest.raises(ConversionError, match=r"c3/x.h5: no dataset 'image' \(datasets: \['volume'\]\)"):
        convert_h5(bad, 62, "Bad", (1, 1, 1), tmp_path / "raw")
    (bad / "c3" / "x.h5").unlink()
    with pytest.raises(ConversionError, match=r"case c1: .*'label' has shape \(4, 5, 7\) but 'image' has \(4, 5, 6\)"):
        convert_h5(bad, 62, "Bad", (1, 1, 1), tmp_path / "raw")
    (bad / "test.list").write_text("c2\n")
    with pytest.raises(ConversionError, match=r"missing label: test case c2 \(.*c2/x.h5\) has no label"):
        convert_h5(bad, 62, "Bad", (1, 1, 1), tmp_path / "raw")
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


# SSL4MIS ACDC as downloaded: training frames only as 2D slices, patients in shuffled list order, two frames each
SSL4MIS_TRAIN = ("patient005", "patient002", "patient004", "patient001")
SSL4MIS_VAL, SSL4MIS_TEST = ("patient003",), ("patient006", "patient007")


@pytest.fixture(scope="module")
def ssl4mis_acdc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl4mis_acdc")
    (root / "data" / "slices").mkdir(parents=True)
    rng = np.random.default_rng(2)
    volumes = {}
    for patient in SSL4MIS_TRAIN + SSL4MIS_VAL + SSL4MIS_TEST:
        for frame in ("frame01", "frame02"):
            case = f"{patient}_{frame}"
            image, label = _volume(rng, (5, 14, 11), 4)  # z, y, x
            volumes[case] = (image, label)
            if patient in SSL4MIS_TRAIN:
                for k in range(image.shape[0]):  # acdc_data_processing.py: slice k = image[k]
                    with h5py.File(root / "data" / "slices" / f"{case}_slice_{k}.h5", "w") as f:
                        f.create_dataset("image", data=image[k])
                        f.create_dataset("label", data=label[k])
            else:
                with h5py.File(root / "data" / f"{case}.h5", "w") as f:
                    f.create_dataset("image", data=image)
                    f.create_dataset("label", data=label)
    frames = {name: [f"{p}_{f}" for p in patients for f in ("frame01", "frame02")]
              for name, patients in (("train", SSL4MIS_TRAIN), ("val", SSL4MIS_VAL), ("test", SSL4MIS_TEST))}
    for name, listed in frames.items():
        (root / f"{name}.list").write_text("\n".join(listed) + "\n")
    (root / "train_slices.list").write_text("\n".join(f"{c}_slice_{k}" for c in frames["train"] for k in range(5)))
    return root, volumes


def test_ssl4mis_acdc_slices_rebuilt_and_first_patients_labelled(ssl4mis_acdc_root, tmp_path):
    root, volumes = ssl4mis_acdc_root
    folder = convert_acdc_h5(root, 28, "ACDC", (1.5, 1.5, 10.0), tmp_path, labeled="2", labeled_order="list")
    split = json.loads((folder / "split.json").read_text())
    # SSL4MIS labels the first N patients of train.list, both frames
    assert split["labeled_patients"] == sorted(SSL4MIS_TRAIN[:2])
    assert split["labeled"] == sorted(f"{p}_{f}" for p in SSL4MIS_TRAIN[:2] for f in ("frame01", "frame02"))
    assert split["unlabeled_patients"] == sorted(SSL4MIS_TRAIN[2:] + SSL4MIS_VAL)
    assert split["test_patients"] == sorted(SSL4MIS_TEST) and len(split["test"]) == 4
    assert split["rebuilt_from_slices"] == sorted(f"{p}_{f}" for p in SSL4MIS_TRAIN for f in ("frame01", "frame02"))
    case = "patient005_frame02"
    image = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
    assert image.GetSize() == (11, 14, 5) and image.GetSpacing() == (1.5, 1.5, 10.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volumes[case][0])  # slice k -> z = k
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz")))
    np.testing.assert_array_equal(label, volumes[case][1])
    assert (folder / "imagesUnlabeled" / "patient001_frame01_0000.nii.gz").is_file()


def test_ssl4mis_acdc_random_draw_by_patient_and_missing_slice(ssl4mis_acdc_root, tmp_path):
    root, _ = ssl4mis_acdc_root
    folder = convert_acdc_h5(root, 29, "ACDC", (1.5, 1.5, 10.0), tmp_path, labeled="1", seed=3)
    split = json.loads((folder / "split.json").read_text())
    (patient,) = split["labeled_patients"]
    assert split["labeled"] == [f"{patient}_frame01", f"{patient}_frame02"]

    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    (broken / "data" / "slices" / "patient004_frame01_slice_2.h5").unlink()
    with pytest.raises(ConversionError, match=r"case patient004_frame01: slice file\(s\) "
                                              r"\['patient004_frame01_slice_2.h5'\] are missing"):
        convert_acdc_h5(broken, 29, "ACDC", (1.5, 1.5, 10.0), tmp_path / "raw")


@pytest.mark.parametrize("indexes, ordered, problem", [
    ((2, 0, 1), (0, 1, 2), None),
    ((3, 1, 2), (1, 2, 3), "the first slice file is c_slice_1.h5"),
    ((0, 1, 3), None, r"slice file\(s\) \['c_slice_2.h5'\] are missing"),
])
def test_slice_stack_order_and_gaps(tmp_path, indexes, ordered, problem):
    from nnunet_ext.conversion.common import ConversionWarning
    from nnunet_ext.conversion.h5_slices import check_contiguous

    slices = {k: tmp_path / f"c_slice_{k}.h5" for k in indexes}
    if ordered is None:
        with pytest.raises(ConversionError, match=problem):
            check_contiguous("c", slices)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        assert check_contiguous("c", slices) == [slices[k] for k in ordered]
    messages = [str(w.message) for w in caught]
    assert (messages == []) if problem is None else any(problem in m for m in messages)
