"""Omni-Correlation Consistency: unlabeled row selection, memory update (the fixed official bug), the loss."""
from __future__ import annotations

import pytest
import torch

from nnunet_ext.caml.losses import omni_correlation_loss
from nnunet_ext.caml.networks import CAMLHeads
from nnunet_ext.caml.occ import OmniCorrelationConsistency, select_confident_rows, voxel_rows


# ------------------------------------------------------------------ row selection
def test_rows_are_the_most_confident_agreeing_valid_voxels_per_class():
    pred_v = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2]])
    pred_a = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 0]])
    conf = torch.tensor([[0.9, 0.8, 0.99, 0.5, 0.7, 0.6, 0.95, 0.9]])
    valid = torch.tensor([[True, True, True, True, True, False, True, True]])
    rows = select_confident_rows(pred_v, conf, pred_a, valid, num_classes=3, num_filtered=1, min_rows=1)
    # class 0: voxels 0, 1 agree (2 disagrees) -> best 0; class 1: 3, 4 (5 invalid) -> best 4; class 2: 6 only
    assert rows.index.tolist() == [0, 4, 6] and rows.row_class.tolist() == [0, 1, 2]
    rows = select_confident_rows(pred_v, conf, pred_a, valid, num_classes=3, num_filtered=5)
    # default min_rows = 2 drops class 2 (a single agreeing voxel); blocks sorted by confidence
    assert rows.index.tolist() == [0, 1, 4, 3] and rows.row_class.tolist() == [0, 0, 1, 1]


def test_rows_index_the_flattened_batch_and_may_be_empty():
    pred = torch.zeros(2, 3, 4, dtype=torch.long)
    conf = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0))
    rows = select_confident_rows(pred, conf, pred, None, num_classes=2, num_filtered=30)
    assert rows.index.numel() == 24 and set(rows.index.tolist()) == set(range(24))
    assert torch.equal(conf.flatten()[rows.index], conf.flatten().sort(descending=True).values)
    empty = select_confident_rows(pred, conf, 1 - pred, None, num_classes=2)
    assert empty.index.numel() == 0


def test_row_selection_bad_arguments():
    with pytest.raises(ValueError, match="one shape"):
        select_confident_rows(torch.zeros(1, 3), torch.zeros(1, 4), torch.zeros(1, 3), None, 2)
    with pytest.raises(ValueError, match=">= 1"):
        select_confident_rows(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), None, 2, num_filtered=0)


# ------------------------------------------------------------------ memory update
def _labeled(batch=2, spatial=(4, 5), channels=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (batch, *spatial), generator=g)
    emb_v = torch.randn(batch, channels, *spatial, generator=g)
    emb_a = torch.randn(batch, channels, *spatial, generator=g)
    return emb_v, emb_a, target


def _warm_heads(heads):
    """Give the BatchNorm layers non-trivial running statistics."""
    with torch.no_grad():
        heads.train()
        for _ in range(3):
            heads.correlation_features(3 * torch.randn(50, 8) + 1, torch.randn(50, 8) - 2)
    return heads


def test_memory_features_are_voxel_vectors_of_both_models_with_heads_in_eval_mode():
    occ = OmniCorrelationConsistency(num_classes=3, feat_dim=16, memory_per_class=2, memory_cap=100)
    heads = _warm_heads(CAMLHeads(8, 16))
    running = {k: v.clone() for k, v in heads.state_dict().items() if "running" in k}
    emb_v, emb_a, target = _labeled()
    pred_v = target.clone()
    pred_a = target.clone()
    pred_a[0, 0, 0] = (target[0, 0, 0] + 1) % 3  # a is wrong at one voxel -> not a memory voxel
    occ.update_memory(heads, emb_v, emb_a, pred_v, pred_a, target, ["case_0", "case_1"])
    assert heads.training and all(m.training for m in heads.modules())
    for k, v in heads.state_dict().items():
        if "running" in k:
            assert torch.equal(v, running[k]), k
    # recompute the expected features of case_0 voxel by voxel
    heads.eval()
    correct = torch.ones(4, 5, dtype=torch.bool)
    correct[0, 0] = False
    with torch.no_grad():
        for c in range(3):
            voxels = torch.nonzero(correct & (target[0] == c))
            expected = heads.memory_features(emb_v[0][:, voxels[:, 0], voxels[:, 1]].t(),
                                             emb_a[0][:, voxels[:, 0], voxels[:, 1]].t())
            torch.testing.assert_close(occ.bank.features["case_0"][c], expected)
            assert occ.bank.counts["case_0"][c] == voxels.shape[0]
    assert sum(occ.bank.counts["case_1"]) == 20


def test_memory_update_caps_rows_and_excludes_ignore_label():
    occ = OmniCorrelationConsistency(num_classes=2, feat_dim=4, memory_per_class=2, memory_cap=3)
    heads = CAMLHeads(8, 4)
    emb_v, emb_a, target = _labeled(batch=1, spatial=(6, 6), classes=2)
    target[0, :2] = 2  # ignore label (K = 2 outputs)
    prediction = torch.where(target == 2, torch.zeros_like(target), target)
    occ.update_memory(heads, emb_v, emb_a, prediction, prediction, target, ["a"], ignore_label=2)
    counts = occ.bank.counts["a"]
    assert counts == [int((target[0] == 0).sum()), int((target[0] == 1).sum())]
    assert [t.shape[0] for t in occ.bank.features["a"]] == [min(n, 3) for n in counts]


def test_duplicate_case_in_a_batch_keeps_the_later_sample():
    occ = OmniCorrelationConsistency(num_classes=3, feat_dim=4, memory_per_class=2, memory_cap=100)
    heads = CAMLHeads(8, 4)
    emb_v, emb_a, target = _labeled()
    occ.update_memory(heads, emb_v, emb_a, target, target, target, ["same", "same"])
    assert len(occ.bank) == 1
    assert occ.bank.counts["same"] == [int((target[1] == c).sum()) for c in range(3)]


def test_memory_slots_keep_the_last_samples_in_a_ring():
    # 2D: a sample is one slice; per-case slots would keep one slice per case (the test above), a ring keeps the
    # last ``memory_slots`` samples whatever their case
    occ = OmniCorrelationConsistency(num_classes=3, feat_dim=4, memory_per_class=2, memory_cap=100, memory_slots=3)
    heads = CAMLHeads(8, 4)
    emb_v, emb_a, target = _labeled()
    occ.update_memory(heads, emb_v, emb_a, target, target, target, ["same", "same"])
    assert len(occ.bank) == 2 and occ.samples_stored == 2
    occ.update_memory(heads, emb_v.flip(0), emb_a.flip(0), target.flip(0), target.flip(0), target.flip(0),
                      ["same", "same"])
    assert len(occ.bank) == 3 and occ.samples_stored == 4
    # slot 0 was overwritten by the 4th sample (= target[0] again), slots 1 and 2 hold target[1], target[1]
    expected = [[int((target[i] == c).sum()) for c in range(3)] for i in (0, 1, 1)]
    assert [occ.bank.counts[f"sample slot {k}"] for k in range(3)] == expected
    other = OmniCorrelationConsistency(num_classes=3, feat_dim=4, memory_per_class=2, memory_cap=100,
                                       memory_slots=3)
    other.load_state_dict(occ.state_dict())
    assert other.samples_stored == 4 and other.bank.counts == occ.bank.counts


@pytest.mark.parametrize("slots", [0, -1, 2.5, True, "8"])
def test_memory_slots_must_be_none_or_a_positive_integer(slots):
    with pytest.raises(ValueError, match="memory_slots"):
        OmniCorrelationConsistency(3, memory_slots=slots)


def test_memory_update_bad_arguments():
    occ = OmniCorrelationConsistency(num_classes=3, feat_dim=4, memory_per_class=2, memory_cap=4)
    emb_v, emb_a, target = _labeled()
    with pytest.raises(ValueError, match="keys"):
        occ.update_memory(CAMLHeads(8, 4), emb_v, emb_a, target, target, target, ["only_one"])
    with pytest.raises(ValueError, match="inconsistent shapes"):
        occ.update_memory(CAMLHeads(8, 4), emb_v, emb_a, target[:, :2], target, target, ["a", "b"])


# ------------------------------------------------------------------ the loss
class CountingHeads(CAMLHeads):
    calls = 0

    def correlation_features(self, rows_v, rows_a):
        type(self).calls += 1
        return super().correlation_features(rows_v, rows_a)


def _unlabeled(batch=2, spatial=(4, 5), classes=3, seed=1, agree=True):
    g = torch.Generator().manual_seed(seed)
    emb_v = torch.randn(batch, 8, *spatial, generator=g).requires_grad_()
    emb_a = torch.randn(batch, 8, *spatial, generator=g).requires_grad_()
    probs_v = torch.softmax(3 * torch.randn(batch, classes, *spatial, generator=g), 1)
    probs_a = probs_v.clone() if agree else torch.softmax(torch.randn(batch, classes, *spatial, generator=g), 1)
    return emb_v, emb_a, probs_v, probs_a


def _filled_occ(**kwargs):
    occ = OmniCorrelationConsistency(num_classes=3, feat_dim=4, memory_per_class=4, memory_cap=50, **kwargs)
    heads = CAMLHeads(8, 4)
    emb_v, emb_a, target = _labeled(spatial=(6, 6))
    occ.update_memory(heads, emb_v, emb_a, target, target, target, ["a", "b"])
    return occ, heads


def test_loss_equals_manual_computation_and_reaches_heads_and_both_models():
    occ, heads = _filled_occ()
    emb_v, emb_a, probs_v, probs_a = _unlabeled()
    valid = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    valid[1, 0, 0] = False
    generator_state = torch.get_rng_state()
    result = occ.loss(heads, emb_v, emb_a, probs_v, probs_a, valid)
    labels = probs_v.argmax(1)[valid[:, 0]]
    per_class = [int((labels == c).sum()) for c in range(3)]
    assert result.num_memory_classes == 3 and result.num_rows == sum(n for n in per_class if n >= 2) < 40
    result.loss.backward()
    for name in ("proj_v", "proj_a", "pred_v", "pred_a"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(heads, name).parameters()), name
    assert emb_v.grad.abs().sum() > 0 and emb_a.grad.abs().sum() > 0
    assert float(emb_v.grad[1, :, 0, 0].abs().sum()) == 0.0  # the padded voxel is not a row

    torch.set_rng_state(generator_state)
    memory, _ = occ.bank.sample(4)
    rows = select_confident_rows(probs_v.argmax(1), probs_v.max(1).values, probs_a.argmax(1), valid[:, 0], 3, 12800)
    u_v, u_a = heads.correlation_features(voxel_rows(emb_v)[rows.index], voxel_rows(emb_a)[rows.index])
    torch.testing.assert_close(result.loss, omni_correlation_loss(u_v, u_a, memory))


def test_no_rows_or_no_memory_gives_zero_without_calling_the_heads():
    occ, _ = _filled_occ()
    heads = CountingHeads(8, 4)
    CountingHeads.calls = 0
    emb_v, emb_a, probs_v, _ = _unlabeled()
    disagree = torch.roll(probs_v, 1, dims=1)  # argmax differs everywhere
    result = occ.loss(heads, emb_v, emb_a, probs_v, disagree)
    assert float(result.loss) == 0.0 and result.num_rows == 0
    empty = OmniCorrelationConsistency(num_classes=3, feat_dim=4, memory_per_class=4, memory_cap=50)
    result = empty.loss(heads, emb_v, emb_a, probs_v, probs_v.clone())
    assert float(result.loss) == 0.0 and result.num_memory_classes == 0
    assert CountingHeads.calls == 0


def test_heads_before_filter_uses_the_same_rows():
    emb_v, emb_a, probs_v, probs_a = _unlabeled(spatial=(6, 6))
    results = []
    for before in (False, True):
        torch.manual_seed(0)
        occ, heads = _filled_occ(heads_before_filter=before, num_filtered=3)
        torch.manual_seed(1)
        results.append(occ.loss(heads, emb_v, emb_a, probs_v, probs_a))
    assert results[0].num_rows == results[1].num_rows == 9
    assert torch.isfinite(results[1].loss)
    # BatchNorm statistics over more voxels: a different, but close-in-kind, value
    assert float(results[0].loss.detach()) != float(results[1].loss.detach())


def test_detached_targets_stop_gradients_to_the_auxiliary_side():
    occ, heads = _filled_occ(detach_targets=True)
    emb_v, emb_a, probs_v, probs_a = _unlabeled()
    occ.loss(heads, emb_v, emb_a, probs_v, probs_a).loss.backward()
    assert emb_v.grad.abs().sum() > 0
    assert emb_a.grad is None or float(emb_a.grad.abs().sum()) == 0.0


def test_state_round_trip_and_bad_options():
    occ, _ = _filled_occ()
    other = OmniCorrelationConsistency(num_classes=3, feat_dim=4, memory_per_class=4, memory_cap=50)
    other.load_state_dict(occ.state_dict())
    assert other.bank.counts == occ.bank.counts
    with pytest.raises(ValueError, match="memory_cap"):
        OmniCorrelationConsistency(3, memory_per_class=10, memory_cap=5)
    with pytest.raises(ValueError, match="log form"):
        OmniCorrelationConsistency(3, log_form="log")
    with pytest.raises(ValueError, match="temperature"):
        OmniCorrelationConsistency(3, temperature=0)
