"""CIML end to end through the command line, each step in a fresh process: plan (CPU plans) -> configure ciml
-> nnUNetv2_train -> --c -> nnUNetv2_predict -> nnU-Net evaluation -> nnunet-ext explain -> nnunet-ext predict
--missing (auxiliary absent; primary absent is an error)."""
from __future__ import annotations

import csv
import json
import math

import pytest
import SimpleITK as sitk
import torch
from helpers_cli import TEST_TRAINERS_DIR, console_script, run_cli, subprocess_env
from helpers_nnunet import make_tiny_dataset

pytestmark = pytest.mark.slow

DATASET = 984
NAME = f"Dataset{DATASET:03d}_CimlCli"
TRAINER = "CIMLTrainer_smoke"
PLANS = "nnUNetCPUPlans_CIML"
# CT (channel 0) is the primary modality of both subtasks, MRI only sends messages
CONFIG = {"subtasks": [{"name": "a", "targets": ["a"], "primary": "CT", "auxiliary": ["MRI"]},
                       {"name": "b", "targets": ["b"], "primary": "CT", "auxiliary": ["MRI"]}],
          "beta": 1e-2}



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_ciml")
    env = subprocess_env(root, extra_trainer_dirs=(TEST_TRAINERS_DIR,))
    make_tiny_dataset(root / "nnUNet_raw", dataset_id=DATASET, name="CimlCli", n_labelled=8, n_unlabeled=0,
                      shape=(24, 28, 32))
    run_cli([console_script("nnunet-ext"), "plan", "-d", str(DATASET), "-pl", "CPUPlanner", "-c", "3d_fullres",
         "-np", "1"], env)
    config = root / "ciml.json"
    config.write_text(json.dumps(CONFIG))
    run_cli([console_script("nnunet-ext"), "configure", "ciml", "-d", str(DATASET), "-p", "nnUNetCPUPlans",
         "-o", PLANS, "--config", str(config)], env)
    train_env = {**env, "nnUNet_n_proc_DA": "0"}
    run_cli([console_script("nnUNetv2_train"), str(DATASET), "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS,
         "-device", "cpu"], train_env)
    fold = root / "nnUNet_results" / NAME / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_0"
    raw = root / "nnUNet_raw" / NAME
    val_cases = json.loads((root / "nnUNet_preprocessed" / NAME / "splits_final.json").read_text())[0]["val"]
    inputs = root / "predict_in"
    inputs.mkdir()
    for case in val_cases:
        for image in raw.glob(f"imagesTr/{case}_*.nii.gz"):
            (inputs / image.name).symlink_to(image)
    return {"root": root, "env": train_env, "fold": fold, "raw": raw, "val_cases": val_cases, "inputs": inputs}


def test_configure_wrote_a_derived_plans_file(trained):
    folder = trained["root"] / "nnUNet_preprocessed" / NAME
    source = json.loads((folder / "nnUNetCPUPlans.json").read_text())
    derived = json.loads((folder / f"{PLANS}.json").read_text())
    assert derived["plans_name"] == PLANS
    assert derived["configurations"]["3d_fullres"]["data_identifier"] == \
        source["configurations"]["3d_fullres"]["data_identifier"]
    block = derived["nnunet_ext"]["ciml"]
    assert block["resolved"]["output_mode"] == "labels" and block["beta"] == 1e-2


def test_configure_rejects_an_unknown_modality_before_training(trained, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"subtasks": [{"name": "a", "targets": "all", "primary": "PET"}]}))
    result = run_cli([console_script("nnunet-ext"), "configure", "ciml", "-d", str(DATASET), "-p", "nnUNetCPUPlans",
                  "-o", "nnUNetCPUPlans_BAD", "--config", str(bad)], trained["env"], check=False)
    assert result.returncode != 0 and "'PET' is not in the dataset's channel_names" in result.stderr


def test_training_writes_ciml_state_logs_and_validation(trained):
    fold = trained["fold"]
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    assert checkpoint["nnunet_ext"]["family"] == "ciml"
    for key in ("ciml_loss_seg", "ciml_kl_total", "ciml_beta"):
        values = checkpoint["logging"][key]
        assert len(values) == 2 and all(math.isfinite(v) for v in values)
    assert checkpoint["logging"]["ciml_beta"] == pytest.approx([0.0, 1e-2])  # warm-up over 10 % of 2 epochs
    records = json.loads((fold / "ciml_kl.json").read_text())
    assert [r["epoch"] for r in records] == [0, 1]
    assert sorted(records[0]["kl_pairs"]) == ["MRI->a", "MRI->b"]
    assert (fold / "validation" / "summary.json").exists()


def test_resume_with_c_keeps_everything(trained):
    fold = trained["fold"]
    before = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    run_cli([console_script("nnUNetv2_train"), str(DATASET), "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS,
         "-device", "cpu", "--c"], trained["env"])
    after = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    for name, tensor in before["network_weights"].items():
        assert torch.equal(tensor, after["network_weights"][name]), name
    assert after["current_epoch"] == before["current_epoch"]
    assert after["nnunet_ext"]["state"]["kl_history"] == before["nnunet_ext"]["state"]["kl_history"]


