from __future__ import annotations

import json

import pytest

import nnunet_ext.plans as plans_module
from nnunet_ext.plans import PLANS_KEY, derive_plans, merge_settings, method_settings, write_derived_plans

PLANS = {
    "dataset_name": "Dataset001_X",
    "plans_name": "nnUNetPlans",
    "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [8, 8, 8]}},
}


def test_derived_plans_keep_configurations_and_rename():
    derived = derive_plans(PLANS, "nnUNetPlans_CIML", "ciml", {"subtasks": [1]})
    assert derived["plans_name"] == "nnUNetPlans_CIML"
    assert derived["configurations"] == PLANS["configurations"]
    assert derived[PLANS_KEY] == {"version": 1, "ciml": {"subtasks": [1]}}
    assert PLANS["plans_name"] == "nnUNetPlans" and PLANS_KEY not in PLANS  # source untouched
    assert method_settings(derived, "ciml") == {"subtasks": [1]}
    assert method_settings(derived, "caml") == {}


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: method_settings(PLANS, "unet"), ValueError),
        (lambda: derive_plans(PLANS, "x", "nope", {}), ValueError),
        (lambda: derive_plans(PLANS, "x", "ciml", {"a": object()}), TypeError),
        (lambda: merge_settings({"a": 1}, {"b": 2}, "plans"), KeyError),
    ],
)
def test_bad_input(call, error):
    with pytest.raises(error):
        call()


def test_merge_settings_overrides_known_keys_only():
    assert merge_settings({"a": 1, "b": [1]}, {"b": [2]}, "x") == {"a": 1, "b": [2]}


def test_write_derived_plans(tmp_path, monkeypatch):
    # the generic path; a method's own deriver (tested below) would validate the settings
    monkeypatch.setattr(plans_module, "method_plans_deriver", lambda method: None)
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(PLANS))
    path = write_derived_plans(str(tmp_path), "nnUNetPlans", "nnUNetPlans_CAML", "caml", {"w": 0.5})
    assert json.loads(open(path).read())["plans_name"] == "nnUNetPlans_CAML"
    with pytest.raises(FileExistsError):
        write_derived_plans(str(tmp_path), "nnUNetPlans", "nnUNetPlans_CAML", "caml", {"w": 0.5})
    write_derived_plans(str(tmp_path), "nnUNetPlans", "nnUNetPlans_CAML", "caml", {"w": 1}, overwrite=True)
    with pytest.raises(ValueError, match="own identifier"):
        write_derived_plans(str(tmp_path), "nnUNetPlans", "nnUNetPlans", "caml", {})
    with pytest.raises(FileNotFoundError, match="plan the dataset"):
        write_derived_plans(str(tmp_path), "missing", "x", "caml", {})


def test_write_derived_plans_uses_the_methods_own_deriver(tmp_path, monkeypatch):
    calls = []

    def deriver(plans, target, settings, folder):
        calls.append((target, dict(settings), folder))
        return derive_plans(plans, target, "ciml", {"resolved": True, **settings})

    monkeypatch.setattr(plans_module, "method_plans_deriver", lambda method: deriver)
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(PLANS))
    path = write_derived_plans(str(tmp_path), "nnUNetPlans", "nnUNetPlans_CIML", "ciml", {"beta": 1})
    assert calls == [("nnUNetPlans_CIML", {"beta": 1}, str(tmp_path))]
    assert method_settings(json.loads(open(path).read()), "ciml") == {"resolved": True, "beta": 1}


def test_method_plans_deriver_rejects_unknown_methods():
    with pytest.raises(ValueError, match="unknown method family"):
        plans_module.method_plans_deriver("unet")
