"""``--regions``: parsing, the painting order nnU-Net needs (derived, kept when valid, checked against nnU-Net's own
export code), refusals with the region and what was expected, and ``convert per-case`` writing a region dataset."""
from __future__ import annotations

import itertools
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.conversion.common import ConversionError, ConversionWarning
from nnunet_ext.conversion.folders import convert_folders, convert_per_case
from nnunet_ext.conversion.regions import (
    RegionLabelConverter,
    painting_mismatches,
    parse_regions,
    plan_regions,
)

pytestmark = pytest.mark.filterwarnings("ignore::nnunet_ext.conversion.common.ConversionWarning")

BRATS2015 = {"whole tumour": [1, 2, 3, 4], "tumour core": [1, 3, 4], "enhancing tumour": [4]}


@pytest.mark.parametrize("items, expected", [
    (None, None),
    (["whole tumour=1,2,3,4", "tumour core=1, 3,4", "enhancing tumour=4"],
     {"whole tumour": [1, 2, 3, 4], "tumour core": [1, 3, 4], "enhancing tumour": [4]}),
    (["a=b=2,1"], {"a=b": [2, 1]}),  # the values follow the last '='
])
def test_parse_regions(items, expected):
    assert parse_regions(items) == expected


@pytest.mark.parametrize("items, message", [
    (["wt"], "expected NAME=VALUE[,VALUE...] (e.g. 'tumour core=1,3,4'), got 'wt'"),
    (["=1,2"], "expected NAME=VALUE"),
    (["wt="], "region 'wt' has no label values (expected e.g. 'wt=1,2')"),
    (["wt=1,x"], "region 'wt': label values must be integers separated by commas, got '1,x'"),
    (["wt=1,2", "wt=3"], "region 'wt' is given twice"),
])
def test_parse_regions_refusals(items, message):
    with pytest.raises(ConversionError, match="^--regions: ") as raised:
        parse_regions(items)
    assert message in str(raised.value)


def _plan(regions: dict):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        plan = plan_regions(regions)
    return plan, [str(w.message) for w in caught]


