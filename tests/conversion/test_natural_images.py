"""Unit tests of the 2D image/mask helpers and the case checks of the volume writer (no dataset written)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nnunet_ext.conversion.common import ConversionError
from nnunet_ext.conversion.natural_images import ImageCase, _read_mask, _read_rgb, convert_image_classification
from nnunet_ext.conversion.volumes import VolumeCase, check_channel_names


def _save(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("pixels", [
    np.arange(4 * 5 * 4, dtype=np.uint8).reshape(4, 5, 4),  # RGBA: alpha dropped
    np.arange(20, dtype=np.uint8).reshape(4, 5),  # grey: replicated to RGB
    np.arange(60, dtype=np.uint8).reshape(4, 5, 3),
])
def test_read_rgb_always_gives_three_channels(tmp_path, pixels):
    rgb = _read_rgb(_save(pixels, tmp_path / "x.png"))
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    expected = pixels[..., :3] if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=-1)
    np.testing.assert_array_equal(rgb, expected)


@pytest.mark.parametrize("mask, expected", [
    (np.array([[0, 255], [255, 0]], np.uint8), [[0, 1], [1, 0]]),
    (np.array([[0, 1], [1, 1]], np.uint8), [[0, 1], [1, 1]]),
    (np.stack([np.array([[0, 255], [0, 0]], np.uint8)] * 3, axis=-1), [[0, 1], [0, 0]]),  # RGB rendering
])
def test_read_mask_binarises(tmp_path, mask, expected):
    np.testing.assert_array_equal(_read_mask(_save(mask, tmp_path / "m.png"), (2, 2), "c"), expected)


@pytest.mark.parametrize("mask, shape, message", [
    (np.array([[0, 128], [255, 0]], np.uint8), (2, 2), r"values \[0, 128, 255\]; expected a binary mask"),
    (np.zeros((2, 3), np.uint8), (2, 2), r"size \(2, 3\) .* image has \(2, 2\)"),
    (np.stack([np.array([[0, 255], [0, 0]], np.uint8), np.zeros((2, 2), np.uint8),
               np.zeros((2, 2), np.uint8)], axis=-1), (2, 2), "is a colour image"),
])
def test_read_mask_rejects(tmp_path, mask, shape, message):
    with pytest.raises(ConversionError, match=f"case c7: .*{message}"):
        _read_mask(_save(mask, tmp_path / "m.png"), shape, "c7")


def test_empty_mask_warns(tmp_path):
    with pytest.warns(UserWarning, match="is empty"):
        _read_mask(_save(np.zeros((2, 2), np.uint8), tmp_path / "m.png"), (2, 2), "c")


def test_classification_rejects_unknown_class_and_duplicates(tmp_path):
    image = _save(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png")
    common = dict(class_names=["a", "b"], feature_columns=[], roi_name="roi", raw_root=tmp_path / "raw",
                  dataset_id=9, name="C", sources=[tmp_path], labeled=None, test=None, seed=0, split_file=None,
                  overwrite=False)
    with pytest.raises(ConversionError, match=r"class names \['z'\] are not among \['a', 'b'\]"):
        convert_image_classification([ImageCase("x", image, "z")], **common)
    with pytest.raises(ConversionError, match="duplicate case identifiers"):
        convert_image_classification([ImageCase("x", image, "a"), ImageCase("x", image, "b")], **common)


def test_channel_names_and_cases_are_validated():
    assert check_channel_names(["FLAIR", "T1"]) == ["FLAIR", "T1"]
    with pytest.raises(ConversionError, match="unique"):
        check_channel_names(["T1", "T1"])
    with pytest.raises(ConversionError, match="at least one"):
        check_channel_names([])
    with pytest.raises(ValueError, match="needs image files or a loader"):
        VolumeCase("c", "nowhere")
