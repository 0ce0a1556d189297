"""Explanation maps wrapper and the file handling of ``nnunet-ext predict --missing`` (no trained model needed)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from ciml_testing import BRATS_DATASET, configuration
from ciml_testing import single_torch_thread  # noqa: F401
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_ext.ciml.decomposition import resolve_settings
from nnunet_ext.ciml.explain import MAP_KINDS, ExplanationMaps
from nnunet_ext.ciml.network import build_ciml_network
from nnunet_ext.ciml.predict import fill_missing_channels, group_case_files, resolve_modalities


@pytest.mark.parametrize("dim", [2, 3])
def test_explanation_maps_channels_and_ranges(dim):
    block = resolve_settings({"preset": "brats"}, BRATS_DATASET)
    net = build_ciml_network(configuration(dim), 4, 3, block, {}, enable_deep_supervision=False).eval()
    wrapper = ExplanationMaps(net)
    x = torch.randn(1, 4, *([16] * dim))
    maps = wrapper(x)
    assert wrapper.num_maps == 9 * len(MAP_KINDS) and maps.shape == (1, 27, *x.shape[2:])
    attention = maps[:, 0::3]
    assert float(attention.min()) >= 0.0 and float(attention.max()) <= 1.0
    assert float(maps[:, 1::3].min()) >= 0.0 and float(maps[:, 2::3].min()) >= 0.0
    net.set_missing_modalities([0])  # T1 only sends: its maps become zero
    silent = wrapper(x)
    t1_pairs = [i for i, name in enumerate(net.pair_names) if name.startswith("T1->")]
    assert all(float(silent[:, 3 * i:3 * i + 3].abs().max()) == 0.0 for i in t1_pairs)


def _write(path, value=1.0):
    image = sitk.GetImageFromArray(np.full((4, 5, 6), value, dtype=np.float32))
    image.SetSpacing((1.0, 2.0, 3.0))
    image.SetOrigin((5.0, 6.0, 7.0))
    sitk.WriteImage(image, str(path))


def test_case_grouping_missing_channels_and_zero_fill(tmp_path):
    for case in ("a", "b"):
        _write(tmp_path / f"{case}_0000.nii.gz")
        _write(tmp_path / f"{case}_0002.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"case 'a' lacks channel file\(s\) \['a_0001.nii.gz'\]"):
        group_case_files(tmp_path, ".nii.gz", 3)
    cases = group_case_files(tmp_path, ".nii.gz", 3, optional_channels=[1])
    assert sorted(cases) == ["a", "b"] and sorted(cases["a"]) == [0, 2]
    with pytest.raises(ValueError, match="channel 0002 does not exist"):
        group_case_files(tmp_path, ".nii.gz", 2)
    filled = tmp_path / "filled"
    filled.mkdir()
    lists = fill_missing_channels(cases, [1], 3, SimpleITKIO(), ".nii.gz", str(filled))
    assert lists[0][0].endswith("a_0000.nii.gz") and lists[0][1] == str(filled / "a_0001.nii.gz")
    zero = sitk.ReadImage(lists[0][1])
    assert zero.GetSpacing() == (1.0, 2.0, 3.0) and zero.GetOrigin() == (5.0, 6.0, 7.0)
    assert not sitk.GetArrayFromImage(zero).any()
    with pytest.raises(FileNotFoundError, match="no files named"):
        group_case_files(filled / "..", ".png", 3)


def test_modalities_by_name_or_index():
    names = {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
    assert resolve_modalities(["flair", "1", "T1"], names) == [0, 1, 3]
    with pytest.raises(ValueError, match="unknown or ambiguous modality 'PET'"):
        resolve_modalities(["PET"], names)


def test_unknown_missing_mode_is_refused_before_any_model_is_loaded(tmp_path):
    from nnunet_ext.ciml.predict import predict_folder

    with pytest.raises(ValueError, match="missing_mode must be one of"):
        predict_folder(str(tmp_path), str(tmp_path / "out"), str(tmp_path / "no_model"), missing=["T1"],
                       missing_mode="drop")
    assert not (tmp_path / "out").exists()
