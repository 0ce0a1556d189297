"""Classification metrics (scikit-learn) and prediction-CSV evaluation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from nnunet_ext.cfcml.metrics import (
    classification_metrics,
    evaluate_predictions_csv,
    read_predictions_csv,
    summarise_runs,
)


def test_binary_auc_uses_probability_of_class_one_and_auprc_uses_probabilities():
    y = np.array([0, 0, 1, 1, 0, 1])
    p1 = np.array([0.1, 0.45, 0.4, 0.9, 0.2, 0.6])
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, probs, ["NEV", "MEL"])
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["auprc"] == pytest.approx(average_precision_score(y, p1))
    hard = average_precision_score(y, (p1 > 0.5).astype(float))  # the official code's bug
    assert m["auprc"] != pytest.approx(hard)
    # predictions: 0 0 0 1 0 1 -> MEL sensitivity 2/3, specificity 1
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == 1.0
    assert m["gmean"] == pytest.approx(math.sqrt(2 / 3))
    assert m["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["per_class"]["MEL"]["support"] == 3


def test_multiclass_auc_is_macro_one_vs_rest():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 5)
    probs = rng.dirichlet(np.ones(3), size=15)
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == y))
    assert set(m["per_class"]) == {"a", "b", "c"} and "auprc" not in m


def test_undefined_auc_is_nan_and_bad_inputs_raise():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    assert math.isnan(classification_metrics([0, 1], probs, ["a", "b", "c"])["auc"])
    with pytest.raises(ValueError, match="probabilities must be"):
        classification_metrics([0, 1], probs[:, :2], ["a", "b", "c"])
    with pytest.raises(ValueError, match="labels must lie"):
        classification_metrics([0, 3], probs, ["a", "b", "c"])


def test_evaluate_predictions_csv(tmp_path):
    predictions = tmp_path / "pred.csv"
    predictions.write_text("case_id,prediction,prob_low,prob_high\nx,low,0.8,0.2\ny,high,0.3,0.7\nz,high,0.4,0.6\n")
    labels = tmp_path / "tabular.csv"
    labels.write_text("case_id,label,age\nx,low,3\ny,high,4\nz,low,5\nw,,6\n")
    cases, classes, probs = read_predictions_csv(predictions)
    assert cases == ["x", "y", "z"] and classes == ["low", "high"] and probs.shape == (3, 2)
    m = evaluate_predictions_csv(predictions, labels)
    assert m["auc"] == pytest.approx(1.0) and m["accuracy"] == pytest.approx(2 / 3)
    labels.write_text("case_id,label\nx,low\ny,high\n")
    with pytest.raises(ValueError, match=r"no label for predicted case\(s\) \['z'\]"):
        evaluate_predictions_csv(predictions, labels)
    labels.write_text("case_id,label\nx,low\ny,high\nz,mid\n")
    with pytest.raises(ValueError, match="not among the predicted classes"):
        evaluate_predictions_csv(predictions, labels)


def test_summarise_runs():
    summary = summarise_runs([{"auc": 0.8, "accuracy": 0.5}, {"auc": 0.9, "accuracy": math.nan},
                              {"auc": 0.7, "accuracy": 0.7}], keys=("auc", "accuracy"))
    assert summary["auc"]["mean"] == pytest.approx(0.8) and summary["auc"]["std"] == pytest.approx(0.1)
    assert summary["accuracy"]["n"] == 2 and summary["accuracy"]["mean"] == pytest.approx(0.6)