@pytest.mark.parametrize("regions, labels, class_order, reordered", [
    # BraTS 2015 labels kept (1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing): edema paints WT, necrosis TC
    (BRATS2015, {"background": 0, "whole tumour": [1, 2, 3, 4], "tumour core": [1, 3, 4], "enhancing tumour": 4},
     [2, 1, 4], False),
    # nnU-Net's own Dataset137 definition gives its own regions_class_order (1, 2, 3)
    ({"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
     {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}, [1, 2, 3], False),
    # nested regions given smallest first: painted in the only order that works, with a warning
    (dict(reversed(list(BRATS2015.items()))),
     {"background": 0, "whole tumour": [1, 2, 3, 4], "tumour core": [1, 3, 4], "enhancing tumour": 4},
     [2, 1, 4], True),
    # disjoint regions next to an overlapping one
    ({"lesion": [1, 2], "other": [3]}, {"background": 0, "lesion": [1, 2], "other": 3}, [1, 3], False),
    # 'a' is painted over everywhere (each of its values lies in a later region): it paints its smallest value
    ({"a": [1, 2], "b": [1], "c": [2]}, {"background": 0, "a": [1, 2], "b": 1, "c": 2}, [1, 1, 2], False),
])
def test_plan_regions_known_orders(regions, labels, class_order, reordered):
    plan, messages = _plan(regions)
    assert plan.dataset_labels() == labels
    assert list(plan.class_order) == class_order
    assert painting_mismatches(plan.dataset_labels(), plan.class_order) == []
    if reordered:
        assert len(messages) == 1 and "painting order changed to ['whole tumour', 'tumour core', " \
                                       "'enhancing tumour']" in messages[0]
    else:
        assert messages == []


@pytest.mark.parametrize("regions, message", [
    ({}, "give at least one region"),
    ({"background": [1, 2]}, "'background' cannot be a region name (nnU-Net reserves it)"),
    ({"ignore": [1, 2]}, "'ignore' cannot be a region name"),
    ({"wt": [1, 2], "tc": []}, "region 'tc' has no label values"),
    ({"wt": [0, 1, 2]}, "region 'wt' contains [0]; region values must be foreground labels (>= 1; 0 is background)"),
    ({"wt": [1, 2, 2]}, "region 'wt' lists a label value twice: [1, 2, 2]"),
    ({"wt": [1, "2"]}, "region 'wt': label values must be integers, got [1, '2']"),
    ({"wt": [1, 2], "tc": [2, 1]}, "regions 'wt' and 'tc' contain the same label values [1, 2]"),
    ({"a": [1], "b": [2]}, "every region has a single label value, so nnU-Net would train plain labels (softmax) and "
                           "ignore regions_class_order; use --labels NAME=VALUE instead"),
    ({"wt": [1, 2, 4], "et": [4]}, "label value(s) [3] are in no region, but nnU-Net needs the regions to cover 1..4 "
                                   "without gaps (they cover [1, 2, 4])"),
    ({"a": [1, 2], "b": [2, 3], "c": [1, 3]}, "no painting order exists"),
])
def test_plan_regions_refusals(regions, message):
    with pytest.raises(ConversionError, match="^--regions: ") as raised:
        plan_regions(regions)
    assert message in str(raised.value)


def test_no_painting_order_names_each_region_and_its_clashing_values():
    with pytest.raises(ConversionError) as raised:
        plan_regions({"a": [1, 2], "b": [2, 3], "c": [1, 3]})
    assert "'a' for 1 and 2, 'b' for 2 and 3, 'c' for 1 and 3" in str(raised.value)


def test_painting_mismatches_runs_nnunets_painting():
    labels = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    assert painting_mismatches(labels, [1, 2, 3]) == []
    # values 1 and 3 swapped: whole-tumour-only voxels would gain core and enhancing, enhancing voxels lose them
    assert painting_mismatches(labels, [3, 2, 1]) == [
        "value 1 is painted 3, which changes region(s) ['tumor core', 'enhancing tumor']",
        "value 3 is painted 1, which changes region(s) ['tumor core', 'enhancing tumor']"]
    assert painting_mismatches({"background": 0, "a": 1, "b": 2}, [1, 2]) == [
        "no entry of labels has several values, so nnU-Net trains plain labels and paints no regions"]


def _paints_correctly(regions: list[tuple[int, ...]], class_order: tuple[int, ...]) -> bool:
    """Brute-force reference of nnU-Net's painting: later regions overwrite earlier ones."""
    for value in {v for region in regions for v in region}:
        painted = 0
        for region, c in zip(regions, class_order):
            if value in region:
                painted = c
        if [value in r for r in regions] != [painted in r for r in regions]:
            return False
    return True


def _some_order_works(regions: list[tuple[int, ...]]) -> bool:
    values = sorted({v for region in regions for v in region})
    return any(_paints_correctly(list(order), paints) for order in itertools.permutations(regions)
               for paints in itertools.product(values, repeat=len(regions)))


SUBSETS = [tuple(s) for n in (1, 2, 3, 4) for s in itertools.combinations((1, 2, 3, 4), n)]


def _structurally_valid(regions: list[tuple[int, ...]]) -> bool:
    covered = sorted({v for region in regions for v in region})
    return covered == list(range(1, covered[-1] + 1)) and any(len(region) > 1 for region in regions)


@pytest.mark.parametrize("count", [2, 3])
def test_derivation_finds_an_order_exactly_when_one_exists(count):
    """Every set of 2 or 3 regions over the values 1..4, against a brute force over all orders and painted
    values: plan_regions succeeds iff some order works, and keeps the given order iff that order works."""
    planned = refused = 0
    for regions in itertools.combinations(SUBSETS, count):
        regions = list(regions)
        if not _structurally_valid(regions):
            continue
        definition = {f"r{i}": list(region) for i, region in enumerate(regions)}
        if not _some_order_works(regions):
            with pytest.raises(ConversionError, match="no painting order exists"):
                plan_regions(definition)
            refused += 1
            continue
        plan, _ = _plan(definition)
        ordered = [region.values for region in plan.regions]
        assert _paints_correctly(ordered, plan.class_order), definition
        values = sorted({v for region in regions for v in region})
        given_order_works = any(_paints_correctly(regions, paints)
                                for paints in itertools.product(values, repeat=len(regions)))
        assert (ordered == regions) == given_order_works, definition
        planned += 1
    assert planned > 0 and refused > 0  # e.g. {1,2} and {2,3}: the shared value 2 needs a third region


def test_region_label_converter_checks_values_and_writes_the_entries():
    plan, _ = _plan(BRATS2015)
    converter = RegionLabelConverter(plan)
    converted = converter.convert(np.array([0, 1, 2, 3, 4], dtype=np.float32), "case_1.nii.gz")
    np.testing.assert_array_equal(converted, [0, 1, 2, 3, 4])  # the label files keep their values
    assert converter.dataset_json_entries() == {
        "labels": {"background": 0, "whole tumour": [1, 2, 3, 4], "tumour core": [1, 3, 4], "enhancing tumour": 4},
        "regions_class_order": [2, 1, 4]}
    with pytest.raises(ConversionError, match=r"^case_2.nii.gz: label values \[5\] are in no region \(whole tumour="
                                              r"1,2,3,4, tumour core=1,3,4, enhancing tumour=4\); add them to a region "
                                              r"\(--regions\) or map them first \(--label-map 5=0"):
        converter.convert(np.array([0, 5]), "case_2.nii.gz")
    mapped = RegionLabelConverter(plan, {5: 4})  # --label-map applies before the region check
    np.testing.assert_array_equal(mapped.convert(np.array([0, 5, 1]), "c"), [0, 4, 1])


def test_values_absent_from_every_label_file_warn_and_a_region_without_voxels_is_an_error():
    plan, _ = _plan(BRATS2015)
    converter = RegionLabelConverter(plan)
    converter.convert(np.array([0, 2, 3, 4]), "a")
    with pytest.warns(ConversionWarning, match=r"--regions: label value\(s\) \[1\] occur in no converted label file"):
        entries = converter.dataset_json_entries()
    assert entries["regions_class_order"] == [2, 1, 4]
    no_enhancing = RegionLabelConverter(plan)
    no_enhancing.convert(np.array([0, 1, 2, 3]), "a")
    with pytest.raises(ConversionError, match=r"region\(s\) \['enhancing tumour'\] have no voxel in any converted "
                                              r"label file \(values found: \[0, 1, 2, 3\]\)"):
        no_enhancing.dataset_json_entries()


def _write(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


@pytest.fixture(scope="module")
def region_source(tmp_path_factory) -> Path:
    """3 cases <case>/{M1,M2,seg}.nii.gz with labels 0..3, a README, and ds2/ holding a copy of the cases."""
    source = tmp_path_factory.mktemp("regions_src")
    rng = np.random.default_rng(0)
    for i in range(3):
        seg = np.zeros((6, 8, 10), np.uint8)
        seg[1:5, 2:6, 2:8] = 1
        seg[2:4, 3:5, 3:7] = 2
        seg[2:4, 3:5, 4:6] = 3
        for where in (source, source / "ds2"):
            for modality in ("M1", "M2"):
                _write(rng.random((6, 8, 10), dtype=np.float32), where / f"case{i}" / f"{modality}.nii.gz")
            _write(seg, where / f"case{i}" / "seg.nii.gz")
            (where / f"case{i}" / "brainmask.nii.gz").write_bytes(
                (where / f"case{i}" / "seg.nii.gz").read_bytes())  # extra files in a case folder are ignored
    (source / "README.md").write_text("not a case")
    return source


def test_per_case_writes_a_region_dataset(region_source, tmp_path):
    regions = {"whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": 3}
    with pytest.warns(ConversionWarning, match=r"1 folder\(s\) in .* without image files are not cases and are "
                                               r"skipped: \['ds2'\]"):
        folder = convert_per_case(region_source, 7, "Regions", ["M1", "M2"], "seg", tmp_path, regions=regions,
                                  test="1")
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3],
                                      "enhancing": 3}
    assert dataset_json["regions_class_order"] == [1, 2, 3] and dataset_json["numTraining"] == 2
    split = json.loads((folder / "split.json").read_text())
    assert sorted(split["labeled"] + split["test"]) == ["case0", "case1", "case2"] and len(split["test"]) == 1
    for case, part in [(split["labeled"][0], "labelsTr"), (split["test"][0], "labelsTs")]:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / part / f"{case}.nii.gz"))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(region_source / case / "seg.nii.gz"))))


