"""Class-balanced sampling, the lr schedule and whole-case crops."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from nnunet_ext.cfcml.data import crop_or_pad_to_patch, foreground_centre
from nnunet_ext.cfcml.sampler import balanced_indices, check_balanced_batch_size
from nnunet_ext.cfcml.schedule import CFCMLLRScheduler, cfcml_lr_factor

KEYS = [["a0", "a1", "a2", "a3", "a4"], ["b0"], ["c0", "c1"]]


@pytest.mark.parametrize("batch_size", [6, 9, 36])
def test_every_batch_has_batch_size_over_k_cases_per_class(batch_size):
    rng = np.random.default_rng(0)
    class_of = {k: c for c, keys in enumerate(KEYS) for k in keys}
    for _ in range(20):
        batch = balanced_indices(KEYS, batch_size, rng)
        assert len(batch) == batch_size
        assert Counter(class_of[k] for k in batch) == {0: batch_size // 3, 1: batch_size // 3, 2: batch_size // 3}
        assert [class_of[k] for k in batch[:3]] == [0, 1, 2]  # interleaved


def test_draws_are_uniform_with_replacement():
    rng = np.random.default_rng(1)
    counts = Counter(k for _ in range(2000) for k in balanced_indices(KEYS, 6, rng) if k.startswith("a"))
    assert set(counts) == set(KEYS[0])
    assert max(counts.values()) / min(counts.values()) < 1.3


@pytest.mark.parametrize("batch_size,num_classes", [(7, 3), (3, 3), (4, 3), (2, 2), (5, 1)])
def test_bad_batch_sizes(batch_size, num_classes):
    with pytest.raises(ValueError):
        check_balanced_batch_size(batch_size, num_classes)


def test_class_without_cases_is_an_error():
    with pytest.raises(ValueError, match=r"class\(es\) \[1\]"):
        balanced_indices([["a"], []], 4)


def test_lr_factors_default_and_faithful():
    faithful = [cfcml_lr_factor(e, faithful=True) for e in range(50)]
    table = {1: 0.0, 2: 0.2, 3: 0.4, 4: 0.6, 5: 0.8, 6: 1.0, 11: 1.0, 12: 0.8, 16: 0.8, 17: 0.64, 22: 0.512,
             27: 0.4096, 32: 0.32768, 37: 0.262144, 42: 0.2097152, 47: 0.16777216, 50: 0.16777216}
    for epoch, factor in table.items():  # 1-indexed epochs of the original table
        assert faithful[epoch - 1] == pytest.approx(factor)
    default = [cfcml_lr_factor(e) for e in range(50)]
    assert default[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert default[:-1] == pytest.approx(faithful[1:])  # the original shifted by one epoch
    assert min(default) > 0


def test_scheduler_sets_every_group():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)
    scheduler = CFCMLLRScheduler(optimizer, 5e-4)
    for epoch in (0, 3, 12):
        scheduler.step(epoch)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4 * cfcml_lr_factor(epoch)] * 2)


def test_crop_or_pad_centre_and_lesion():
    data = np.arange(2 * 6 * 8, dtype=np.float32).reshape(2, 6, 8)
    out = crop_or_pad_to_patch(data, (4, 4))
    assert out.shape == (2, 4, 4) and np.array_equal(out, data[:, 1:5, 2:6])
    padded = crop_or_pad_to_patch(data, (8, 10))
    assert padded.shape == (2, 8, 10) and np.array_equal(padded[:, 1:7, 1:9], data) and padded[:, 0].sum() == 0
    shifted = crop_or_pad_to_patch(data, (2, 2), centre=(1.0, 1.0))
    assert np.array_equal(shifted, data[:, :2, :2])
    two_d_case = data[:, None]  # 2D configuration: [C, 1, Y, X]
    assert np.array_equal(crop_or_pad_to_patch(two_d_case, (4, 4)), out)
    with pytest.raises(ValueError, match="does not fit"):
        crop_or_pad_to_patch(data, (4, 4, 4))


def test_foreground_centre():
    seg = np.zeros((1, 10, 10))
    seg[0, 2:5, 6:9] = 1
    assert foreground_centre(seg) == [3.5, 7.5]
    assert foreground_centre(np.zeros((1, 4, 4))) is None
