"""Every command stops on expected bad input with one line ``nnunet-ext <command>: error: ...`` and exit 2, before
any work: no traceback, nothing written. Runs ``nnunet_ext.cli.main`` in-process on a hand-made (unplanned, untrained)
nnU-Net tree, so no planning or training is needed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_nnunet import set_nnunet_paths

from nnunet_ext import cli

DATASET = "Dataset990_Tiny"
DATASET_JSON = {"channel_names": {"0": "FLAIR", "1": "T1c"}, "labels": {"background": 0, "oedema": 1, "core": 2},
                "numTraining": 0, "file_ending": ".nii.gz"}


# --config files written into the test folder as <name>.json
SETTINGS_FILES = {
    "list": [1, 2],
    "stages": {"message_stages": [0, 9]},
    "action_mixing": {"mixing": "mixup"},
    "action_stages": {"stage_epochs": [10, -1, 10]},
    "action_typo": {"lambda_ancoo": 0.1},
    "action_ats": {"ats_targets": ["anco", "distillation"]},
    "action_ok": {"mixing": "cutmix", "stage_epochs": [1, 1, 2], "saacl_weight": 0.02,
                  "ats_targets": ["distillation_ii", "anco"], "saacl_count_centre": False,
                  "saacl_centroid_init": "random"},
}


def _plans() -> dict:
    """Plans with one 3d_fullres configuration whose network has 3 stages (0..2)."""
    return {"dataset_name": DATASET, "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [1, 1, 1],
            "original_median_shape_after_transp": [16, 16, 16], "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [16, 16, 16], "spacing": [1, 1, 1],
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 8],
                                    "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 3,
                                    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [1] * 3,
                                    "n_conv_per_stage_decoder": [1] * 2, "conv_bias": True,
                                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                    "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                                    "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                    "nonlin_kwargs": {"inplace": True}},
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}}


def _write_json(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """nnU-Net folders with dataset 990: raw images, plans, and two model folders (one fold without checkpoint)."""
    folders = set_nnunet_paths(monkeypatch, tmp_path / "nnunet")
    raw = folders["nnUNet_raw"] / DATASET
    _write_json(raw / "dataset.json", DATASET_JSON)
    for channel in (0, 1):
        (raw / "imagesTs").mkdir(parents=True, exist_ok=True)
        (raw / "imagesTs" / f"case_000_{channel:04d}.nii.gz").write_bytes(b"not read before the checks")
    preprocessed = folders["nnUNet_preprocessed"] / DATASET
    _write_json(preprocessed / "dataset.json", DATASET_JSON)
    _write_json(preprocessed / "nnUNetPlans.json", _plans())
    _write_json(preprocessed / "nnUNetPlans_EXISTING.json", _plans())
    _write_json(folders["nnUNet_raw"] / "Dataset992_RawOnly" / "dataset.json", DATASET_JSON)  # not planned
    (folders["nnUNet_raw"] / "Dataset993_Old").mkdir()  # one ID, two names: nnU-Net cannot tell which is meant
    (folders["nnUNet_preprocessed"] / "Dataset993_New").mkdir()
    results = folders["nnUNet_results"] / DATASET
    for trainer in ("CIMLTrainer", "CFCMLTrainer"):
        model = results / f"{trainer}__nnUNetPlans__3d_fullres"
        _write_json(model / "plans.json", _plans())
        _write_json(model / "dataset.json", DATASET_JSON)
        (model / "fold_0").mkdir()
        (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"never loaded: the checks come first")
        (model / "fold_1").mkdir()  # a fold without checkpoint
    (tmp_path / "not_json.json").write_text('{"beta": 0.1,\n "subtasks": }')
    for name, settings in SETTINGS_FILES.items():
        _write_json(tmp_path / f"{name}.json", settings)
    (tmp_path / "existing.csv").write_text("case_id,prediction\n")
    (tmp_path / "predictions.csv").write_text("case,prediction\nx,1\n")
    (tmp_path / "labels.csv").write_text("case_id,label\nx,1\n")
    (tmp_path / "bad_probabilities.csv").write_text("case_id,prediction,prob_0,prob_1\nx,1,0.2,high\n")
    (tmp_path / "good_probabilities.csv").write_text("case_id,prediction,prob_0,prob_1\nx,1,0.2,0.8\n")
    (tmp_path / "no_label_column.csv").write_text("case_id,diagnosis\nx,1\n")
    (tmp_path / "demo" / "Dataset990_NNExtDemo").mkdir(parents=True)
    return tmp_path


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


RAW_TS = "{root}/nnunet/nnUNet_raw/" + DATASET + "/imagesTs"
PREDICT = ["-i", RAW_TS, "-o", "{root}/out", "-d", "990", "-c", "3d_fullres", "-device", "cpu"]

# (command line with {root} for the test folder, environment variables to unset, text the error line must contain)
CASES = [
    (["plan", "-d", "991", "--no_pp"], (), "dataset 991: no folder Dataset991_*"),
    (["plan", "-d", "990", "-pl", "NoSuchPlanner", "--no_pp"], (), "Unknown planner 'NoSuchPlanner'"),
    (["plan", "-d", "990", "--no_pp"], ("nnUNet_raw",), "nnUNet_raw is not set"),
    (["preprocess-unlabeled", "-d", "991"], (), "dataset 991: no folder Dataset991_*"),
    (["plan", "-d", "993", "--no_pp"], (), "dataset 993: several names ['Dataset993_New', 'Dataset993_Old']"),
    (["preprocess-unlabeled", "-d", "990"], ("nnUNet_preprocessed",), "nnUNet_preprocessed is not set"),
    (["preprocess-unlabeled", "-d", "992"], (), "Dataset992_RawOnly does not exist; plan it first"),
    (["preprocess-unlabeled", "-d", "990", "-p", "NoPlans"], (), "NoPlans.json not found"),
    (["preprocess-unlabeled", "-d", "990", "-c", "2d"], (), "configuration(s) ['2d'] not in plans file"),
    (["configure", "ciml", "-d", "990", "--config", "{root}/missing.json"], (), "--config file {root}/missing.json "
                                                                                "not found"),
    (["configure", "ciml", "-d", "990", "--config", "{root}/not_json.json"], (),
     "--config file {root}/not_json.json is not valid JSON: Expecting value at line 2 column 14"),
    (["configure", "ciml", "-d", "990", "--config", "{root}/list.json"], (), "expected a JSON object"),
    (["configure", "ciml", "-d", "990", "--config", "{root}/stages.json"], (),
     "configuration '3d_fullres': message_stages [0, 9] name stage(s) [9], but the plan's network has only stages "
     "0..2"),
    (["configure", "action", "-d", "990", "--config", "{root}/action_mixing.json"], (),
     "ACTION setting mixing='mixup' in the ACTION settings for nnUNetPlans_ACTION: expected one of"),
    (["configure", "action", "-d", "990", "--config", "{root}/action_stages.json"], (),
     "stage_epochs must be three non-negative integers with a positive sum"),
    (["configure", "action", "-d", "990", "--config", "{root}/action_ats.json"], (),
     "ACTION++ setting ats_targets=['anco', 'distillation'] in the ACTION settings for nnUNetPlans_ACTION: expected a "
     "list of distinct names from ('distillation_i', 'distillation_ii', 'anco', 'saacl')"),
    (["configure", "action", "-d", "990", "--config", "{root}/action_typo.json"], (),
     "unknown setting(s) ['lambda_ancoo']"),
    (["configure", "ciml", "-d", "991"], (), "dataset 991: no folder Dataset991_*"),
    (["configure", "ciml", "-d", "992"], (), "Dataset992_RawOnly does not exist; plan it first"),
    (["configure", "caml", "-d", "990", "-p", "NoPlans"], (), "NoPlans.json not found"),
    (["configure", "ciml", "-d", "990", "-o", "nnUNetPlans_EXISTING"], (), "exists; pass --overwrite"),
    (["configure", "ciml", "-d", "990", "-o", "nnUNetPlans"], (), "need their own identifier"),
    (["predict", *PREDICT, "--missing", "T1c", "-tr", "NoTrainer"], (), "no trained model in"),
    (["predict", *PREDICT, "--missing", "T1c", "-f", "1"], (), "fold_1/checkpoint_final.pth'] not found"),
    (["predict", *PREDICT, "--missing", "T1c", "-chk", "checkpoint_best.pth"], (),
     "holds no fold_N folder with checkpoint_best.pth"),
    (["predict", *PREDICT, "--missing", "PET", "-f", "0"], (), "unknown or ambiguous modality 'PET'"),
    (["predict", *PREDICT, "--missing", "T1c"], ("nnUNet_results",), "nnUNet_results is not set"),
    (["explain", *PREDICT, "-tr", "NoTrainer"], (), "no trained model in"),
    (["predict-cls", *PREDICT, "-tr", "NoTrainer"], (), "no trained model in"),
    (["predict-cls", *PREDICT, "-tr", "CFCMLTrainer", "-f", "1"], (), "fold_1/checkpoint_final.pth'] not found"),
    (["predict-cls", *PREDICT[:2], "-o", "{root}/existing.csv", *PREDICT[4:]], (), "-o {root}/existing.csv exists"),
    (["predict-cls", "-i", "{root}/no_images", *PREDICT[2:]], (), "-i {root}/no_images: folder not found"),
    (["evaluate-cls", "{root}/missing.csv", "{root}/labels.csv"], (), "predictions CSV {root}/missing.csv: file "
                                                                      "not found"),
    (["evaluate-cls", "{root}/predictions.csv", "{root}/labels.csv"], (), "expected columns case_id and prob_"),
    (["evaluate-cls", "{root}/bad_probabilities.csv", "{root}/labels.csv"], (),
     "bad_probabilities.csv line 2 (case 'x'): expected a number in every prob_<class> column, got ['0.2', 'high']"),
    (["evaluate-cls", "{root}/good_probabilities.csv", "{root}/no_label_column.csv"], (),
     "no_label_column.csv: column(s) ['label'] not found"),
    (["demo-data", "-o", "{root}/demo"], (), "Dataset990_NNExtDemo exists; pass --overwrite to replace it"),
    (["benchmark", "-d", "990", "--epochs", "0", "--output", "{root}/bench"], (), "budget must be positive"),
    (["benchmark-cls", "-d", "990", "--trainers", "A", "--baseline", "B", "--output", "{root}/bench"], (),
     "baseline(s) ['B'] are not among the trainers"),
]


@pytest.mark.parametrize(("argv", "unset", "expected"), CASES, ids=[f"{i:02d}-{c[0][0]}"
                                                                    for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(root, monkeypatch, capsys, argv, unset, expected):
    for variable in unset:
        monkeypatch.delenv(variable)
    before = _listing(root)
    code = cli.main([arg.format(root=root) for arg in argv])
    captured = capsys.readouterr()
    assert (code, captured.err.count("\n")) == (2, 1), captured.err
    assert captured.err.startswith(f"nnunet-ext {argv[0]}: error: ")
    assert expected.format(root=root) in captured.err
    assert _listing(root) == before


def test_configure_accepts_message_stages_the_network_has(root):
    # the stage check must not refuse what the network can build (stages 1 and 2 of 0..2)
    _write_json(root / "ok.json", {"message_stages": [1, 2]})
    assert cli.main(["configure", "ciml", "-d", "990", "--config", str(root / "ok.json")]) == 0
    written = json.loads((root / "nnunet/nnUNet_preprocessed" / DATASET / "nnUNetPlans_CIML.json").read_text())
    assert written["nnunet_ext"]["ciml"]["message_stages"] == [1, 2]


def test_configure_action_stores_valid_action_and_action_plus_plus_settings(root):
    assert cli.main(["configure", "action", "-d", "990", "--config", str(root / "action_ok.json")]) == 0
    written = json.loads((root / "nnunet/nnUNet_preprocessed" / DATASET / "nnUNetPlans_ACTION.json").read_text())
    assert written["nnunet_ext"]["action"] == SETTINGS_FILES["action_ok"]


@pytest.mark.parametrize("variable", ["nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"])
def test_doctor_fails_when_an_nnunet_folder_is_unset(tmp_path, monkeypatch, capsys, variable):
    set_nnunet_paths(monkeypatch, tmp_path)
    monkeypatch.delenv(variable)
    assert cli.main(["doctor"]) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 1 and f"{variable} not set" in problems[0]
