"""Case-level classification metrics (scikit-learn) and evaluation of prediction CSVs.

AUC is the primary metric: binary -> ROC-AUC on P(class 1); multi-class -> macro one-vs-rest ROC-AUC (as CFCML's
``roc_auc_score(one-hot labels, softmax)``). Fix of an official-code bug: AUPRC is computed from probabilities, not
from hard predictions. Metrics that are undefined for the given labels (e.g. AUC when a class is absent) are NaN.
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nnunet_ext.errors import InputError


def classification_metrics(y_true: Sequence[int] | np.ndarray, probabilities: np.ndarray,
                           classes: Sequence[str]) -> dict[str, Any]:
    """Metrics of one set of predictions.

    Args:
        y_true: ``[N]`` true class indices in ``[0, K)``.
        probabilities: ``[N, K]`` class probabilities (rows sum to 1).
        classes: the K class names (keys of the per-class entries).

    Returns:
        ``auc``, ``accuracy``, ``balanced_accuracy``, ``f1_macro``, ``f1_weighted``, ``mcc``, ``per_class``
        (``{name: {sensitivity, specificity, f1, support}}``) and, for K = 2, ``sensitivity``/``specificity``
        (class 1 positive), ``gmean`` and ``auprc``.

    Raises:
        ValueError: inconsistent shapes or labels outside ``[0, K)``.
    """
    from sklearn import metrics

    y_true = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    k = len(classes)
    if probabilities.ndim != 2 or probabilities.shape != (y_true.shape[0], k):
        raise ValueError(f"probabilities must be [N={y_true.shape[0]}, K={k}], got {probabilities.shape}")
    if y_true.size == 0:
        raise ValueError("no cases to evaluate")
    if y_true.min() < 0 or y_true.max() >= k:
        raise ValueError(f"labels must lie in [0, {k}), got {sorted(set(y_true.tolist()))}")
    y_pred = probabilities.argmax(1)
    present = np.unique(y_true)
    result: dict[str, Any] = {"num_cases": int(y_true.size)}
    if present.size < 2:
        result["auc"] = math.nan
    elif k == 2:
        result["auc"] = float(metrics.roc_auc_score(y_true, probabilities[:, 1]))
    elif present.size < k:
        result["auc"] = math.nan  # macro one-vs-rest needs every class
    else:
        result["auc"] = float(metrics.roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro",
                                                    labels=list(range(k))))
    labels = list(range(k))
    result["accuracy"] = float(metrics.accuracy_score(y_true, y_pred))
    result["balanced_accuracy"] = float(np.mean([np.mean(y_pred[y_true == c] == c) for c in present]))
    result["f1_macro"] = float(metrics.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    result["f1_weighted"] = float(metrics.f1_score(y_true, y_pred, labels=labels, average="weighted",
                                                   zero_division=0))
    result["mcc"] = float(metrics.matthews_corrcoef(y_true, y_pred))
    confusion = metrics.confusion_matrix(y_true, y_pred, labels=labels)
    f1 = metrics.f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    per_class = {}
    for c, name in enumerate(classes):
        tp = confusion[c, c]
        fn = confusion[c].sum() - tp
        fp = confusion[:, c].sum() - tp
        tn = confusion.sum() - tp - fn - fp
        per_class[name] = {"sensitivity": float(tp / (tp + fn)) if tp + fn else math.nan,
                           "specificity": float(tn / (tn + fp)) if tn + fp else math.nan,
                           "f1": float(f1[c]), "support": int(tp + fn)}
    result["per_class"] = per_class
    result["confusion_matrix"] = confusion.tolist()
    if k == 2:
        positive = per_class[classes[1]]
        result["sensitivity"], result["specificity"] = positive["sensitivity"], positive["specificity"]
        result["gmean"] = float(math.sqrt(positive["sensitivity"] * positive["specificity"]))
        result["auprc"] = (float(metrics.average_precision_score(y_true, probabilities[:, 1]))
                           if present.size == 2 else math.nan)
    return result


def read_predictions_csv(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """``(case_ids, classes, probabilities [N, K])`` of a ``predict-cls`` / ``validation_cls.csv`` file.

    Class columns are the ``prob_<class>`` columns, in file order.

    Raises:
        InputError: no case_id or prob_<class> column, or a probability cell that is not a number.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c for c in (reader.fieldnames or []) if c.startswith("prob_")]
        if "case_id" not in (reader.fieldnames or []) or not columns:
            raise InputError(f"{path}: expected columns case_id and prob_<class>, got {reader.fieldnames}")
        rows = list(reader)
    cases = [r["case_id"] for r in rows]
    values = []
    for line_number, row in enumerate(rows, start=2):
        try:
            values.append([float(row[c]) for c in columns])
        except (TypeError, ValueError):  # a short row (None) or a non-number
            raise InputError(f"{path} line {line_number} (case {row['case_id']!r}): expected a number in every "
                             f"prob_<class> column, got {[row[c] for c in columns]}") from None
    probabilities = np.array(values, dtype=np.float64).reshape(-1, len(columns))
    return cases, [c[len("prob_"):] for c in columns], probabilities


def evaluate_predictions_csv(predictions_csv: str | os.PathLike, labels_csv: str | os.PathLike,
                             id_column: str = "case_id", label_column: str = "label") -> dict[str, Any]:
    """Metrics of a predictions CSV against the labels of a tabular CSV (joined on the case id).

    Every predicted case must have a label among the prediction's classes; label cells may be class names or
    (for integer classes) the same integers.

    Raises:
        InputError: a predictions file without case_id/prob_<class> columns or with a non-number probability, a
            labels file without the id or label column, cases without a label, or labels that are not among the
            predicted classes.
    """
    from nnunet_ext.cfcml.tabular import _label_key, read_csv_rows

    cases, classes, probabilities = read_predictions_csv(predictions_csv)
    header, rows = read_csv_rows(labels_csv)
    absent = [c for c in (id_column, label_column) if c not in header]
    if absent:
        raise InputError(f"{labels_csv}: column(s) {absent} not found; expected {id_column} and {label_column} in "
                         f"the header {header}")
    labels = {r[id_column]: _label_key(r[label_column]) for r in rows if r.get(label_column, "").strip()}
    missing = [c for c in cases if c not in labels]
    if missing:
        raise InputError(f"{labels_csv}: no label for predicted case(s) {missing[:20]}")
    unknown = sorted({labels[c] for c in cases} - set(classes))
    if unknown:
        raise InputError(f"{labels_csv}: label(s) {unknown} are not among the predicted classes {classes}")
    y_true = np.array([classes.index(labels[c]) for c in cases])
    return classification_metrics(y_true, probabilities, classes)


def summarise_runs(results: Sequence[Mapping[str, Any]],
                   keys: Sequence[str] = ("auc", "balanced_accuracy", "accuracy", "f1_macro")) -> dict[str, dict]:
    """Mean and (sample) standard deviation over folds/seeds of scalar metrics, NaNs ignored."""
    summary = {}
    for key in keys:
        values = np.array([r[key] for r in results if key in r], dtype=np.float64)
        finite = values[np.isfinite(values)]
        summary[key] = {"mean": float(finite.mean()) if finite.size else math.nan,
                        "std": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
                        "n": int(finite.size)}
    return summary
