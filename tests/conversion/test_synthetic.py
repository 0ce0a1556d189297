from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.conversion.synthetic import CLASSES, LABELS, case_class, make_case, write_demo_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("raw"), num_labeled=5, num_unlabeled=2, num_test=2,
                              shape=(20, 24, 24))


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_layout_and_dataset_json(demo):
    assert len(list((demo / "imagesTr").glob("*_0000.nii.gz"))) == 5
    assert len(list((demo / "imagesTr").glob("*.nii.gz"))) == 10 and len(list((demo / "labelsTr").iterdir())) == 5
    assert len(list((demo / "imagesUnlabeled").glob("*.nii.gz"))) == 4
    assert len(list((demo / "imagesTs").glob("*.nii.gz"))) == 4 and len(list((demo / "labelsTs").iterdir())) == 2
    dataset_json = json.loads((demo / "dataset.json").read_text())
    assert dataset_json["labels"] == LABELS and dataset_json["numTraining"] == 5
    rows = list(csv.DictReader(open(demo / "tabular.csv")))
    assert [r["case_id"] for r in rows] == [f"demo_{i:03d}" for i in range(5)] + ["unl_000", "unl_001",
                                                                                  "test_000", "test_001"]
    assert {r["label"] for r in rows} <= set(CLASSES)
    assert _read(demo / "imagesTr" / "demo_000_0000.nii.gz").shape == (20, 24, 24)


def test_deterministic_per_seed():
    a = make_case(np.random.default_rng(3), (16, 20, 20))
    b = make_case(np.random.default_rng(3), (16, 20, 20))
    c = make_case(np.random.default_rng(4), (16, 20, 20))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_modalities_are_complementary():
    """FLAIR separates oedema from tissue but not from core; T1c separates core but not oedema."""
    rng = np.random.default_rng(0)
    contrasts = []
    for _ in range(5):
        images, seg, _ = make_case(rng, (32, 40, 40))
        flair, t1c = images
        tissue = (seg == 0) & (flair > 50)
        means = {m: {k: float(img[seg == k].mean()) for k in (1, 2)} | {"tissue": float(img[tissue].mean())}
                 for m, img in (("flair", flair), ("t1c", t1c))}
        contrasts.append(means)
    for m in contrasts:
        assert m["flair"][1] - m["flair"]["tissue"] > 50  # FLAIR shows oedema
        assert abs(m["flair"][1] - m["flair"][2]) < 20  # ... but not core vs oedema
        assert m["t1c"][2] - m["t1c"][1] > 50  # T1c shows the core
        assert abs(m["t1c"][1] - m["t1c"]["tissue"]) < 20  # ... but not the oedema


@pytest.mark.parametrize("radius, age, expected", [(3.0, 40.0, "low"), (5.0, 40.0, "medium"),
                                                   (3.0, 70.0, "medium"), (5.0, 70.0, "high"),
                                                   (5.0, None, "medium")])
def test_class_needs_image_and_table(radius, age, expected):
    assert case_class(radius, age) == expected


def test_refuses_to_overwrite(demo):
    before = (demo / "dataset.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_demo_dataset(demo.parent, num_labeled=5, num_unlabeled=0, num_test=1)
    assert (demo / "dataset.json").read_text() == before


@pytest.mark.parametrize("kwargs", [{"num_labeled": 4}, {"num_test": 0}, {"num_unlabeled": -1}])
def test_bad_counts(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_demo_dataset(tmp_path, **kwargs)
