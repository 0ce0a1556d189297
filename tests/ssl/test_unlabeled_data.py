"""Tests for nnunet_ext.ssl.unlabeled_data: dataset, loader (validity map) and augmenter (CPU, ~10 s)."""
from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_ext.ssl.unlabeled_data import (
    UnlabeledDataLoader,
    UnlabeledDataset,
    build_unlabeled_augmenter,
)
from nnunet_ext.ssl.unlabeled_preprocessing import MANIFEST_FILE, preprocess_unlabeled

DATASET_ID = 990
DATASET = "Dataset990_Tiny"
UNLABELED = {"unl_000", "unl_001", "unl_002"}
HINT = "nnunet-ext preprocess-unlabeled"


# ---------------------------------------------------------------------------------------------------------------
# loader on hand-made folders (no planning): exact checks of the validity map


def _write_cases(folder: Path, cases: dict[str, np.ndarray]) -> UnlabeledDataset:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in cases.items():
        UnlabeledDataset.save_case(data, None, {"class_locations": {}}, str(folder / name), patch_size=(8, 8, 8))
    return UnlabeledDataset(str(folder))


def _random_case(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # strictly positive so that "data == 0" identifies padding unambiguously
    return rng.uniform(1.0, 2.0, shape).astype(np.float32)


def _remove_padding_label():
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

    return RemoveLabelTansform(-1, 0)


def _compose(*transforms):
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    return ComposeTransforms(list(transforms))


IDENTITY_TRANSFORMS = [
    pytest.param(lambda: None, id="none"),
    pytest.param(lambda: _compose(), id="empty_compose"),
    # the last step of nnU-Net's pipeline: padded -1 becomes 0, which must stay invalid
    pytest.param(lambda: _compose(_remove_padding_label()), id="remove_label"),
]


@pytest.mark.parametrize("make_transforms", IDENTITY_TRANSFORMS)
def test_valid_is_false_exactly_in_padding_3d(tmp_path: Path, make_transforms) -> None:
    rng = np.random.default_rng(0)
    cases = {"a": _random_case(rng, (2, 5, 6, 7)), "b": _random_case(rng, (2, 3, 8, 4))}
    dataset = _write_cases(tmp_path / "u", cases)
    loader = UnlabeledDataLoader(dataset, 4, (8, 8, 8), (8, 8, 8), transforms=make_transforms())
    for _ in range(3):
        batch = loader.generate_train_batch()
        assert set(batch) == {"data", "valid", "keys"}
        assert batch["data"].shape == (4, 2, 8, 8, 8) and batch["data"].dtype == torch.float32
        assert batch["valid"].shape == (4, 1, 8, 8, 8) and batch["valid"].dtype == torch.bool
        for data, valid, key in zip(batch["data"].numpy(), batch["valid"].numpy(), batch["keys"]):
            case = cases[key]
            # padding is exactly where the loader put zeros; the image is a dense box of the case's shape
            np.testing.assert_array_equal(valid[0], data[0] != 0)
            box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(valid[0]))
            assert valid[0].sum() == np.prod(case.shape[1:])
            np.testing.assert_array_equal(data[(slice(None), *box)], case)


@pytest.mark.parametrize("make_transforms", IDENTITY_TRANSFORMS)
def test_valid_is_false_exactly_in_padding_2d(tmp_path: Path, make_transforms) -> None:
    rng = np.random.default_rng(1)
    case = _random_case(rng, (2, 3, 5, 6))
    dataset = _write_cases(tmp_path / "u", {"a": case})
    loader = UnlabeledDataLoader(dataset, 3, (8, 8), (8, 8), transforms=make_transforms())
    batch = loader.generate_train_batch()
    assert batch["data"].shape == (3, 2, 8, 8) and batch["valid"].shape == (3, 1, 8, 8)
    for data, valid in zip(batch["data"].numpy(), batch["valid"].numpy()):
        box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(valid[0]))
        assert valid[0].sum() == 5 * 6
        crop = data[(slice(None), *box)]
        assert any(np.array_equal(crop, case[:, z]) for z in range(3))  # one whole slice


def test_rotated_in_area_is_invalid(tmp_path: Path) -> None:
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    # a case exactly the patch size, rotated for sure: the corners come from outside the crop
    dataset = _write_cases(tmp_path / "u", {"a": _random_case(np.random.default_rng(2), (1, 8, 8, 8))})
    rotate = SpatialTransform((8, 8, 8), patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                              p_rotation=1.0, rotation=(0.6, 0.6), p_scaling=0, border_mode_seg="constant",
                              padding_value_seg=-1)
    loader = UnlabeledDataLoader(dataset, 2, (8, 8, 8), (8, 8, 8), transforms=_compose(rotate, _remove_padding_label()))
    valid = loader.generate_train_batch()["valid"]
    assert 0 < valid.float().mean() < 1
    assert not valid[:, 0, 0, 0, 0].any()  # a corner voxel


def test_nonzero_mask_channels_keep_image_zero_outside_mask(tmp_path: Path) -> None:
    """use_mask_for_norm: outside the non-zero mask the image is re-zeroed by MaskImageTransform, yet stays valid."""
    from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform

    case = _random_case(np.random.default_rng(3), (1, 6, 6, 6))
    case[0, :2] = 0  # outside the brain, say
    dataset = _write_cases(tmp_path / "u", {"a": case})

    def brighten(**data_dict):  # an intensity augmentation that would lift the zero background
        data_dict["image"] = data_dict["image"] + 5.0
        return data_dict

    transforms = _compose(MaskImageTransform([0], 0, 0), _remove_padding_label())
    loader = UnlabeledDataLoader(dataset, 2, (8, 8, 8), (8, 8, 8), nonzero_mask_channels=[0],
                                 transforms=lambda **d: transforms(**brighten(**d)))
    batch = loader.generate_train_batch()
    data, valid = batch["data"][:, 0], batch["valid"][:, 0]
    assert valid.sum(dim=(1, 2, 3)).tolist() == [6 ** 3] * 2  # the zero slab counts as image
    assert (data[~valid] == 0).all()  # padding re-zeroed like in labelled batches
    assert ((data == 0) & valid).sum(dim=(1, 2, 3)).tolist() == [2 * 36] * 2  # the slab too
    assert (data[valid & (data != 0)] > 5).all()


