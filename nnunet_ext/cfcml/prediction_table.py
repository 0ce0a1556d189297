"""The table ``predict-cls`` reads: checked against the trained schema before any image is touched (issue 17.5).

A feature column of the trained schema that the table lacks would silently become "missing" for every case, so it
is refused unless the caller allows it (then one warning per column). A categorical value the training cases never
had is encoded as missing, as in training, with one warning per column and value (with its number of rows among
the predicted cases).
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterable

from nnunet_ext.cfcml.tabular import TabularDataError, TabularSchema, TabularTable, is_missing, read_csv_rows


class TabularDataWarning(UserWarning):
    """Prediction input that is used, but not as written (missing column, unseen category)."""


def read_prediction_table(schema: TabularSchema, path: str | os.PathLike, cases: Iterable[str],
                          allow_missing_columns: bool = False) -> TabularTable:
    """``path`` encoded with the trained ``schema``; warns about what ``cases`` will see as missing.

    Args:
        cases: the cases to predict (only their rows are counted for the unseen-category warnings).
        allow_missing_columns: a feature column absent from the table is missing for every case (one
            :class:`TabularDataWarning` per column) instead of an error.

    Raises:
        TabularDataError: no id column; feature columns absent (naming them) without ``allow_missing_columns``;
            a bad cell (see :func:`nnunet_ext.cfcml.tabular.encode_row`).
    """
    header, rows = read_csv_rows(path)
    if schema.id_column not in header:
        raise TabularDataError(f"{path}: column {schema.id_column!r} is missing; columns are {header}")
    absent = [f.name for f in schema.fields if f.name not in header]
    if absent and not allow_missing_columns:
        raise TabularDataError(f"{path}: feature column(s) {absent} of the trained model are missing (columns are "
                               f"{header}); add them, or pass --allow-missing-columns to predict with them missing "
                               f"for every case")
    table = TabularTable(schema, rows, str(path))
    for name in absent:
        warnings.warn(f"{path}: feature column {name!r} is missing: it is treated as missing for every case",
                      TabularDataWarning, stacklevel=2)
    wanted = set(cases)
    for (name, value), count in unseen_categories(schema, (r for r in rows if r[schema.id_column] in wanted)).items():
        warnings.warn(f"{path}: column {name!r} has the value {value!r} in {count} row(s), a category the training "
                      f"cases never had: treated as missing (known: {_preview(schema, name)})",
                      TabularDataWarning, stacklevel=2)
    return table


def unseen_categories(schema: TabularSchema, rows: Iterable[dict[str, str]]) -> Counter:
    """``{(column, value): number of rows}`` of non-missing categorical values outside the trained vocabularies."""
    counts: Counter = Counter()
    for row in rows:
        for field in schema.categorical_fields:
            value = row.get(field.name)
            if not is_missing(value) and value not in field.categories:
                counts[field.name, value] += 1
    return counts


def _preview(schema: TabularSchema, name: str, limit: int = 10) -> str:
    categories = next(f.categories for f in schema.categorical_fields if f.name == name)
    return ", ".join(map(repr, categories[:limit])) + (" ..." if len(categories) > limit else "")
