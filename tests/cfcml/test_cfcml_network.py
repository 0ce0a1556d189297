"""CFCMLNet and its parts: token compression, cross-attention, network contract (2D and 3D)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nnunet_ext.cfcml.network import (
    CFCMLClassifier,
    CFCMLNet,
    CrossModalEnhancement,
    GranularityAggregation,
    TokenCompression,
    pooled_grid,
)
from nnunet_ext.cfcml.tabular import TabularBatch


def encoder_kwargs(dim: int, n_stages: int = 4) -> dict:
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    norm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
    return {"n_stages": n_stages, "features_per_stage": [4 * 2 ** i for i in range(n_stages)], "conv_op": conv,
            "kernel_sizes": [[3] * dim] * n_stages, "strides": [[1] * dim] + [[2] * dim] * (n_stages - 1),
            "n_conv_per_stage": [1] * n_stages, "conv_bias": True, "norm_op": norm,
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "nonlin": nn.LeakyReLU,
            "nonlin_kwargs": {"inplace": True}}


def make_net(dim=2, groups=((0, 1, 2),), patch=None, **kwargs) -> CFCMLNet:
    torch.manual_seed(0)
    patch = patch or ((32, 32) if dim == 2 else (16, 16, 16))
    defaults = dict(vocabulary_sizes=[3, 2], num_numeric=2, d=16, heads=4, num_latents_image=6,
                    num_latents_tabular=4, tabular_embed_dim=8)
    defaults.update(kwargs)
    return CFCMLNet(encoder_kwargs(dim), [1] * 3, 2, patch, [list(g) for g in groups], 3, **defaults)


def tab_batch(b: int, seed: int = 0) -> TabularBatch:
    g = torch.Generator().manual_seed(seed)
    return TabularBatch(torch.randint(0, 3, (b, 2), generator=g), torch.randn(b, 2, generator=g),
                        torch.rand(b, 2, generator=g) < 0.3)


@pytest.mark.parametrize("grid,max_tokens,expected", [((8, 8), 4096, (8, 8)), ((64, 64), 1024, (32, 32)),
                                                      ((64, 64, 12), 4096, (27, 27, 5)), ((100, 10), 50, (22, 2))])
def test_pooled_grid(grid, max_tokens, expected):
    out = pooled_grid(grid, max_tokens)
    assert out == expected and len(out) == len(grid)
    import math
    assert math.prod(out) <= max_tokens


@pytest.mark.parametrize("grid,max_tokens,kernel", [((8, 8), 4096, 3), ((8, 8), 16, 1), ((4, 6, 2), 4096, 3),
                                                    ((8, 8, 8), 64, 3)])
def test_token_compression_shapes(grid, max_tokens, kernel):
    compression = TokenCompression(grid, channels=5, num_latents=7, d=12, max_tokens=max_tokens, kernel_size=kernel)
    out = compression(torch.randn(2, 5, *grid))
    assert out.shape == (2, 7, 12)
    assert compression.mix.in_channels == min(max_tokens, torch.Size(grid).numel())


def test_token_compression_errors():
    with pytest.raises(ValueError, match="patch size"):
        TokenCompression((8, 8), 5, 7, 12)(torch.randn(1, 5, 8, 9))
    with pytest.raises(ValueError, match="odd"):
        TokenCompression((8, 8), 5, 7, 12, kernel_size=2)
    with pytest.raises(ValueError, match="2 or 3 axes"):
        TokenCompression((8,), 5, 7, 12)


def test_cross_attention_aggregation_classifier_shapes():
    cie = CrossModalEnhancement(16, 4)
    assert cie(torch.randn(2, 6, 16), torch.randn(2, 9, 16)).shape == (2, 12, 16)
    assert GranularityAggregation(24, 6)(torch.randn(2, 24, 16)).shape == (2, 16)
    assert CFCMLClassifier(32, 16, 3)(torch.randn(2, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="divisible"):
        CrossModalEnhancement(10, 4)
    with pytest.raises(ValueError, match="dropout"):
        CFCMLClassifier(32, 16, 3, dropout=1.0)


@pytest.mark.parametrize("dim,groups", [(2, ((0, 1, 2),)), (2, ((0,), (1, 2))), (3, ((0,), (1,), (2,)))])
def test_network_contract(dim, groups):
    net = make_net(dim, groups)
    patch = net.patch_size
    x = torch.randn(2, 3, *patch)
    tab = tab_batch(2)
    net.train()
    seg_train = net(x)
    assert isinstance(seg_train, list) and seg_train[0].shape == (2, 2, *patch)
    net.eval()
    net.deep_supervision = False
    with torch.no_grad():
        seg = net(x)
        seg_all, logits, features = net.forward_all(x, tab)
    assert isinstance(seg, torch.Tensor) and seg.shape == (2, 2, *patch)
    assert torch.equal(seg, seg_all)
    m = len(groups) + 1
    assert logits.shape == (2, 3) and features.shape == (m, 2, 16)
    assert torch.equal(net.classify(x, tab), logits)
    if dim == 3:  # never a full-resolution 3D stage
        assert all(g != patch for g in net.token_grids)
    with pytest.raises(ValueError, match="patch size"):
        net.classify(torch.randn(1, 3, *[p * 2 for p in patch]), tab_batch(1))


def test_each_encoder_runs_once_per_forward_all():
    net = make_net(2, ((0,), (1, 2)))
    calls = []
    for i, encoder in enumerate(net.encoders):
        encoder.register_forward_hook(lambda *_, i=i: calls.append(i))
    net.forward_all(torch.randn(2, 3, 32, 32), tab_batch(2))
    assert sorted(calls) == [0, 1]


def test_gradients_reach_every_classification_part():
    net = make_net(2, ((0,), (1, 2)))
    _, logits, features = net.forward_all(torch.randn(4, 3, 32, 32), tab_batch(4))
    (logits.sum() + features.sum()).backward()
    for name in ("encoders.1", "compression", "tabular", "cie", "aggregation", "classifier"):
        grads = [p.grad for n, p in net.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None for g in grads), name


def test_image_only_ignores_table_and_tabular_only_ignores_images():
    image_only = make_net(modalities="image").eval()
    x = torch.randn(2, 3, 32, 32)
    assert image_only.tabular is None and image_only.num_modalities == 1
    assert torch.equal(image_only.classify(x, tab_batch(2, 0)), image_only.classify(x, tab_batch(2, 1)))
    assert torch.equal(image_only.classify(x, None), image_only.classify(x, tab_batch(2, 0)))
    tabular_only = make_net(modalities="tabular").eval()
    tab = tab_batch(2)
    assert torch.equal(tabular_only.classify(x, tab), tabular_only.classify(torch.randn(2, 3, 32, 32), tab))
    assert len(tabular_only.compression) == 0
    with torch.no_grad():
        assert tabular_only(x)[0].shape == (2, 2, 32, 32)  # segmentation still works (deep supervision on)


def test_concat_fusion_and_single_granularity():
    net = make_net(fusion="concat", num_granularities=1)
    assert net.cie is None and len(net.stages) == 1 and net.stages[0] == 3
    _, logits, features = net.forward_all(torch.randn(2, 3, 32, 32), tab_batch(2))
    assert logits.shape == (2, 3) and features.shape == (2, 2, 16)


def test_shared_encoders():
    net = make_net(2, ((0,), (1,)), share_encoders=True)
    assert len(net.encoders) == 1
    _, logits, features = net.forward_all(torch.randn(2, 3, 32, 32), tab_batch(2))
    assert features.shape == (3, 2, 16)


@pytest.mark.parametrize("kwargs,message", [({"modalities": "text"}, "modalities"), ({"fusion": "sum"}, "fusion"),
                                            ({"num_granularities": 0}, "num_granularities"),
                                            ({"share_encoders": True}, "equal channel counts")])
def test_bad_network_options(kwargs, message):
    groups = ((0,), (1, 2)) if "share_encoders" in kwargs else ((0, 1, 2),)
    with pytest.raises(ValueError, match=message):
        make_net(2, groups, **kwargs)


def test_missing_table_is_an_error():
    with pytest.raises(ValueError, match="TabularBatch"):
        make_net().forward_all(torch.randn(1, 3, 32, 32), None)
