"""``predict-cls`` table checks (issue 17.5): a missing feature column is refused unless allowed, then warned
about once; an unseen category is warned about once per column and value, with its row count."""
from __future__ import annotations

import re
import warnings

import pytest

from nnunet_ext.cfcml.commands import tabular_warnings_as_lines
from nnunet_ext.cfcml.prediction_table import TabularDataWarning, read_prediction_table
from nnunet_ext.cfcml.tabular import FieldSpec, TabularDataError, TabularSchema
from nnunet_ext.cli import build_parser

SCHEMA = TabularSchema(["low", "high"], [FieldSpec("age", "numeric"), FieldSpec("site", "categorical", ["A", "B"]),
                                         FieldSpec("sex", "categorical", ["f", "m"])])


def write_table(tmp_path, text):
    path = tmp_path / "test.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize("header,absent", [
    ("case_id,site,sex", ["age"]),
    ("case_id,age", ["site", "sex"]),
])
def test_missing_feature_column_is_refused_naming_it(tmp_path, header, absent):
    path = write_table(tmp_path, f"{header}\nx{',1' * (header.count(','))}\n")
    with pytest.raises(TabularDataError, match=re.escape(f"feature column(s) {absent} of the trained model are "
                                                         f"missing") + ".*--allow-missing-columns"):
        read_prediction_table(SCHEMA, path, ["x"])


def test_allowed_missing_column_warns_once_per_column_and_is_missing(tmp_path):
    path = write_table(tmp_path, "case_id,age\nx,50\ny,\n")
    with pytest.warns(TabularDataWarning) as caught:
        table = read_prediction_table(SCHEMA, path, ["x", "y"], allow_missing_columns=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "'site' is missing" in messages[0] and "'sex' is missing" in messages[1]
    assert table.batch(["x", "y"]).categorical.tolist() == [[0, 0], [0, 0]]


def test_unseen_category_warns_once_per_column_and_value_with_row_count(tmp_path):
    path = write_table(tmp_path, "case_id,label,age,site,sex\n"
                                 "x,,50,Z,f\ny,,51,Z,other\nz,,52,A,\nw,,53,Q,f\nnot_predicted,,1,Y,f\n")
    with pytest.warns(TabularDataWarning) as caught:
        table = read_prediction_table(SCHEMA, path, ["x", "y", "z", "w"])
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3  # nothing about 'Y': that row is not predicted
    assert "column 'sex' has the value 'other' in 1 row(s)" in messages[0]
    assert "column 'site' has the value 'Q' in 1 row(s)" in messages[1]
    assert "column 'site' has the value 'Z' in 2 row(s)" in messages[2] and "known: 'A', 'B'" in messages[2]
    assert table.batch(["x", "y", "z"]).categorical.tolist() == [[0, 1], [0, 0], [1, 0]]  # still encoded as missing


def test_complete_table_warns_nothing(tmp_path):
    path = write_table(tmp_path, "case_id,age,site,sex,extra\nx,50,A,m,anything\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_prediction_table(SCHEMA, path, ["x"])


def test_command_prints_each_warning_as_one_line(tmp_path, capsys):
    path = write_table(tmp_path, "case_id,age,site\nx,50,Z\n")
    for _ in range(2):  # Python would show a repeated warning only once per call site
        with tabular_warnings_as_lines("nnunet-ext predict-cls"):
            read_prediction_table(SCHEMA, path, ["x"], allow_missing_columns=True)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and all(line.startswith("nnunet-ext predict-cls: warning: ") for line in lines)


def test_predict_cls_has_the_allow_missing_columns_flag():
    argv = ["predict-cls", "-i", "in", "-o", "out.csv", "-d", "1", "-c", "2d"]
    assert build_parser().parse_args(argv).allow_missing_columns is False
    assert build_parser().parse_args([*argv, "--allow-missing-columns"]).allow_missing_columns is True
