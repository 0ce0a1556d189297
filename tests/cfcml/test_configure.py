"""``nnunet-ext configure cfcml``: validation errors before training, stratified splits, derived plans."""
from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter

import pytest
from cfcml_fixtures import PLANS, writable_planned_root

from nnunet_ext.cfcml.tabular import TabularDataError
from nnunet_ext.plans import write_derived_plans


@pytest.fixture
def cfcml_root(tmp_path_factory, tmp_path, monkeypatch):
    return writable_planned_root(tmp_path_factory, tmp_path, monkeypatch, masks=True)


@pytest.fixture
def cfcml_roi_root(tmp_path_factory, tmp_path, monkeypatch):
    return writable_planned_root(tmp_path_factory, tmp_path, monkeypatch, masks=False)


def paths(root, dataset_id=801, name="CfcmlTiny"):
    dataset = f"Dataset{dataset_id:03d}_{name}"
    return root / "nnUNet_raw" / dataset, root / "nnUNet_preprocessed" / dataset


def edit_csv(path, change):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = change(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def configure(pre, settings=None, target="nnUNetCPUPlans_CFCML"):
    return json.loads(open(write_derived_plans(str(pre), PLANS, target, "cfcml", settings or {}, True)).read())


def test_derived_plans_block_split_and_sidecars(cfcml_root):
    raw, pre = paths(cfcml_root)
    source = json.loads((pre / f"{PLANS}.json").read_text())
    plans = configure(pre)
    assert plans["plans_name"] == "nnUNetCPUPlans_CFCML"
    for name, config in source["configurations"].items():
        assert plans["configurations"][name].get("data_identifier") == config.get("data_identifier")
    block = plans["nnunet_ext"]["cfcml"]
    assert block["schema"]["classes"] == ["atypical", "benign", "malignant"]
    assert [f["name"] for f in block["schema"]["fields"]] == ["colour_flag", "score", "noise"]
    settings = block["settings"]
    assert settings["mask_free"] is False and settings["w_seg"] == 1.0
    assert (settings["w_sam"], settings["w_up"], settings["w_cp"]) == (0.06, 0.04, 0.24)
    assert plans["configurations"]["2d"]["batch_size"] % 3 == 0 and plans["configurations"]["2d"]["batch_size"] >= 6
    copy = pre / "tabular" / "nnUNetCPUPlans_CFCML" / "tabular.csv"
    assert copy.read_bytes() == (raw / "tabular.csv").read_bytes()
    assert block["table"]["csv_sha256"] == hashlib.sha256((raw / "tabular.csv").read_bytes()).hexdigest()
    assert block["table"]["source_plans"] == PLANS and block["table"]["json"] is None
    splits = json.loads((pre / "splits_final.json").read_text())
    labels = {r["case_id"]: r["label"] for r in csv.DictReader(open(raw / "tabular.csv"))}
    assert len(splits) == 5
    for split in splits:
        counts = Counter(labels[c] for c in split["val"])
        assert set(counts.values()) == {1}  # 5 cases per class over 5 folds: exactly one per class and fold
        assert not set(split["train"]) & set(split["val"])


def test_settings_overrides_and_unknown_keys(cfcml_root):
    _, pre = paths(cfcml_root)
    plans = configure(pre, {"batch_size": 9, "w_seg": 0.5, "fusion": "concat"})
    assert plans["configurations"]["2d"]["batch_size"] == 9
    assert plans["nnunet_ext"]["cfcml"]["settings"]["w_seg"] == 0.5
    with pytest.raises(KeyError, match="colour"):
        configure(pre, {"colour": 1})
    with pytest.raises(ValueError, match="multiple of the number of classes"):
        configure(pre, {"batch_size": 8})


def test_mask_free_dataset_detected(cfcml_roi_root):
    _, pre = paths(cfcml_roi_root, 802)
    settings = configure(pre)["nnunet_ext"]["cfcml"]["settings"]
    assert settings["mask_free"] is True and settings["w_seg"] == 0.0


def test_tabular_json_groups_and_exclusions(cfcml_root):
    raw, pre = paths(cfcml_root)
    (raw / "tabular.json").write_text(json.dumps({"fields": [{"name": "noise", "exclude": True}],
                                                  "image_groups": {"red": [0], "green_blue": [1, 2]}}))
    block = configure(pre)["nnunet_ext"]["cfcml"]
    assert [f["name"] for f in block["schema"]["fields"]] == ["colour_flag", "score"]
    assert block["settings"]["image_groups"] == [[0], [1, 2]]
    assert (pre / "tabular" / "nnUNetCPUPlans_CFCML" / "tabular.json").read_text() == (raw / "tabular.json").read_text()


@pytest.mark.parametrize("change,message", [
    (lambda rows: [r for r in rows if r["case_id"] != "tr_003"], r"no tabular row for case\(s\) \['tr_003'\]"),
    (lambda rows: rows + [dict(rows[0], case_id="ghost")], r"row\(s\) \['ghost'\] have no image"),
    (lambda rows: [dict(r, label="unknown") if r["case_id"] == "ts_000" else r for r in rows],
     "'unknown' is not one of the classes"),
    (lambda rows: [dict(r, score="") for r in rows], "'score' is empty for every training case"),
    (lambda rows: [dict(r, label="benign") if r["label"] else r for r in rows], "at least two classes"),
    (lambda rows: [dict(r, label="") if r["case_id"] == "tr_004" else r for r in rows],
     r"training case\(s\) \['tr_004'\] have no label"),
    (lambda rows: [dict(r, score="forty") if r["case_id"] == "tr_002" else r for r in rows],
     r"column 'score' mixes numbers and text: case 'tr_002' has 'forty'"),
    (lambda rows: [dict(r, noise="1e308") if r["case_id"] == "ts_001" else r for r in rows],
     r"column 'noise' \(numeric\), case 'ts_001': value '1e308' is not a finite number"),
])
def test_bad_input_is_a_clear_error_before_training(cfcml_root, change, message):
    raw, pre = paths(cfcml_root)
    edit_csv(raw / "tabular.csv", change)
    with pytest.raises(TabularDataError, match=message):
        configure(pre)
    assert not (pre / "nnUNetCPUPlans_CFCML.json").exists()


def test_each_plans_identifier_keeps_its_own_copy(cfcml_root):
    raw, pre = paths(cfcml_root)
    original = (raw / "tabular.csv").read_bytes()
    first = configure(pre, target="first")["nnunet_ext"]["cfcml"]["table"]
    edit_csv(raw / "tabular.csv", lambda rows: [dict(r, noise="0.5") for r in rows])
    (raw / "tabular.json").write_text(json.dumps({"fields": [{"name": "score", "exclude": True}]}))
    second = configure(pre, target="second")["nnunet_ext"]["cfcml"]["table"]
    assert (pre / first["csv"]).read_bytes() == original  # not replaced by the second configure
    assert (pre / second["csv"]).read_bytes() == (raw / "tabular.csv").read_bytes() != original
    assert first["json"] is None and not (pre / "tabular" / "first" / "tabular.json").exists()
    assert (pre / second["json"]).is_file()
    assert first["csv_sha256"] != second["csv_sha256"] and second["json_sha256"] is not None
    assert not (pre / "tabular.csv").exists()  # no shared copy any more


def test_predict_cls_default_table_is_the_configured_copy_unless_the_raw_table_changed(cfcml_root):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ext.cfcml.predict import default_prediction_table

    raw, pre = paths(cfcml_root)
    plans = configure(pre)
    block, plans_manager = plans["nnunet_ext"]["cfcml"], PlansManager(plans)
    copy = pre / "tabular" / "nnUNetCPUPlans_CFCML" / "tabular.csv"
    assert default_prediction_table(block, plans_manager) == str(copy)
    edit_csv(raw / "tabular.csv", lambda rows: [dict(r, noise="0.5") for r in rows])
    with pytest.raises(TabularDataError, match=re.escape(f"choose the table explicitly: -t {copy} (as configured) "
                                                         f"or -t {raw / 'tabular.csv'} (edited")):
        default_prediction_table(block, plans_manager)


class _LabelTable:
    """The two things ``write_stratified_splits`` reads of a table: class names and per-case class indices."""

    def __init__(self, labels: dict[str, int], classes: tuple[str, ...]):
        import types

        import torch

        self._labels, self._torch = labels, torch
        self.schema = types.SimpleNamespace(classes=classes)

    def labels(self, identifiers):
        return self._torch.tensor([self._labels[i] for i in identifiers])


def _two_class_labels(n_first: int, n_second: int) -> dict[str, int]:
    labels = {f"case_{i:02d}": 0 for i in range(n_first)}
    labels.update({f"case_{n_first + i:02d}": 1 for i in range(n_second)})
    return labels


def test_stratified_split_refuses_when_no_class_has_enough_cases(tmp_path):
    """Fewer cases than folds in every class: sklearn's own raw error before, now a message naming the classes."""
    from nnunet_ext.cfcml.configure import write_stratified_splits

    labels = _two_class_labels(3, 2)
    with pytest.raises(TabularDataError, match="at least 5 training cases in some class; 'nevus' has 3, 'melanoma' "
                                               "has 2"):
        write_stratified_splits(str(tmp_path), _LabelTable(labels, ("nevus", "melanoma")), list(labels))
    assert not (tmp_path / "splits_final.json").exists()


def test_stratified_split_warns_about_a_class_with_fewer_cases_than_folds(tmp_path):
    from nnunet_ext.cfcml.configure import write_stratified_splits
    from nnunet_ext.cfcml.prediction_table import TabularDataWarning

    labels = _two_class_labels(16, 4)
    with pytest.warns(TabularDataWarning, match="'melanoma' has 4; some validation folds have no case"):
        path = write_stratified_splits(str(tmp_path), _LabelTable(labels, ("nevus", "melanoma")), list(labels))
    assert sum(len(s["val"]) for s in json.loads(open(path).read())) == 20


def test_stratified_split_with_enough_cases_per_class(tmp_path):
    from nnunet_ext.cfcml.configure import write_stratified_splits

    labels = {f"case_{i:02d}": int(i >= 6) for i in range(11)}
    path = write_stratified_splits(str(tmp_path), _LabelTable(labels, ("nevus", "melanoma")), list(labels))
    splits = json.loads(open(path).read())
    assert len(splits) == 5 and all({labels[c] for c in s["val"]} == {0, 1} for s in splits)