def test_dataset_has_no_segmentation(tmp_path: Path) -> None:
    case = _random_case(np.random.default_rng(4), (2, 4, 4, 4))
    dataset = _write_cases(tmp_path / "u", {"b": case, "a": case})
    assert dataset.identifiers == ["a", "b"]
    data, seg, seg_prev, properties = dataset.load_case("a")
    assert seg is None and seg_prev is None and properties == {"class_locations": {}}
    np.testing.assert_array_equal(data[:], case)
    with pytest.raises(ValueError, match="seg=None"):
        UnlabeledDataset.save_case(case, case, {}, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="No unlabeled cases"):
        UnlabeledDataLoader(UnlabeledDataset(str(tmp_path / "u"), []), 2, (4, 4, 4), (4, 4, 4))


# ---------------------------------------------------------------------------------------------------------------
# augmenter on a planned dataset with nnU-Net's real training transforms


def _trainer(root: Path, configuration: str, plans_file: str = "nnUNetPlans.json"):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    pre = root / "nnUNet_preprocessed" / DATASET
    plans = json.loads((pre / plans_file).read_text())
    plans["continue_training"] = False  # popped by nnUNetTrainer.__init__
    dataset_json = json.loads((pre / "dataset.json").read_text())
    return nnUNetTrainer(deepcopy(plans), configuration, 0, dataset_json, device=torch.device("cpu"))


# 2d is not initialised: initialize() needs the labelled 2d folder, which the shared fixture does not preprocess
# (the batch size then falls back to the configuration's)
@pytest.mark.parametrize("configuration, patch, batch_size, initialize",
                         [("3d_fullres", (20, 24, 28), 2, True), ("2d", (24, 28), 6, False)])
def test_augmenter_batches_with_nnunet_transforms(root: Path, configuration: str, patch: tuple, batch_size: int,
                                                  initialize: bool) -> None:
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

    preprocess_unlabeled(DATASET_ID, (configuration,))
    trainer = _trainer(root, configuration)
    if initialize:
        trainer.initialize()
        assert trainer.batch_size == batch_size
    augmenter = build_unlabeled_augmenter(trainer)
    assert isinstance(augmenter, SingleThreadedAugmenter)  # nnUNet_n_proc_DA=0
    for _ in range(3):
        batch = next(augmenter)
        assert "target" not in batch
        assert set(batch["keys"]) <= UNLABELED | {"unl_copy"} and len(batch["keys"]) == batch_size
        assert batch["data"].shape == (batch_size, 2, *patch) and batch["data"].dtype == torch.float32
        assert batch["valid"].shape == (batch_size, 1, *patch) and batch["valid"].dtype == torch.bool
        assert batch["valid"].any()
    assert next(build_unlabeled_augmenter(trainer, batch_size=1))["data"].shape[0] == 1


def test_multithreaded_augmenter_uses_half_the_workers(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

    preprocess_unlabeled(DATASET_ID)
    monkeypatch.setenv("nnUNet_n_proc_DA", "3")
    augmenter = build_unlabeled_augmenter(_trainer(root, "3d_fullres"), batch_size=1)
    try:
        assert isinstance(augmenter, NonDetMultiThreadedAugmenter) and augmenter.num_processes == 1
        assert next(augmenter)["valid"].shape == (1, 1, 20, 24, 28)
    finally:
        augmenter._finish()


def test_derived_plans_with_same_data_identifier_are_accepted(root: Path) -> None:
    pre = root / "nnUNet_preprocessed" / DATASET
    preprocess_unlabeled(DATASET_ID)
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["plans_name"] = "nnUNetPlansDerived"
    plans["configurations"]["3d_fullres_bs1"] = {"inherits_from": "3d_fullres", "batch_size": 1}
    (pre / "nnUNetPlansDerived.json").write_text(json.dumps(plans))
    for configuration in ("3d_fullres", "3d_fullres_bs1"):
        batch = next(build_unlabeled_augmenter(_trainer(root, configuration, "nnUNetPlansDerived.json"),
                                               batch_size=1))
        assert batch["data"].shape == (1, 2, 20, 24, 28)


def _empty(folder: Path) -> None:
    for f in folder.glob("*.b2nd"):
        f.unlink()


def _other_data_identifier(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["data_identifier"] = "nnUNetPlans_2d"
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("mutate, expected", [
    pytest.param(None, "does not exist", id="never_preprocessed"),
    pytest.param(_empty, "no preprocessed case", id="empty_folder"),
    pytest.param(_other_data_identifier, "another data identifier", id="other_data_identifier"),
])
def test_augmenter_errors_name_the_command(root: Path, mutate, expected: str) -> None:
    if mutate is not None:
        (out,) = preprocess_unlabeled(DATASET_ID)
        mutate(Path(out))
    with pytest.raises(RuntimeError) as info:
        build_unlabeled_augmenter(_trainer(root, "3d_fullres"))
    assert expected in str(info.value) and f"{HINT} -d 990 -c 3d_fullres -p nnUNetPlans" in str(info.value)
