"""Tabular-only reference for the PH2 classification benchmark (docs/benchmarks.md), not an nnU-Net trainer.

A multinomial logistic regression (scikit-learn) on the one-hot-encoded PH2 attributes of ``tabular.csv``, fitted
on each fold's training cases of ``splits_final.json`` and evaluated on its validation cases with the metrics the
benchmark uses (``nnunet_ext.cfcml.metrics.classification_metrics``). It shows how much of the diagnosis the
dermatologist-scored attributes alone explain.

    python examples/ph2_tabular_reference.py "$nnUNet_preprocessed/Dataset601_PH2"
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from sklearn.linear_model import LogisticRegression

from nnunet_ext.cfcml.metrics import classification_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preprocessed_dataset", type=Path,
                        help="preprocessed dataset folder holding tabular.csv and splits_final.json "
                             "(written by nnunet-ext configure cfcml)")
    folder = parser.parse_args().preprocessed_dataset
    with open(folder / "tabular.csv", newline="") as f:
        rows = {row["case_id"]: row for row in csv.DictReader(f)}
    splits = json.loads((folder / "splits_final.json").read_text())
    features = [c for c in next(iter(rows.values())) if c not in ("case_id", "label")]
    for fold, split in enumerate(splits):
        train, val = split["train"], split["val"]
        classes = sorted({rows[k]["label"] for k in train})
        # vocabulary from the training cases only; an unseen value encodes as all zeros
        vocabulary = {c: sorted({rows[k][c] for k in train}) for c in features}

        def encode(case: str) -> list[float]:
            return [float(rows[case][c] == v) for c in features for v in vocabulary[c]]

        model = LogisticRegression(max_iter=2000).fit([encode(k) for k in train],
                                                      [classes.index(rows[k]["label"]) for k in train])
        result = classification_metrics([classes.index(rows[k]["label"]) for k in val],
                                        model.predict_proba([encode(k) for k in val]), classes)
        print(f"fold {fold}: macro AUC {result['auc']:.3f}  balanced accuracy {result['balanced_accuracy']:.3f}  "
              f"accuracy {result['accuracy']:.3f}  macro F1 {result['f1_macro']:.3f}")


if __name__ == "__main__":
    main()