def test_predict_in_a_fresh_process_and_evaluate(trained):
    root, env = trained["root"], trained["env"]
    out = root / "predict_out"
    run_cli([console_script("nnUNetv2_predict"), "-i", str(trained["inputs"]), "-o", str(out), "-d", str(DATASET),
         "-c", "3d_fullres", "-tr", TRAINER, "-p", PLANS, "-f", "0", "-device", "cpu", "--disable_tta",
         "-npp", "1", "-nps", "1"], env)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in trained["val_cases"])
    gt = root / "predict_gt"
    gt.mkdir()
    for case in trained["val_cases"]:
        (gt / f"{case}.nii.gz").symlink_to(trained["raw"] / "labelsTr" / f"{case}.nii.gz")
    run_cli([console_script("nnUNetv2_evaluate_simple"), str(gt), str(out), "-l", "1", "2", "-np", "1"], env)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}


def test_explain_writes_aligned_maps_overlays_and_a_table(trained):
    out = trained["root"] / "explain_out"
    run_cli([console_script("nnunet-ext"), "explain", "-i", str(trained["inputs"]), "-o", str(out), "-d", str(DATASET),
         "-c", "3d_fullres", "-tr", TRAINER, "-p", PLANS, "-f", "0", "-device", "cpu"], trained["env"])
    case = trained["val_cases"][0]
    reference = sitk.ReadImage(str(trained["inputs"] / f"{case}_0001.nii.gz"))
    for pair in ("MRI-to-a", "MRI-to-b"):
        for kind in ("attention", "magnitude"):
            image = sitk.ReadImage(str(out / f"{case}__{pair}__{kind}.nii.gz"))
            assert image.GetSize() == reference.GetSize()
            assert image.GetSpacing() == pytest.approx(reference.GetSpacing())
            assert image.GetOrigin() == pytest.approx(reference.GetOrigin())
            values = sitk.GetArrayFromImage(image)
            assert values.min() >= -1e-3 and values.max() > 0
            if kind == "attention":
                assert values.max() <= 1.0 + 1e-3
        assert (out / f"{case}__{pair}.png").stat().st_size > 0
    with open(out / "contributions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(trained["val_cases"]) + 2
    summary = [r for r in rows if r["case"] == "ALL"]
    assert sorted((r["sender"], r["subtask"]) for r in summary) == [("MRI", "a"), ("MRI", "b")]
    # one sender per subtask here, so it received all of the subtask's messages
    assert all(float(r["magnitude_share"]) == pytest.approx(1.0) for r in rows)


def test_predict_with_a_missing_auxiliary_modality(trained):
    root, env = trained["root"], trained["env"]
    only_ct = root / "predict_in_ct_only"
    only_ct.mkdir()
    for image in trained["inputs"].glob("*_0000.nii.gz"):
        (only_ct / image.name).symlink_to(image.resolve())
    out = root / "predict_missing"
    run_cli([console_script("nnunet-ext"), "predict", "-i", str(only_ct), "-o", str(out), "-d", str(DATASET),
         "-c", "3d_fullres", "-tr", TRAINER, "-p", PLANS, "-f", "0", "-device", "cpu", "--disable_tta",
         "--missing", "MRI"], env)
    for case in trained["val_cases"]:
        prediction = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert prediction.GetSize() == sitk.ReadImage(str(only_ct / f"{case}_0000.nii.gz")).GetSize()
    assert sorted(p.name for p in only_ct.iterdir()) == sorted(p.name for p in trained["inputs"].glob("*_0000*"))
    zero_filled = root / "predict_zero_filled"
    run_cli([console_script("nnunet-ext"), "predict", "-i", str(only_ct), "-o", str(zero_filled), "-d", str(DATASET),
         "-c", "3d_fullres", "-tr", TRAINER, "-p", PLANS, "-f", "0", "-device", "cpu", "--disable_tta",
         "--missing", "MRI", "--missing-mode", "zero-fill"], env)
    assert sorted(p.name for p in zero_filled.glob("*.nii.gz")) == sorted(p.name for p in out.glob("*.nii.gz"))
    primary = run_cli([console_script("nnunet-ext"), "predict", "-i", str(trained["inputs"]), "-o", str(root / "x"),
                   "-d", str(DATASET), "-c", "3d_fullres", "-tr", TRAINER, "-p", PLANS, "-f", "0",
                   "-device", "cpu", "--missing", "CT"], env, check=False)
    assert primary.returncode != 0 and "primary modality" in primary.stderr
    absent = run_cli([console_script("nnunet-ext"), "predict", "-i", str(only_ct), "-o", str(root / "y"),
                  "-d", str(DATASET), "-c", "3d_fullres", "-tr", TRAINER, "-p", PLANS, "-f", "0",
                  "-device", "cpu"], env, check=False)
    assert absent.returncode != 0 and "lacks channel file" in absent.stderr
