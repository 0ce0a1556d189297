"""LabeledFeatureMemoryBank: cap, replacement semantics, sampling (uniform and count-weighted), state round trip."""
from __future__ import annotations

import pytest
import torch

from nnunet_ext.caml.memory_bank import LabeledFeatureMemoryBank


def _rows(n, dim=4, offset=0.0):
    """Rows whose first column identifies them: row i has value offset + i."""
    rows = torch.zeros(n, dim)
    rows[:, 0] = offset + torch.arange(n, dtype=torch.float32)
    return rows


def _fill(bank, key, counts, offset):
    cap = bank.memory_cap
    bank.update_slot(key, [_rows(min(n, cap), bank.feat_dim, offset + 1000 * k) for k, n in enumerate(counts)],
                     counts)


def test_update_replaces_slot_and_keeps_true_counts():
    bank = LabeledFeatureMemoryBank(num_classes=2, feat_dim=4, memory_cap=8)
    _fill(bank, "case_a", [20, 3], 0)
    assert len(bank) == 1 and bank.counts["case_a"] == [20, 3]
    assert [t.shape[0] for t in bank.features["case_a"]] == [8, 3]  # capped at memory_cap
    _fill(bank, "case_a", [0, 5], 100)  # the next visit replaces every class of the slot
    assert len(bank) == 1 and bank.counts["case_a"] == [0, 5]
    assert [t.shape[0] for t in bank.features["case_a"]] == [0, 5]
    assert float(bank.features["case_a"][1][0, 0]) == 1100.0
    assert bank.total_counts() == [0, 5]


def test_duplicate_key_keeps_the_later_sample():
    bank = LabeledFeatureMemoryBank(2, 4, 8)
    _fill(bank, "case_a", [4, 4], 0)
    _fill(bank, "case_a", [2, 2], 50)
    assert bank.counts["case_a"] == [2, 2] and float(bank.features["case_a"][0][0, 0]) == 50.0


def test_sample_returns_distinct_rows_of_qualifying_classes_only():
    bank = LabeledFeatureMemoryBank(3, 4, memory_cap=64)
    _fill(bank, "a", [40, 10, 0], 0)
    _fill(bank, "b", [40, 5, 33], 500)
    memory, row_class = bank.sample(32, torch.Generator().manual_seed(0))
    # class 1 has only 15 correct voxels in total -> absent; classes 0 and 2 qualify
    assert memory.shape == (64, 4) and row_class.tolist() == [0] * 32 + [2] * 32
    assert not memory.requires_grad
    for k in (0, 2):
        ids = memory[row_class == k, 0]
        assert ids.unique().numel() == 32  # without replacement


def test_sample_empty_when_no_class_qualifies():
    bank = LabeledFeatureMemoryBank(2, 4, 16)
    memory, row_class = bank.sample(8)
    assert memory.shape == (0, 4) and row_class.shape == (0,)
    _fill(bank, "a", [3, 2], 0)
    assert bank.sample(8)[0].shape == (0, 4)


def test_uncapped_sampling_is_uniform_over_stored_rows():
    bank = LabeledFeatureMemoryBank(1, 4, memory_cap=64)
    _fill(bank, "a", [10], 0)
    _fill(bank, "b", [30], 100)
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(40)
    trials = 2000
    for _ in range(trials):
        ids = bank.sample(8, g)[0][:, 0].long()
        hits[torch.where(ids >= 100, ids - 100 + 10, ids)] += 1
    expected = trials * 8 / 40
    assert float((hits - expected).abs().max()) < 0.2 * expected


def test_capped_slots_are_weighted_by_their_true_counts():
    # slot a: 1000 correct voxels stored as 16 rows, slot b: 16 voxels stored fully -> a gets ~1000/1016 of draws
    bank = LabeledFeatureMemoryBank(1, 4, memory_cap=16)
    _fill(bank, "a", [1000], 0)
    _fill(bank, "b", [16], 100)
    g = torch.Generator().manual_seed(1)
    from_b = sum(int((bank.sample(4, g)[0][:, 0] >= 100).sum()) for _ in range(2000))
    share_b = from_b / (2000 * 4)
    # without replacement the share of the light slot is slightly above 16/1016 = 0.0157; tolerance covers that
    assert 0.005 < share_b < 0.04


def test_state_dict_round_trip_is_exact():
    bank = LabeledFeatureMemoryBank(2, 4, 8)
    _fill(bank, "a", [20, 3], 0)
    _fill(bank, "b", [1, 0], 50)
    restored = LabeledFeatureMemoryBank(2, 4, 8)
    restored.load_state_dict(bank.state_dict())
    assert restored.counts == bank.counts
    for key in bank.features:
        assert all(torch.equal(x, y) for x, y in zip(bank.features[key], restored.features[key]))
    with pytest.raises(ValueError, match="saved memory bank"):
        LabeledFeatureMemoryBank(3, 4, 8).load_state_dict(bank.state_dict())


@pytest.mark.parametrize("call, message", [
    (lambda b: b.update_slot("a", [torch.zeros(2, 4, requires_grad=True), torch.zeros(0, 4)], [2, 0]), "detached"),
    (lambda b: b.update_slot("a", [torch.zeros(2, 4)], [2]), "expected 2 classes"),
    (lambda b: b.update_slot("a", [torch.zeros(2, 3), torch.zeros(0, 3)], [2, 0]), r"rows \[s, 4\]"),
    (lambda b: b.update_slot("a", [torch.zeros(2, 4), torch.zeros(0, 4)], [5, 0]), "true count"),
    (lambda b: b.update_slot("a", [torch.zeros(9, 4), torch.zeros(0, 4)], [9, 0]), "true count"),
    (lambda b: b.sample(0), "per_class"),
    (lambda b: b.sample(9), "per_class"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(LabeledFeatureMemoryBank(2, 4, memory_cap=8))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="memory_cap"):
        LabeledFeatureMemoryBank(2, 4, 0)