@pytest.mark.parametrize("kwargs, message", [
    ({"regions": {"wt": [1, 2, 3], "tc": [2, 3]}, "labels": {"background": 0, "a": 1}},
     "give either --labels or --regions"),
    ({"regions": {"wt": [1, 2], "tc": [2]}}, r"seg.nii.gz: label values \[3\] are in no region"),
    ({"regions": {"wt": [1, 2, 3, 4], "et": [4]}}, r"region\(s\) \['et'\] have no voxel in any converted label file"),
    ({"regions": {"wt": [1, 2, 3], "tc": [2, 3]}, "label_map": {3: 5}}, r"label values \[5\] are in no region"),
])
def test_per_case_region_refusals_leave_nothing_behind(region_source, tmp_path, kwargs, message):
    with pytest.raises(ConversionError, match=message):
        convert_per_case(region_source, 7, "Regions", ["M1", "M2"], "seg", tmp_path / "raw", **kwargs)
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def test_cli_prints_a_region_error_without_traceback(region_source, tmp_path, capsys):
    from nnunet_ext.cli import main

    code = main(["convert", "per-case", str(region_source), "-d", "7", "-n", "Regions", "-o", str(tmp_path / "raw"),
                 "--modalities", "M1", "M2", "--label", "seg", "--regions", "wt=1,2,3", "tc=2,x"])
    output = capsys.readouterr()
    assert code == 2 and "Traceback" not in output.err
    assert "--regions: region 'tc': label values must be integers separated by commas, got '2,x'" in output.err
    assert not (tmp_path / "raw").exists()


