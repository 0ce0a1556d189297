"""Tabular sidecar: type detection, vocabularies, missing values, errors, leakage-free statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_ext.cfcml.network import TabularTokenizer
from nnunet_ext.cfcml.tabular import (
    TabularDataError,
    TabularSchema,
    TabularTable,
    fit_numeric_stats,
    image_groups_from_json,
    infer_schema,
    load_tabular_json,
    read_csv_rows,
)

HEADER = ["case_id", "label", "age", "site", "marker"]
ROWS = [
    {"case_id": "a", "label": "high", "age": "60", "site": "B", "marker": "1.5"},
    {"case_id": "b", "label": "low", "age": "", "site": "A", "marker": "0.5"},
    {"case_id": "c", "label": "low", "age": "40", "site": "", "marker": "0.7"},
    {"case_id": "d", "label": "high", "age": "80", "site": "C", "marker": "n/a"},
    {"case_id": "v", "label": "low", "age": "1000", "site": "Z", "marker": "9"},  # validation row
    {"case_id": "t", "label": "", "age": "50", "site": "A", "marker": "1"},  # unlabelled test row
]
TRAIN = ["a", "b", "c", "d"]


def schema(overrides=None, rows=ROWS, train=TRAIN):
    return infer_schema(HEADER, rows, train, overrides)


def test_types_vocabularies_and_classes_come_from_training_rows():
    s = schema()
    assert s.classes == ["high", "low"]
    assert [(f.name, f.type) for f in s.fields] == [("age", "numeric"), ("site", "categorical"),
                                                    ("marker", "numeric")]
    assert s.categorical_fields[0].categories == ["A", "B", "C"]  # "Z" only in a validation row: not in vocab
    assert TabularSchema.from_dict(s.to_dict()) == s


def test_integer_labels_sorted_numerically_and_accepted_as_floats():
    rows = [dict(r, label=lab) for r, lab in zip(ROWS, ["10", "2", "2", "10", "2", ""])]
    s = schema(rows=rows)
    assert s.classes == ["2", "10"]
    assert s.class_index("10.0", "x") == 1


@pytest.mark.parametrize("overrides,check", [
    ({"fields": [{"name": "age", "type": "categorical"}]},
     lambda s: s.categorical_fields[0].categories == ["40", "60", "80"]),
    ({"fields": [{"name": "site", "exclude": True}]}, lambda s: "site" not in [f.name for f in s.fields]),
    ({"fields": [{"name": "site", "categories": ["A", "B", "C", "D"]}]},
     lambda s: s.categorical_fields[0].categories == ["A", "B", "C", "D"]),
    ({"classes": ["low", "high"]}, lambda s: s.classes == ["low", "high"]),
])
def test_tabular_json_overrides(overrides, check):
    assert check(schema(overrides))


def test_encoding_of_missing_and_unknown_values():
    s = schema()
    table = TabularTable(s, ROWS)
    batch = table.batch(["a", "b", "c", "d", "v", "t"])
    assert batch.categorical[:, 0].tolist() == [2, 1, 0, 3, 0, 1]  # missing "" and unseen "Z" -> 0
    assert batch.missing[:, 0].tolist() == [False, True, False, False, False, False]
    assert batch.missing[:, 1].tolist() == [False, False, False, True, False, False]  # "n/a"
    assert batch.numeric[1, 0] == 0.0
    assert table.labels(["a", "b", "t"]).tolist() == [0, 1, -1]


@pytest.mark.parametrize("mutate,message", [
    (lambda rows: [dict(r, label="low") for r in rows], "at least two classes"),
    (lambda rows: [dict(r, marker="") if r["case_id"] in TRAIN else r for r in rows], "empty for every training"),
])
def test_schema_errors(mutate, message):
    rows = mutate([dict(r) for r in ROWS])
    with pytest.raises(TabularDataError, match=message):
        schema(rows=rows)


def with_cell(case, column, value):
    return [dict(r, **{column: value}) if r["case_id"] == case else dict(r) for r in ROWS]


@pytest.mark.parametrize("case,column,value", [
    ("a", "age", "forty"),  # text in a numeric column: no longer one category per value
    ("c", "age", "1,059"),  # thousands separator
    ("v", "marker", "7 mg"),  # a validation row counts too
    ("t", "age", "old"),  # and an unlabelled test row
    ("b", "site", "5"),  # a number among categories
])
def test_column_mixing_numbers_and_text_is_refused_with_case_and_value(case, column, value):
    with pytest.raises(TabularDataError, match=rf"column '{column}' mixes numbers and text: case '{case}' has "
                                               rf"'{value}'.*declare the column in tabular.json"):
        schema(rows=with_cell(case, column, value))


@pytest.mark.parametrize("case,column,value", [
    ("a", "age", "inf"), ("b", "marker", "-Infinity"), ("c", "age", "1e308"), ("v", "marker", "1e39"),
])
def test_non_finite_numbers_are_refused_with_case_and_value(case, column, value):
    with pytest.raises(TabularDataError, match=rf"column '{column}' \(numeric\), case '{case}': value '{value}' "
                                               rf"is not a finite number"):
        schema(rows=with_cell(case, column, value))


def test_declared_type_resolves_a_mixed_column():
    rows = with_cell("a", "age", "forty")
    s = schema({"fields": [{"name": "age", "type": "categorical"}]}, rows=rows)
    assert s.fields[0].type == "categorical" and "forty" in s.fields[0].categories
    with pytest.raises(TabularDataError, match=r"'age' \(declared numeric in tabular.json\), case 'a': value 'forty' "
                                               r"is not a number"):
        schema({"fields": [{"name": "age", "type": "numeric"}]}, rows=rows)


def test_non_finite_number_in_a_prediction_table_is_refused():
    s = schema()
    with pytest.raises(TabularDataError, match=r"case 'x': numeric column 'age' has the value '1e308', which is not a "
                                               r"finite number"):
        TabularTable(s, ROWS + [{"case_id": "x", "label": "", "age": "1e308", "site": "", "marker": ""}])


def test_numeric_statistics_refuse_a_non_finite_mean():
    table = TabularTable(schema(), ROWS)
    table.rows["a"].numeric[0] = np.inf  # (encode_row refuses such cells; this guards the statistics themselves)
    with pytest.raises(TabularDataError, match=r"'age' has no finite mean/std .* in case 'a'"):
        fit_numeric_stats(table, TRAIN)


def test_declared_numeric_with_text_and_undeclared_category_are_errors():
    rows = [dict(r, age="old") if r["case_id"] == "a" else r for r in ROWS]
    with pytest.raises(TabularDataError, match="declared numeric"):
        schema({"fields": [{"name": "age", "type": "numeric"}]}, rows=rows)
    with pytest.raises(TabularDataError, match="does not list"):
        schema({"fields": [{"name": "site", "categories": ["A"]}]})
    with pytest.raises(TabularDataError, match="not columns"):
        schema({"fields": [{"name": "weight"}]})


def test_unseen_label_missing_row_and_unlabelled_training_case_are_errors():
    s = schema()
    with pytest.raises(TabularDataError, match="'medium' is not one of the classes"):
        TabularTable(s, ROWS + [{"case_id": "x", "label": "medium", "age": "", "site": "", "marker": ""}])
    table = TabularTable(s, ROWS)
    with pytest.raises(TabularDataError, match=r"no tabular row for case\(s\) \['zz'\]"):
        table.batch(["a", "zz"])
    with pytest.raises(TabularDataError, match=r"\['t'\] have no label"):
        table.require(["a", "t"], labelled=True)
    with pytest.raises(TabularDataError, match="more than one row"):
        TabularTable(s, ROWS + [ROWS[0]])


def test_numeric_statistics_use_training_rows_only():
    s = schema()
    table = TabularTable(s, ROWS)
    mean, std = fit_numeric_stats(table, TRAIN)
    assert mean[0] == pytest.approx(np.mean([60, 40, 80])) and std[0] == pytest.approx(np.std([60, 40, 80]))
    assert mean[1] == pytest.approx(np.mean([1.5, 0.5, 0.7]))
    changed = [dict(r, age="-5000", marker="-77") if r["case_id"] in ("v", "t") else r for r in ROWS]
    mean2, std2 = fit_numeric_stats(TabularTable(s, changed), TRAIN)
    assert np.array_equal(mean, mean2) and np.array_equal(std, std2)


def test_tokenizer_shapes_missing_and_excluded_fields():
    s = schema({"fields": [{"name": "marker", "exclude": True}]})
    torch.manual_seed(0)
    tokenizer = TabularTokenizer(s.vocabulary_sizes, len(s.numeric_fields), num_latents=5, d=8, embed_dim=16)
    table = TabularTable(s, ROWS)
    mean, std = fit_numeric_stats(table, TRAIN)
    tokenizer.set_numeric_stats(mean, std)
    tokens = tokenizer(table.batch(["a", "b", "t"]))
    assert tokens.shape == (3, 5, 8) and torch.isfinite(tokens).all()
    # two rows that differ only in the excluded column give identical tokens
    other = [dict(r, marker="123") for r in ROWS]
    assert torch.equal(tokenizer(TabularTable(s, other).batch(["a"])), tokenizer(table.batch(["a"])))
    tokens.sum().backward()
    assert tokenizer.missing_vector.grad.abs().sum() > 0  # case "b" has a missing age
    with pytest.raises(ValueError, match="numeric statistics"):
        tokenizer.set_numeric_stats([0.0, 1.0], [1.0, 1.0])


def test_tokenizer_bad_options():
    with pytest.raises(ValueError, match="at least one field"):
        TabularTokenizer([], 0, 4, 8)
    with pytest.raises(ValueError, match=">= 1 category"):
        TabularTokenizer([0], 1, 4, 8)


def test_csv_and_json_readers(tmp_path):
    path = tmp_path / "tabular.csv"
    path.write_text("case_id,label,x\na,1,2\nb,0\n")
    with pytest.raises(TabularDataError, match="line 3: 2 cells"):
        read_csv_rows(path)
    path.write_text("case_id,label,label\n")
    with pytest.raises(TabularDataError, match="duplicate column"):
        read_csv_rows(path)
    json_path = tmp_path / "tabular.json"
    json_path.write_text('{"classes": ["a"], "colour": 1}')
    with pytest.raises(TabularDataError, match="unknown key"):
        load_tabular_json(json_path)
    json_path.write_text('{"fields": [{"name": "x", "type": "text"}]}')
    with pytest.raises(TabularDataError, match="expected 'numeric'"):
        load_tabular_json(json_path)
    assert load_tabular_json(tmp_path / "absent.json") == {}


@pytest.mark.parametrize("groups,channels,expected", [
    (None, 3, [[0, 1, 2]]),
    ({"clinic": [0, 1, 2], "derm": [3, 4, 5]}, 6, [[0, 1, 2], [3, 4, 5]]),
    ([[0], [1]], 3, [[0], [1]]),
])
def test_image_groups(groups, channels, expected):
    overrides = {} if groups is None else {"image_groups": groups}
    assert image_groups_from_json(overrides, channels) == expected


@pytest.mark.parametrize("groups,message", [([[0, 1], [1]], "two image groups"), ([[0, 5]], "channel"),
                                            ([[]], "empty group")])
def test_bad_image_groups(groups, message):
    with pytest.raises(TabularDataError, match=message):
        image_groups_from_json({"image_groups": groups}, 3)
