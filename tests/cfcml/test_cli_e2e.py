"""End to end through the CLI, each step in a fresh process: configure cfcml -> nnUNetv2_train (CFCMLTrainer_smoke
from the test trainers folder) -> --c -> predict-cls -> evaluate-cls -> nnUNetv2_predict. ``test_cfcml_trainer.py`` also
tests the checkpoint round trip in-process.

Planning is done once in-process with a fast fingerprint (``cfcml_fixtures``); ``nnunet-ext plan`` itself is
covered by the planner's own tests and costs ~1.5 minutes here.
"""
from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from cfcml_fixtures import planned_classification_root
from helpers_cli import TEST_TRAINERS_DIR, console_script, run_cli, subprocess_env

pytestmark = pytest.mark.slow

DATASET = 801
NAME = "CfcmlTiny"
TRAINER = "CFCMLTrainer_smoke"
PLANS = "nnUNetCPUPlans_CFCML"



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    source = planned_classification_root(tmp_path_factory.getbasetemp(), DATASET, masks=True)
    root = shutil.copytree(source, tmp_path_factory.mktemp("e2e_cfcml") / "root")
    env = subprocess_env(root, extra_trainer_dirs=(TEST_TRAINERS_DIR,))
    raw = root / "nnUNet_raw" / f"Dataset{DATASET:03d}_{NAME}"
    run_cli([console_script("nnunet-ext"), "configure", "cfcml", "-d", str(DATASET), "-p", "nnUNetCPUPlans", "-o",
         PLANS], env)
    train_env = {**env, "nnUNet_n_proc_DA": "0"}
    run_cli([console_script("nnUNetv2_train"), str(DATASET), "2d", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"],
        train_env)
    fold = root / "nnUNet_results" / f"Dataset{DATASET:03d}_{NAME}" / f"{TRAINER}__{PLANS}__2d" / "fold_0"
    return {"root": root, "raw": raw, "env": train_env, "fold": fold}


def test_training_writes_classification_outputs(trained):
    fold = trained["fold"]
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER and checkpoint["nnunet_ext"]["family"] == "cfcml"
    logging = checkpoint["logging"]
    for key in ("cfcml_ce", "cfcml_l_sam", "cfcml_l_up", "cfcml_l_cp", "cfcml_l_seg"):
        assert len(logging[key]) == 2 and all(math.isfinite(v) for v in logging[key]), key
    for key in ("cfcml_val_auc", "cfcml_val_bacc", "cfcml_val_acc", "cfcml_val_f1_macro"):
        assert len(logging[key]) == 2, key
    best = torch.load(fold / "checkpoint_best_cls.pth", map_location="cpu", weights_only=False)
    aucs = [v for v in logging["cfcml_val_auc"] if math.isfinite(v)]
    assert best["nnunet_ext"]["state"]["best_val_auc"] == pytest.approx(max(aucs))
    rows = list(csv.DictReader(open(fold / "validation_cls.csv")))
    splits = json.loads((trained["root"] / "nnUNet_preprocessed" / f"Dataset{DATASET:03d}_{NAME}" /
                         "splits_final.json").read_text())
    assert sorted(r["case_id"] for r in rows) == sorted(splits[0]["val"])
    for row in rows:
        assert sum(float(row[f"prob_{c}"]) for c in ("atypical", "benign", "malignant")) == pytest.approx(1, abs=1e-5)
    summary = json.loads((fold / "validation_cls_summary.json").read_text())
    assert {"auc", "balanced_accuracy", "per_class"} <= set(summary["metrics"])
    assert (fold / "validation" / "summary.json").exists()  # lesion masks: nnU-Net's segmentation validation too
    plans = json.loads((fold.parent / "plans.json").read_text())
    assert "cfcml" in plans["nnunet_ext"]


def test_resume_with_c_keeps_state(trained):
    fold = trained["fold"]
    before = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    run_cli([console_script("nnUNetv2_train"), str(DATASET), "2d", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu",
         "--c"], trained["env"])
    after = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # training had finished: --c loads, re-saves and re-validates without changing a value
    for name, tensor in before["network_weights"].items():
        assert torch.equal(tensor, after["network_weights"][name]), name
    assert after["current_epoch"] == before["current_epoch"]
    assert after["nnunet_ext"]["state"]["best_val_auc"] == before["nnunet_ext"]["state"]["best_val_auc"]
    assert np.array_equal(after["logging"]["cfcml_val_auc"], before["logging"]["cfcml_val_auc"], equal_nan=True)
    assert np.array_equal(after["logging"]["cfcml_l_sam"], before["logging"]["cfcml_l_sam"], equal_nan=True)


def test_predict_cls_in_fresh_process_and_evaluate(trained):
    root, raw, env = trained["root"], trained["raw"], trained["env"]
    out = root / "predictions.csv"
    run_cli([console_script("nnunet-ext"), "predict-cls", "-i", str(raw / "imagesTs"), "-t", str(raw / "tabular.csv"),
         "-o", str(out), "-d", str(DATASET), "-c", "2d", "-f", "0", "-tr", TRAINER, "-p", PLANS], env)
    rows = list(csv.DictReader(open(out)))
    assert [r["case_id"] for r in rows] == ["ts_000", "ts_001", "ts_002"]
    classes = ["atypical", "benign", "malignant"]
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-6)
    assert [r["prediction"] for r in rows] == [classes[i] for i in probs.argmax(1)]

    # the same probabilities from the checkpoint, recomputed in this process
    from nnunet_ext.cfcml.data import crop_or_pad_to_patch
    from nnunet_ext.cfcml.predict import load_fold_network
    from nnunet_ext.cfcml.tabular import TabularSchema, TabularTable

    with pytest.MonkeyPatch.context() as mp:
        for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
            mp.setenv(key, env[key])
        network, pm, cm, dataset_json, _ = load_fold_network(str(trained["fold"].parent), 0, "checkpoint_final.pth",
                                                             torch.device("cpu"))
        schema = TabularSchema.from_dict(pm.plans["nnunet_ext"]["cfcml"]["schema"])
        table = TabularTable.from_csv(schema, raw / "tabular.csv")
        preprocessor = cm.preprocessor_class(verbose=False)
        x = np.stack([crop_or_pad_to_patch(preprocessor.run_case([str(raw / "imagesTs" / f"{c}_0000.png")], None, pm,
                                                                  cm, dataset_json)[0], cm.patch_size)
                      for c in ("ts_000", "ts_001", "ts_002")])
        with torch.no_grad():
            expected = torch.softmax(network.classify(torch.from_numpy(x), table.batch(["ts_000", "ts_001", "ts_002"])),
                                     1).numpy()
    assert np.allclose(probs, expected, atol=1e-6)

    # labelled test rows evaluate through the CLI
    labels = root / "labels.csv"
    labels.write_text("case_id,label\nts_000,benign\nts_001,atypical\nts_002,malignant\n")
    metrics = json.loads(run_cli([console_script("nnunet-ext"), "evaluate-cls", str(out), str(labels)], env).stdout)
    assert metrics["num_cases"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0


def test_predict_cls_errors(trained, monkeypatch):
    from nnunet_ext.cfcml.predict import predict_classification
    from nnunet_ext.cfcml.tabular import TabularDataError

    root, raw, env = trained["root"], trained["raw"], trained["env"]
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
        monkeypatch.setenv(key, env[key])
    partial = root / "partial.csv"
    lines = (raw / "tabular.csv").read_text().splitlines()
    partial.write_text("\n".join(line for line in lines if not line.startswith("ts_001")) + "\n")
    with pytest.raises(TabularDataError, match=r"no row for case\(s\) \['ts_001'\]"):
        predict_classification(str(raw / "imagesTs"), str(partial), str(root / "p2.csv"), DATASET, "2d", [0],
                               TRAINER, PLANS)
    out = root / "p3.csv"
    predict_classification(str(raw / "imagesTs"), str(partial), str(out), DATASET, "2d", [0], TRAINER, PLANS,
                           allow_missing_tabular=True)
    assert len(list(csv.DictReader(open(out)))) == 3
    with pytest.raises(FileExistsError):  # never overwritten
        predict_classification(str(raw / "imagesTs"), None, str(out), DATASET, "2d", [0], TRAINER, PLANS)

    # issue 17.5: a feature column missing from the table is refused unless allowed, then warned about
    from nnunet_ext.cfcml.prediction_table import TabularDataWarning

    rows = list(csv.DictReader(open(raw / "tabular.csv", newline="")))
    no_score = root / "no_score.csv"
    with open(no_score, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "score"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(TabularDataError, match=r"feature column\(s\) \['score'\] of the trained model are missing"):
        predict_classification(str(raw / "imagesTs"), str(no_score), str(root / "p4.csv"), DATASET, "2d", [0],
                               TRAINER, PLANS)
    with pytest.warns(TabularDataWarning, match="'score' is missing"):
        predict_classification(str(raw / "imagesTs"), str(no_score), str(root / "p4.csv"), DATASET, "2d", [0],
                               TRAINER, PLANS, allow_missing_columns=True)
    assert len(list(csv.DictReader(open(root / "p4.csv")))) == 3


def test_stock_nnunet_predict_writes_segmentations(trained):
    root, raw, env = trained["root"], trained["raw"], trained["env"]
    out = root / "seg_out"
    run_cli([console_script("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET),
         "-c", "2d", "-tr", TRAINER, "-p", PLANS, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1",
         "-nps", "1"], env)
    assert sorted(p.name for p in out.glob("*.png")) == ["ts_000.png", "ts_001.png", "ts_002.png"]
