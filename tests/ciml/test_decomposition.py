"""Task decomposition: resolution of names to indices, the automatic default, and clear errors for bad configs."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from ciml_testing import BRATS_DATASET, LABELS_DATASET, THREE_CHANNEL_LABELS

from nnunet_ext.ciml.decomposition import (
    MessageConfig,
    automatic_resolution,
    check_block_against_dataset,
    effective_settings,
    resolve_settings,
)


def test_brats_preset_resolves_to_region_indices():
    block = resolve_settings({"preset": "brats"}, BRATS_DATASET)
    assert block["resolved"] == {
        "output_mode": "regions", "num_modalities": 4, "num_outputs": 3,
        "subtasks": [
            {"name": "WT", "primary": 3, "auxiliary": [0, 1, 2], "out_channels": [0]},
            {"name": "TC", "primary": 2, "auxiliary": [0, 1, 3], "out_channels": [1]},
            {"name": "ET", "primary": 1, "auxiliary": [0, 2, 3], "out_channels": [2]},
        ]}
    assert block["modality_names"] == ["T1", "T1ce", "T2", "Flair"]
    assert block["beta"] == 1e-3 and block["message_stages"] == "all_but_first"


def test_label_mode_with_names_and_integers():
    subtasks = [{"name": "o", "targets": ["oedema"], "primary": "FLAIR", "auxiliary": [1]},
                {"name": "c", "targets": [2], "primary": 1, "auxiliary": "all"}]
    block = resolve_settings({"subtasks": subtasks, "beta": 1e-2}, LABELS_DATASET)
    assert block["resolved"]["output_mode"] == "labels"
    assert block["resolved"]["num_outputs"] == 3
    assert [s["out_channels"] for s in block["resolved"]["subtasks"]] == [[1], [2]]
    assert [s["auxiliary"] for s in block["resolved"]["subtasks"]] == [[1], [0]]
    assert block["beta"] == 1e-2


def test_targets_all_and_empty_auxiliary_are_allowed():
    subtasks = [{"name": "t", "targets": "all", "primary": "A", "auxiliary": ["B", "C"]}]
    resolved = resolve_settings({"subtasks": subtasks}, THREE_CHANNEL_LABELS)["resolved"]
    assert resolved["subtasks"][0]["out_channels"] == [1, 2]
    two = [{"name": "x", "targets": ["x"], "primary": "A", "auxiliary": []},
           {"name": "y", "targets": ["y"], "primary": "B", "auxiliary": ["C"]}]
    assert resolve_settings({"subtasks": two}, THREE_CHANNEL_LABELS)["resolved"]["subtasks"][0]["auxiliary"] == []


def test_automatic_default_depends_only_on_channel_counts():
    block = resolve_settings({}, LABELS_DATASET)
    assert block["resolved"] == automatic_resolution(2, 3) == {
        "output_mode": "direct", "num_modalities": 2, "num_outputs": 3,
        "subtasks": [{"name": "all", "primary": 0, "auxiliary": [1], "out_channels": [0, 1, 2]}]}
    # the builder without any block (what the predictor sees for plans without one) gives the same settings
    without_block = effective_settings(None, {}, 2, 3)
    assert without_block["resolved"] == block["resolved"]


SUBTASK_O = {"name": "o", "targets": ["oedema"], "primary": "FLAIR", "auxiliary": ["T1c"]}
SUBTASK_C = {"name": "c", "targets": ["core"], "primary": "T1c", "auxiliary": ["FLAIR"]}


@pytest.mark.parametrize("settings, match", [
    ({"subtasks": [SUBTASK_O, {**SUBTASK_C, "targets": ["core", "oedema"]}]}, "covered by subtasks 'o' and 'c'"),
    ({"subtasks": [SUBTASK_O]}, r"\['core'\] are not covered"),
    ({"subtasks": [{**SUBTASK_O, "auxiliary": ["FLAIR", "T1c"]}, SUBTASK_C]}, "also listed as auxiliary"),
    ({"subtasks": [{**SUBTASK_O, "primary": "T2"}, SUBTASK_C]}, "'T2' is not in the dataset's channel_names"),
    ({"subtasks": [{**SUBTASK_O, "auxiliary": [5]}, SUBTASK_C]}, "index 5 does not exist"),
    ({"subtasks": [{**SUBTASK_O, "targets": ["necrosis"]}, SUBTASK_C]}, "'necrosis' is not a foreground label"),
    ({"subtasks": [{**SUBTASK_O, "targets": [7]}, SUBTASK_C]}, "7 is not a foreground label value"),
    ({"subtasks": [SUBTASK_O, {**SUBTASK_C, "name": "o"}]}, "used twice"),
    ({"subtasks": [{**SUBTASK_O, "colour": "red"}, SUBTASK_C]}, "unknown key"),
    ({"subtasks": [{k: v for k, v in SUBTASK_O.items() if k != "primary"}, SUBTASK_C]}, "lacks 'primary'"),
    ({"subtasks": []}, "non-empty list"),
    ({"subtasks": [SUBTASK_O, SUBTASK_C], "betta": 1}, r"unknown CIML setting\(s\) \['betta'\]"),
    ({"preset": "prostate"}, "unknown CIML preset"),
    ({"beta": -1.0}, "beta must be"),
    ({"beta_warmup_fraction": 2.0}, "beta_warmup_fraction"),
    ({"message_mode": "broadcast"}, "message_mode"),
    ({"message_stages": "first"}, "message_stages"),
    ({"message_stages": [-1]}, "message_stages"),
    ({"attention": {"type": "cbam", "kernel": 4}}, "odd"),
    ({"attention": {"type": "transformer", "kernel": 7}}, "attention.type"),
    ({"attention": {"kind": "cbam"}}, "attention must be"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"message_dropout": 1.0}, "message_dropout"),
    ({"logvar_clamp": -1.0}, "logvar_clamp"),
])
def test_bad_configs_are_clear_errors(settings, match):
    with pytest.raises(ValueError, match=match):
        resolve_settings(settings, LABELS_DATASET)


def test_unused_modality_is_an_error():
    subtasks = [{"name": "x", "targets": ["x"], "primary": "A", "auxiliary": []},
                {"name": "y", "targets": ["y"], "primary": "B", "auxiliary": []}]
    with pytest.raises(ValueError, match=r"\['C'\] are neither primary nor auxiliary"):
        resolve_settings({"subtasks": subtasks}, THREE_CHANNEL_LABELS)


def test_ambiguous_channel_names_must_use_indices():
    dataset = {**LABELS_DATASET, "channel_names": {"0": "MRI", "1": "MRI"}}
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_settings({"subtasks": [{"name": "t", "targets": "all", "primary": "MRI"}]}, dataset)
    block = resolve_settings({"subtasks": [{"name": "t", "targets": "all", "primary": 1, "auxiliary": [0]}]}, dataset)
    assert block["resolved"]["subtasks"][0]["primary"] == 1


def test_region_mode_targets_by_position():
    subtasks = [{"name": "all", "targets": [0, 1, 2], "primary": "Flair", "auxiliary": "all"}]
    assert resolve_settings({"subtasks": subtasks}, BRATS_DATASET)["resolved"]["subtasks"][0]["out_channels"] == \
        [0, 1, 2]


def test_stored_block_is_rechecked_against_the_dataset():
    block = resolve_settings({"preset": "demo"}, LABELS_DATASET)
    check_block_against_dataset(block, LABELS_DATASET)  # unchanged dataset: fine
    renamed = copy.deepcopy(LABELS_DATASET)
    renamed["channel_names"] = {"0": "FLAIR", "1": "T2"}
    with pytest.raises(ValueError, match="'T1c' is not in the dataset's channel_names"):
        check_block_against_dataset(block, renamed)
    reordered = copy.deepcopy(LABELS_DATASET)
    reordered["channel_names"] = {"0": "T1c", "1": "FLAIR"}
    with pytest.raises(ValueError, match="no longer matches"):
        check_block_against_dataset(block, reordered)


def test_effective_settings_errors():
    block = resolve_settings({"preset": "demo"}, LABELS_DATASET)
    with pytest.raises(ValueError, match="nnunet-ext configure ciml"):
        effective_settings({"beta": 1e-3}, {}, 2, 3)
    with pytest.raises(ValueError, match="ciml_overrides"):
        effective_settings(block, {"messagez": False}, 2, 3)
    with pytest.raises(ValueError, match="resolved for 2 input channels"):
        effective_settings(block, {}, 3, 3)
    with pytest.raises(ValueError, match="resolved for 3 outputs"):
        effective_settings(block, {}, 2, 4)
    merged = effective_settings(block, {"messages": False}, 2, 3)
    assert merged["messages"] is False and merged["resolved"] == block["resolved"]


@pytest.mark.parametrize("stages, num_stages, expected", [
    ("all_but_first", 5, (1, 2, 3, 4)), ("all", 3, (0, 1, 2)), ("bottleneck", 4, (3,)), ((2, 1, 2), 4, (1, 2)),
])
def test_message_stage_selection(stages, num_stages, expected):
    assert MessageConfig(stages=stages).stage_indices(num_stages) == expected


def test_message_stage_beyond_the_plan_is_an_error():
    with pytest.raises(ValueError, match="only stages 0..2"):
        MessageConfig(stages=(3,)).stage_indices(3)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("file, dataset, expected_mode, expected_primaries", [
    ("ciml_brats_dataset137.json", BRATS_DATASET, "regions", [3, 2, 1]),
    ("ciml_demo.json", LABELS_DATASET, "labels", [0, 1]),
    ("ciml_brats2018_flair_t1.json", {"channel_names": {"0": "FLAIR", "1": "T1"},
                                      "labels": {"background": 0, "tumour": 1}}, "labels", [0]),
    ("ciml_brats2015_flair_t1c.json", {"channel_names": {"0": "FLAIR", "1": "T1c"},
                                       "labels": {"background": 0, "whole tumour": [1, 2, 3, 4],
                                                  "tumour core": [1, 3, 4], "enhancing tumour": 4},
                                       "regions_class_order": [2, 1, 4]}, "regions", [0, 1]),
])
def test_shipped_examples_resolve(file, dataset, expected_mode, expected_primaries):
    resolved = resolve_settings(json.loads((EXAMPLES / file).read_text()), dataset)["resolved"]
    assert resolved["output_mode"] == expected_mode
    assert [s["primary"] for s in resolved["subtasks"]] == expected_primaries
