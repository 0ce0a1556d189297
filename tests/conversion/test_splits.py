"""Unit tests of the semi-supervised split logic (no files written)."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from nnunet_ext.conversion.splits import (
    CountRequest,
    SplitError,
    load_split_file,
    make_split,
    stratified_choice,
)

CASES = [f"case_{i:03d}" for i in range(40)]


@pytest.mark.parametrize("text, available, expected", [
    ("all", 37, 37),
    ("1.0", 37, 37),
    ("0.1", 200, 20),
    ("0.1", 37, 4),  # 3.7 rounds to 4
    ("0.01", 37, 1),  # never rounds to zero cases
    ("12", 37, 12),
    (12, 37, 12),
    ("0", 37, 0),
])
def test_count_request_resolves(text, available, expected):
    assert CountRequest.parse(text, "--labeled").resolve(available, "--labeled") == expected


@pytest.mark.parametrize("text, message", [
    ("-3", "must be >= 0"),
    ("1.5", "in (0, 1]"),
    ("0.0", "in (0, 1]"),
    ("many", "expected a count"),
    ("nan", "in (0, 1]"),
])
def test_count_request_rejects(text, message):
    with pytest.raises(SplitError, match=re.escape(message)):
        CountRequest.parse(text, "--labeled")


def test_count_larger_than_available():
    with pytest.raises(SplitError, match="asked for 50 cases but only 40"):
        CountRequest.parse("50", "--test").resolve(40, "--test")


def test_stratified_choice_keeps_class_proportions():
    strata = {c: ("a" if i < 20 else "b" if i < 32 else "c") for i, c in enumerate(CASES)}  # 20 / 12 / 8
    chosen = stratified_choice(CASES, 10, np.random.default_rng(0), strata)
    assert len(chosen) == 10 and len(set(chosen)) == 10
    assert Counter(strata[c] for c in chosen) == {"a": 5, "b": 3, "c": 2}


def test_stratified_choice_largest_remainder():
    strata = {c: ("a" if i < 30 else "b") for i, c in enumerate(CASES)}  # 30 / 10, choose 3 -> 2.25 / 0.75
    chosen = stratified_choice(CASES, 3, np.random.default_rng(1), strata)
    assert Counter(strata[c] for c in chosen) == {"a": 2, "b": 1}


def test_choice_does_not_depend_on_input_order():
    a = stratified_choice(CASES, 7, np.random.default_rng(5))
    b = stratified_choice(list(reversed(CASES)), 7, np.random.default_rng(5))
    assert a == b


def test_split_parts_partition_the_cases():
    split = make_split(CASES, labeled="0.25", test="8", seed=3, unlabeled_only=["extra"])
    assert len(split.test) == 8 and len(split.labeled) == 8 and len(split.unlabeled) == 24
    assert sorted(split.labeled + split.unlabeled + split.test) == CASES
    assert split.unlabeled_only == ["extra"]
    assert split.part_of(split.test[0]) == "test" and split.part_of("extra") == "unlabeled_only"


def test_same_seed_same_split_other_seed_other_split():
    a = make_split(CASES, labeled="5", test="10", seed=0)
    b = make_split(list(reversed(CASES)), labeled="5", test="10", seed=0)
    c = make_split(CASES, labeled="5", test="10", seed=1)
    assert (a.labeled, a.test) == (b.labeled, b.test)
    assert (a.labeled, a.test) != (c.labeled, c.test)


def test_split_stratified_by_class():
    strata = {c: ("x" if i % 4 == 0 else "y") for i, c in enumerate(CASES)}  # 10 x / 30 y
    split = make_split(CASES, labeled="0.5", test="0.2", seed=0, strata=strata)
    assert Counter(strata[c] for c in split.test) == {"x": 2, "y": 6}
    assert Counter(strata[c] for c in split.labeled) == {"x": 4, "y": 12}


def test_fixed_lists_are_honoured_and_recorded():
    split = make_split(CASES, fixed_test=CASES[:5], fixed_train=CASES[5:30], labeled="10", seed=0)
    assert split.test == CASES[:5]
    assert set(split.labeled + split.unlabeled) == set(CASES[5:30]) and len(split.labeled) == 10
    assert split.info["not_in_lists"] == CASES[30:]


@pytest.mark.parametrize("kwargs, message", [
    ({"fixed_test": CASES[:5], "test": "3"}, "--test cannot be combined with the source's list files"),
    ({"fixed_test": ["nope"]}, "no labelled source case"),
    ({"test": "40"}, "leaves no training case"),
    ({"labeled": "0"}, "at least one labelled training case"),
])
def test_split_rejects(kwargs, message):
    with pytest.raises(SplitError, match=message):
        make_split(CASES, **kwargs)


def test_previous_split_reused_and_upper_bound(tmp_path):
    first = make_split(CASES, labeled="0.1", test="10", seed=7)
    path = tmp_path / "split.json"
    path.write_text(json.dumps(first.to_json()))
    previous = load_split_file(path)
    again = make_split(CASES, previous=previous, seed=99)  # the seed of a reused split does not matter
    assert (again.labeled, again.unlabeled, again.test) == (first.labeled, first.unlabeled, first.test)
    full = make_split(CASES, labeled="all", previous=previous)
    assert full.test == first.test and full.unlabeled == [] and full.labeled == sorted(first.labeled +
                                                                                       first.unlabeled)


@pytest.mark.parametrize("kwargs, message", [
    ({"test": "3"}, "--test cannot be combined with --split-file"),
    ({"labeled": "5"}, "must be omitted"),
])
def test_previous_split_conflicts(tmp_path, kwargs, message):
    previous = make_split(CASES, test="5").to_json()
    with pytest.raises(SplitError, match=message):
        make_split(CASES, previous=previous, **kwargs)


def test_previous_split_must_match_the_source():
    previous = make_split(CASES, test="5").to_json()
    with pytest.raises(SplitError, match=r"does not match the source.*case_039"):
        make_split(CASES[:-1], previous=previous)


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ('{"labeled": 3}', "expected a JSON object"),
    ('{"labeled": ["a"], "unlabeled": [], "test": ["a"]}', "both training and test"),
])
def test_bad_split_files(tmp_path, content, message):
    path = tmp_path / "split.json"
    path.write_text(content)
    with pytest.raises(SplitError, match=message):
        load_split_file(path)
    with pytest.raises(SplitError, match="does not exist"):
        load_split_file(tmp_path / "missing.json")


def test_labeled_order_list_takes_the_first_training_list_entries():
    train_list = CASES[29:4:-1]  # list order differs from sorted order, like UA-MT's train.list
    split = make_split(CASES, fixed_test=CASES[:5], fixed_train=train_list, labeled="3", labeled_order="list")
    assert split.labeled == sorted(train_list[:3]) and split.info["labeled_order"] == "list"
    assert split.unlabeled == sorted(train_list[3:])
    random = make_split(CASES, fixed_test=CASES[:5], fixed_train=train_list, labeled="3", seed=0)
    assert random.labeled != split.labeled  # the default still draws at random


PATIENT_FRAMES = [f"patient{p:03d}_frame{f:02d}" for p in range(1, 11) for f in (1, 2)]
PATIENT_OF = {c: c.split("_")[0] for c in PATIENT_FRAMES}


@pytest.mark.parametrize("kwargs", [
    {"labeled": "3", "test": "2", "seed": 0},
    {"labeled": "0.375", "test": "0.2", "seed": 5},  # fractions of patients: 3 of the 8 left, 2 of 10
    {"labeled": "2", "fixed_test": PATIENT_FRAMES[:4], "fixed_train": PATIENT_FRAMES[:3:-1], "labeled_order": "list"},
])
def test_groups_keep_both_frames_of_a_patient_together(kwargs):
    split = make_split(PATIENT_FRAMES, groups=PATIENT_OF, group_name="patient", **kwargs)
    parts = {name: {PATIENT_OF[c] for c in getattr(split, name)} for name in ("labeled", "unlabeled", "test")}
    assert not (parts["labeled"] & parts["unlabeled"]) and not (parts["labeled"] | parts["unlabeled"]) & parts["test"]
    assert len(split.labeled) == 2 * len(parts["labeled"]) and len(split.test) == 2 * len(parts["test"])
    assert split.info["labeled_patients"] == sorted(parts["labeled"])
    assert split.info["test_patients"] == sorted(parts["test"]) and split.info["grouped_by"] == "patient"
    if kwargs.get("labeled_order") == "list":  # the first 2 patients of the reversed training list
        assert parts["labeled"] == {"patient010", "patient009"}
    else:
        assert len(parts["labeled"]) == 3 and len(parts["test"]) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"labeled": "2", "labeled_order": "list"}, "no train.list is used here"),
    ({"labeled": "2", "labeled_order": "first"}, "--labeled-order must be one of"),
    ({"fixed_test": PATIENT_FRAMES[:3], "fixed_train": PATIENT_FRAMES[3:], "groups": PATIENT_OF,
      "group_name": "patient"}, r"patient\(s\) \['patient002'\] have cases in both the test and the training"),
])
def test_labeled_order_and_groups_reject(kwargs, message):
    with pytest.raises(SplitError, match=message):
        make_split(PATIENT_FRAMES, **kwargs)


def test_labeled_order_list_with_split_file_rejected():
    previous = make_split(CASES, test="5").to_json()
    with pytest.raises(SplitError, match="--labeled-order list cannot be combined with --split-file"):
        make_split(CASES, previous=previous, labeled_order="list")


def test_split_file_reuse_records_patients_and_keeps_them_together():
    kwargs = {"groups": PATIENT_OF, "group_name": "patient"}
    first = make_split(PATIENT_FRAMES, labeled="2", test="2", seed=1, **kwargs)
    again = make_split(PATIENT_FRAMES, previous=first.to_json(), **kwargs)
    assert again.info["labeled_patients"] == first.info["labeled_patients"]
    assert again.info["test_patients"] == first.info["test_patients"]
    separated = dict(first.to_json(), labeled=first.labeled[1:], unlabeled=first.unlabeled + first.labeled[:1])
    with pytest.raises(SplitError, match=r"patient\(s\) \['patient\d+'\] have cases in both labeled and unlabeled"):
        make_split(PATIENT_FRAMES, previous=separated, **kwargs)