def _folders_layout(region_source: Path, target: Path, cases: tuple[str, ...]) -> Path:
    """``convert folders``' layout (images/<case> + labels/<case>, first modality only) of ``region_source``'s cases."""
    for sub in ("images", "labels"):
        (target / sub).mkdir(parents=True)
    for case in cases:
        shutil.copy(region_source / case / "M1.nii.gz", target / "images" / f"{case}.nii.gz")
        shutil.copy(region_source / case / "seg.nii.gz", target / "labels" / f"{case}.nii.gz")
    return target


def test_folders_writes_a_region_dataset_from_the_cli(region_source, tmp_path):
    """``convert folders --regions``: images/<case> + labels/<case> (single channel), same region entries."""
    from nnunet_ext.cli import main

    source = _folders_layout(region_source, tmp_path / "flat", ("case0", "case1", "case2"))
    code = main(["convert", "folders", str(source), "-d", "8", "-n", "FlatRegions", "-o", str(tmp_path / "raw"),
                 "--regions", "whole tumour=1,2,3", "tumour core=2,3", "enhancing=3", "--test", "1"])
    assert code == 0
    dataset_json = json.loads((tmp_path / "raw" / "Dataset008_FlatRegions" / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3],
                                      "enhancing": 3}
    assert dataset_json["regions_class_order"] == [1, 2, 3] and dataset_json["numTraining"] == 2


def test_folders_region_refusal_names_the_file(region_source, tmp_path):
    source = _folders_layout(region_source, tmp_path / "flat", ("case0",))
    with pytest.raises(ConversionError, match=r"case0.* label values \[3\] are in no region"):
        convert_folders(source, 8, "FlatRegions", tmp_path / "raw", regions={"wt": [1, 2], "tc": [2]})
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []
