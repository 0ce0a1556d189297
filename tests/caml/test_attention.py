"""Cross-sample Mutual Attention: shapes, which samples/positions mix, identity at eval."""
from __future__ import annotations

import pytest
import torch

from nnunet_ext.caml.attention import CrossSampleMutualAttention, attention_heads_for


def _features(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(3, 8, 4, 5), (4, 8, 3, 4, 2)])
@pytest.mark.parametrize("mode", ["intra+inter", "inter"])
def test_shape_is_kept_and_gradients_flow(shape, mode):
    cma = CrossSampleMutualAttention(8, mode=mode).train()
    x = _features(shape).requires_grad_()
    y = cma(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in cma.parameters())


@pytest.mark.parametrize("shape", [(3, 8, 4, 5), (2, 8, 3, 4, 2)])
def test_identity_in_eval_mode(shape):
    cma = CrossSampleMutualAttention(8).eval()
    x = _features(shape)
    assert cma(x) is x


def _perturbed_pair(shape=(3, 8, 4, 5), sample=1, position=(2, 3)):
    x = _features(shape)
    y = x.clone()
    y[(sample, slice(None), *position)] += 5.0
    return x, y


def _tokens(x):
    return x.flatten(2).transpose(1, 2)  # [B, N, C]


def test_intra_layer_mixes_positions_within_a_sample_only():
    cma = CrossSampleMutualAttention(8, dropout=0.0).train()
    x, y = _perturbed_pair()
    n = 2 * 5 + 3
    out_x, out_y = cma.attend_within_samples(_tokens(x)), cma.attend_within_samples(_tokens(y))
    changed = (out_x - out_y).abs().sum(-1) > 1e-6  # [B, N]
    assert not changed[0].any() and not changed[2].any()  # other samples untouched
    others = torch.ones(20, dtype=torch.bool)
    others[n] = False
    assert changed[1, others].all()  # every other position of the perturbed sample changes


def test_inter_layer_mixes_samples_at_the_same_position_only():
    cma = CrossSampleMutualAttention(8, dropout=0.0).train()
    x, y = _perturbed_pair()
    n = 2 * 5 + 3
    out_x, out_y = cma.attend_across_samples(_tokens(x)), cma.attend_across_samples(_tokens(y))
    changed = (out_x - out_y).abs().sum(-1) > 1e-6
    assert changed[0, n] and changed[2, n]  # other samples change at the perturbed position
    others = torch.ones(20, dtype=torch.bool)
    others[n] = False
    assert not changed[0, others].any() and not changed[2, others].any()


def test_full_module_lets_sample_one_influence_sample_zero():
    cma = CrossSampleMutualAttention(8, dropout=0.0).train()
    x, y = _perturbed_pair()
    assert (cma(x)[0] - cma(y)[0]).abs().max() > 1e-6


def test_official_layer_sizes():
    cma = CrossSampleMutualAttention(128)
    assert cma.num_heads == 4
    assert cma.intra.linear1.out_features == 512 and cma.intra.dropout.p == 0.5
    per_layer = sum(p.numel() for p in cma.intra.parameters())
    assert per_layer == 12 * 128 ** 2 + 13 * 128  # spec: 12C^2 + 13C
    assert CrossSampleMutualAttention(8, mode="inter").intra is None


@pytest.mark.parametrize("channels, requested, expected", [(128, 4, 4), (6, 4, 2), (5, 4, 1), (12, 3, 3)])
def test_heads_fall_back_to_a_divisor(channels, requested, expected):
    assert attention_heads_for(channels, requested) == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"channels": 0}, "channels"),
    ({"channels": 8, "dropout": 1.0}, "dropout"),
    ({"channels": 8, "mode": "v2+"}, "mode"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrossSampleMutualAttention(**kwargs)


def test_wrong_channel_count_is_an_error_in_training():
    with pytest.raises(ValueError, match="expected features"):
        CrossSampleMutualAttention(8).train()(torch.zeros(2, 4, 3, 3))
