"""Tabular sidecar of a classification dataset: ``tabular.csv`` (+ optional ``tabular.json``).

Data contract (issue 7): ``tabular.csv`` lives in the raw dataset root. Column ``case_id`` holds nnU-Net case
identifiers, column ``label`` the class (integers or names), every other column is a feature. Empty cells and the
markers ``nan``, ``NA``, ``n/a``, ``none``, ``null`` are missing values. Column types (issue 17): a column whose
non-missing cells (in any row) are all numbers is numeric, one without any number is categorical, and one with
both is refused, naming a row and value ("forty", "1,059" in an age column), unless ``tabular.json`` declares its
type. A numeric cell must be finite within float32 (the network's input type): ``inf`` or ``1e308`` is refused.
``tabular.json`` may override column names and types, declare classes and category vocabularies, exclude columns,
define the image groups (CFCML image modalities) and flag a mask-free dataset::

    {"classes": ["NEV", "MEL"], "id_column": "case_id", "label_column": "label",
     "image_groups": {"clinic": [0, 1, 2], "derm": [3, 4, 5]}, "mask_free": true,
     "fields": [{"name": "sex", "type": "categorical", "categories": ["female", "male"]},
                {"name": "management", "exclude": true}, {"name": "age", "type": "numeric"}]}

Missing values are encoded without imputation from other cases: a missing or unseen category maps to the
reserved index 0; a missing number is flagged (the network adds a learned "missing" vector) and its normalised
value is 0, i.e. the training-fold mean. Numeric statistics are fitted on the training fold only
(:func:`fit_numeric_stats`).
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nnunet_ext.errors import InputError

TABULAR_CSV = "tabular.csv"
TABULAR_JSON = "tabular.json"
UNKNOWN_INDEX = 0
FLOAT32_MAX = float(np.finfo(np.float32).max)
MISSING_MARKERS = ("nan", "na", "n/a", "none", "null")
_JSON_KEYS = {"classes", "id_column", "label_column", "image_groups", "fields", "mask_free"}
_FIELD_KEYS = {"name", "type", "categories", "exclude", "text"}


class TabularDataError(InputError):
    """Bad tabular sidecar (missing rows, unknown labels, empty columns, ...), raised before training starts."""


@dataclass
class TabularBatch:
    """Tabular inputs of a batch of ``B`` cases (fields in schema order, categorical and numeric separately).

    Attributes:
        categorical: ``[B, F_cat]`` int64 category indices, 0 = missing/unknown.
        numeric: ``[B, F_num]`` float32 raw values (0 where missing); normalised inside the network.
        missing: ``[B, F_num]`` bool, True where the numeric value is missing.
    """

    categorical: torch.Tensor
    numeric: torch.Tensor
    missing: torch.Tensor

    def to(self, device: torch.device | str) -> TabularBatch:
        return TabularBatch(self.categorical.to(device), self.numeric.to(device), self.missing.to(device))

    def __len__(self) -> int:
        return int(self.categorical.shape[0])


def is_missing(value: str | None) -> bool:
    """An absent cell, an empty one or one of :data:`MISSING_MARKERS` (case-insensitive)."""
    return value is None or value.strip() == "" or value.strip().lower() in MISSING_MARKERS


def _parse_number(value: str) -> float | None:
    """The number a cell spells (possibly ``inf`` or beyond float32), or None for text."""
    try:
        return float(value)
    except ValueError:
        return None


def _is_finite32(number: float) -> bool:
    # numeric inputs are float32 tensors: 1e308 is a finite float64 but becomes inf there (NaN statistics)
    return math.isfinite(number) and abs(number) <= FLOAT32_MAX


def _parse_float(value: str) -> float | None:
    """The finite (float32-range) number a cell holds, or None."""
    number = _parse_number(value)
    return number if number is not None and _is_finite32(number) else None


def numeric_cell_problem(value: str) -> str | None:
    """Why a non-missing cell cannot be a numeric value (None when it can)."""
    number = _parse_number(value)
    if number is None:
        return "is not a number"
    if not _is_finite32(number):
        return f"is not a finite number within float32 range (|x| <= {FLOAT32_MAX:.3g})"
    return None


def _label_key(value: str) -> str:
    """Canonical form of a label cell: integer-valued numbers lose their decimals ("1.0" -> "1")."""
    value = value.strip()
    number = _parse_float(value)
    if number is not None and float(number).is_integer():
        return str(int(number))
    return value


def read_csv_rows(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows (dicts of stripped strings) of a CSV file.

    Raises:
        TabularDataError: empty file, duplicate column names or a row with a different number of cells.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise TabularDataError(f"{path}: empty file, expected a header line with case_id, label and features")
        if len(set(header)) != len(header):
            raise TabularDataError(f"{path}: duplicate column names in the header {header}")
        rows = []
        for line_number, cells in enumerate(reader, start=2):
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise TabularDataError(f"{path}, line {line_number}: {len(cells)} cells, the header has {len(header)}")
            rows.append({h: c.strip() for h, c in zip(header, cells)})
    return header, rows


@dataclass
class FieldSpec:
    """One feature column. ``categories`` is the frozen vocabulary of a categorical field (index i+1)."""

    name: str
    type: str  # "numeric" | "categorical"
    categories: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.categories is not None:
            out["categories"] = list(self.categories)
        return out


@dataclass
class TabularSchema:
    """Resolved, frozen description of the table: what the network's embedding sizes are built from.

    Stored in the plans (``nnunet_ext.cfcml.schema``) so that the predictor rebuilds the same network.
    """

    classes: list[str]
    fields: list[FieldSpec]
    id_column: str = "case_id"
    label_column: str = "label"
    excluded: tuple[str, ...] = ()

    @property
    def categorical_fields(self) -> list[FieldSpec]:
        return [f for f in self.fields if f.type == "categorical"]

    @property
    def numeric_fields(self) -> list[FieldSpec]:
        return [f for f in self.fields if f.type == "numeric"]

    @property
    def vocabulary_sizes(self) -> list[int]:
        """Category count of each categorical field (without the reserved unknown index)."""
        return [len(f.categories or []) for f in self.categorical_fields]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "id_column": self.id_column, "label_column": self.label_column,
                "fields": [f.to_dict() for f in self.fields], "excluded": list(self.excluded)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TabularSchema:
        fields = [FieldSpec(f["name"], f["type"], list(f["categories"]) if f.get("categories") is not None else None)
                  for f in data["fields"]]
        return cls(list(data["classes"]), fields, data.get("id_column", "case_id"),
                   data.get("label_column", "label"), tuple(data.get("excluded", ())))

    def class_index(self, label: str, where: str) -> int:
        """Index of a label cell's class; integer labels may also be given as class indices.

        Raises:
            TabularDataError: the label is not one of the classes.
        """
        key = _label_key(label)
        if key in self.classes:
            return self.classes.index(key)
        raise TabularDataError(f"{where}: label {label!r} is not one of the classes {self.classes} seen in training "
                               f"(declared in tabular.json or found among the training cases)")


def load_tabular_json(path: str | os.PathLike | None) -> dict[str, Any]:
    """The optional ``tabular.json`` (``{}`` when ``path`` is None or absent), checked for unknown keys."""
    if path is None or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise TabularDataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TabularDataError(f"{path}: expected a JSON object")
    unknown = sorted(set(data) - _JSON_KEYS)
    if unknown:
        raise TabularDataError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(_JSON_KEYS)}")
    for field in data.get("fields", []):
        if not isinstance(field, dict) or "name" not in field:
            raise TabularDataError(f"{path}: every entry of 'fields' needs a 'name', got {field!r}")
        bad = sorted(set(field) - _FIELD_KEYS)
        if bad:
            raise TabularDataError(f"{path}: field {field['name']!r} has unknown key(s) {bad}; allowed: "
                                   f"{sorted(_FIELD_KEYS)}")
        if field.get("type") not in (None, "numeric", "categorical"):
            raise TabularDataError(f"{path}: field {field['name']!r} has type {field['type']!r}; expected 'numeric' "
                                   f"or 'categorical'")
    return data


def _column_type(name: str, rows: Sequence[Mapping[str, str]], id_column: str, where: str) -> str:
    """"numeric" when every non-missing cell spells a number, "categorical" when none does.

    Rows of every split are looked at (only types, not vocabularies, come from them), so that a typo in a test
    row cannot silently turn into an unseen category.

    Raises:
        TabularDataError: the column mixes numbers and text, naming the first text cell's case and value.
    """
    cells = [(row[id_column], row[name]) for row in rows if not is_missing(row[name])]
    numbers = [(case, v) for case, v in cells if _parse_number(v) is not None]
    texts = [(case, v) for case, v in cells if _parse_number(v) is None]
    if not texts:
        return "numeric"
    if not numbers:
        return "categorical"
    # name a cell of the minority kind: the likely typo ("forty" among ages, "5" among site names)
    (odd_case, odd), majority, kind = ((texts[0], numbers, "numbers") if len(texts) <= len(numbers)
                                       else (numbers[0], texts, "text"))
    raise TabularDataError(
        f"{where}: column {name!r} mixes numbers and text: case {odd_case!r} has {odd!r}, while {len(majority)} of "
        f"{len(cells)} non-empty cells are {kind} (e.g. case {majority[0][0]!r}: {majority[0][1]!r}); write numbers "
        f"without units or thousands separators and missing values as an empty cell, or declare the column in "
        f"tabular.json "
        f"as {{\"name\": \"{name}\", \"type\": \"categorical\"}} (or \"numeric\")")


def infer_schema(header: Sequence[str], rows: Sequence[Mapping[str, str]], training_ids: Iterable[str],
                 overrides: Mapping[str, Any] | None = None, where: str = TABULAR_CSV) -> TabularSchema:
    """Resolve classes, field types and vocabularies from the training cases' rows (and ``tabular.json``).

    Only rows of ``training_ids`` decide undeclared vocabularies and classes, so validation or test rows never
    shape the encoding. Vocabularies are sorted (numbers numerically) and then frozen.

    Raises:
        TabularDataError: missing id/label column, fewer than two classes, no feature column, a feature column
            that is entirely empty among the training cases, an undeclared column mixing numbers and text, a
            numeric cell that is text or not finite (in any row), a declared type that does not fit the data.
    """
    overrides = dict(overrides or {})
    id_column = overrides.get("id_column", "case_id")
    label_column = overrides.get("label_column", "label")
    for column in (id_column, label_column):
        if column not in header:
            raise TabularDataError(f"{where}: column {column!r} is missing; columns are {list(header)}")
    training_ids = set(training_ids)
    train_rows = [r for r in rows if r[id_column] in training_ids]
    declared = {f["name"]: f for f in overrides.get("fields", [])}
    unknown = sorted(set(declared) - set(header))
    if unknown:
        raise TabularDataError(f"tabular.json declares field(s) {unknown} that are not columns of {where}")
    excluded = tuple(n for n, f in declared.items() if f.get("exclude"))

    if "classes" in overrides:
        classes = [_label_key(str(c)) for c in overrides["classes"]]
        if len(set(classes)) != len(classes):
            raise TabularDataError(f"tabular.json: duplicate classes in {overrides['classes']}")
    else:
        values = {_label_key(r[label_column]) for r in train_rows if not is_missing(r[label_column])}
        numbers = {v: _parse_float(v) for v in values}
        if values and all(n is not None for n in numbers.values()):
            classes = sorted(values, key=lambda v: numbers[v])
        else:
            classes = sorted(values)
    if len(classes) < 2:
        raise TabularDataError(f"{where}: a classification needs at least two classes, found {classes} among the "
                               f"labels of the {len(train_rows)} training cases")

    fields = []
    for name in header:
        if name in (id_column, label_column) or name in excluded:
            continue
        spec = declared.get(name, {})
        present = [r[name] for r in train_rows if not is_missing(r[name])]
        if not present:
            raise TabularDataError(f"{where}: feature column {name!r} is empty for every training case; remove it or "
                                   f"mark it {{\"name\": \"{name}\", \"exclude\": true}} in tabular.json")
        kind = spec.get("type") or _column_type(name, rows, id_column, where)
        if kind == "numeric":
            for row in rows:
                value = row[name]
                problem = None if is_missing(value) else numeric_cell_problem(value)
                if problem:
                    declared_how = "declared numeric in tabular.json" if spec.get("type") else "numeric"
                    raise TabularDataError(f"{where}: column {name!r} ({declared_how}), case {row[id_column]!r}: "
                                           f"value {value!r} {problem}; fix the cell or leave it empty (missing)")
            fields.append(FieldSpec(name, "numeric"))
            continue
        if spec.get("categories") is not None:
            categories = [str(c) for c in spec["categories"]]
            undeclared = sorted(set(present) - set(categories))
            if undeclared:
                raise TabularDataError(f"{where}: column {name!r} has values {undeclared[:5]} that tabular.json does "
                                       f"not list in its categories {categories}")
        else:
            unique = set(present)
            as_numbers = {v: _parse_float(v) for v in unique}
            if all(n is not None for n in as_numbers.values()):
                categories = sorted(unique, key=lambda v: as_numbers[v])
            else:
                categories = sorted(unique)
        fields.append(FieldSpec(name, "categorical", categories))
    if not fields:
        raise TabularDataError(f"{where}: no feature columns besides {id_column!r} and {label_column!r} "
                               f"(excluded: {list(excluded)})")
    return TabularSchema(classes, fields, id_column, label_column, excluded)


@dataclass
class EncodedRow:
    categorical: np.ndarray  # [F_cat] int64
    numeric: np.ndarray  # [F_num] float32 (0 where missing)
    missing: np.ndarray  # [F_num] bool
    label: int  # class index, -1 when the row has no label


def encode_row(schema: TabularSchema, row: Mapping[str, str], where: str) -> EncodedRow:
    """Encode one CSV row with the frozen schema (unseen categories -> 0, like missing ones)."""
    categorical = np.zeros(len(schema.categorical_fields), dtype=np.int64)
    for i, field in enumerate(schema.categorical_fields):
        value = row.get(field.name)
        if not is_missing(value):
            categorical[i] = field.categories.index(value) + 1 if value in field.categories else UNKNOWN_INDEX
    numeric = np.zeros(len(schema.numeric_fields), dtype=np.float32)
    missing = np.ones(len(schema.numeric_fields), dtype=bool)
    for i, field in enumerate(schema.numeric_fields):
        value = row.get(field.name)
        if is_missing(value):
            continue
        problem = numeric_cell_problem(value)
        if problem:
            raise TabularDataError(f"{where}: numeric column {field.name!r} has the value {value!r}, which {problem}")
        numeric[i], missing[i] = float(value), False
    label_cell = row.get(schema.label_column)
    label = -1 if is_missing(label_cell) else schema.class_index(label_cell, where)
    return EncodedRow(categorical, numeric, missing, label)


class TabularTable:
    """Encoded rows keyed by case identifier; builds :class:`TabularBatch` es and label tensors for batch keys."""

    def __init__(self, schema: TabularSchema, rows: Sequence[Mapping[str, str]], where: str = TABULAR_CSV):
        self.schema = schema
        self.where = where
        self.rows: dict[str, EncodedRow] = {}
        for row in rows:
            case = row[schema.id_column]
            if case in self.rows:
                raise TabularDataError(f"{where}: case {case!r} appears in more than one row")
            self.rows[case] = encode_row(schema, row, f"{where}, case {case!r}")

    @classmethod
    def from_csv(cls, schema: TabularSchema, path: str | os.PathLike) -> TabularTable:
        header, rows = read_csv_rows(path)
        if schema.id_column not in header:
            raise TabularDataError(f"{path}: column {schema.id_column!r} is missing; columns are {header}")
        return cls(schema, rows, str(path))

    def require(self, keys: Iterable[str], labelled: bool = False) -> None:
        """Raise naming every key without a row (or, with ``labelled``, without a label)."""
        keys = list(keys)
        missing = sorted(str(k) for k in keys if k not in self.rows)
        if missing:
            raise TabularDataError(f"{self.where}: no tabular row for case(s) {missing[:20]}"
                                   f"{' ...' if len(missing) > 20 else ''} ({len(missing)} of {len(keys)})")
        if labelled:
            unlabelled = sorted(str(k) for k in keys if self.rows[k].label < 0)
            if unlabelled:
                raise TabularDataError(f"{self.where}: training case(s) {unlabelled[:20]} have no label")

    def batch(self, keys: Sequence[str]) -> TabularBatch:
        self.require(keys)
        rows = [self.rows[k] for k in keys]
        n_cat, n_num = len(self.schema.categorical_fields), len(self.schema.numeric_fields)
        return TabularBatch(
            torch.from_numpy(np.stack([r.categorical for r in rows]) if rows else np.zeros((0, n_cat), np.int64)),
            torch.from_numpy(np.stack([r.numeric for r in rows]) if rows else np.zeros((0, n_num), np.float32)),
            torch.from_numpy(np.stack([r.missing for r in rows]) if rows else np.zeros((0, n_num), bool)),
        )

    def labels(self, keys: Sequence[str]) -> torch.Tensor:
        """``[B]`` int64 class indices (-1 for unlabelled rows)."""
        self.require(keys)
        return torch.tensor([self.rows[k].label for k in keys], dtype=torch.long)


def fit_numeric_stats(table: TabularTable, training_keys: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of every numeric field over the **training** keys' non-missing values.

    Validation and test rows never enter (no leakage). A constant field gets std 1.

    Returns:
        ``(mean [F_num], std [F_num])`` float32.

    Raises:
        TabularDataError: a column without values in this fold, or whose mean or std is not a finite float32.
    """
    keys = list(training_keys)
    table.require(keys)
    n_num = len(table.schema.numeric_fields)
    mean, std = np.zeros(n_num, np.float32), np.ones(n_num, np.float32)
    for i, field in enumerate(table.schema.numeric_fields):
        values = np.array([table.rows[k].numeric[i] for k in keys if not table.rows[k].missing[i]], np.float64)
        if values.size == 0:
            raise TabularDataError(f"{table.where}: numeric column {field.name!r} is empty for every case of this "
                                   f"training fold")
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is refused below
            mean[i] = values.mean()
            sd = values.std()
        std[i] = sd if sd > 1e-8 else 1.0
        if not (np.isfinite(mean[i]) and np.isfinite(std[i])):
            # a NaN mean would turn every case's normalised value into NaN: refuse instead of a warning
            largest = max((k for k in keys if not table.rows[k].missing[i]),
                          key=lambda k: abs(float(table.rows[k].numeric[i])))
            raise TabularDataError(f"{table.where}: numeric column {field.name!r} has no finite mean/std over this "
                                   f"training fold (mean {mean[i]}, std {std[i]}); largest value "
                                   f"{float(table.rows[largest].numeric[i])!r} in case {largest!r}")
    return mean, std


def image_groups_from_json(overrides: Mapping[str, Any], num_channels: int) -> list[list[int]]:
    """CFCML image modalities as groups of input channels: from ``tabular.json`` or one group of all channels.

    Raises:
        TabularDataError: a group is empty, uses an unknown channel, or channels appear in two groups.
    """
    groups = overrides.get("image_groups")
    if groups is None:
        return [list(range(num_channels))]
    if isinstance(groups, Mapping):
        groups = list(groups.values())
    groups = [list(map(int, g)) for g in groups]
    seen: set[int] = set()
    for group in groups:
        if not group:
            raise TabularDataError("tabular.json: image_groups contains an empty group")
        bad = [c for c in group if not 0 <= c < num_channels]
        if bad:
            raise TabularDataError(f"tabular.json: image_groups uses channel(s) {bad}; the dataset has channels "
                                   f"0..{num_channels - 1}")
        if seen & set(group):
            raise TabularDataError(f"tabular.json: channel(s) {sorted(seen & set(group))} appear in two image groups")
        seen |= set(group)
    return groups
