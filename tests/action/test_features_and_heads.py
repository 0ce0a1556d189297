"""Decoder-feature taps and heads: logits identical to net(x), feature shapes, head shapes, bad inputs."""
from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_ext.action.features import (
    bottleneck_channels,
    decoder_stage_channels,
    encoder_bottleneck,
    forward_with_features,
    full_resolution,
)
from nnunet_ext.action.heads import GlobalProjector, PointwiseMLP, Predictor, RepresentationMLP, TwoLinear


def _net(kind: str, dim: int, deep_supervision: bool) -> nn.Module:
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    norm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
    common = dict(input_channels=2, n_stages=3, features_per_stage=[4, 8, 16], conv_op=conv,
                  kernel_sizes=3, strides=[1, 2, 2], num_classes=3, n_conv_per_stage_decoder=1, conv_bias=True,
                  norm_op=norm, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
                  deep_supervision=deep_supervision)
    if kind == "plain":
        return PlainConvUNet(n_conv_per_stage=1, **common)
    return ResidualEncoderUNet(n_blocks_per_stage=1, **common)


@pytest.mark.parametrize("kind", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_forward_with_features_matches_the_network(kind, dim, deep_supervision):
    torch.manual_seed(0)
    net = _net(kind, dim, deep_supervision).eval()
    x = torch.randn(2, 2, *([16] * dim))
    logits, bottleneck, features = forward_with_features(net, x)
    expected = net(x)
    if deep_supervision:
        assert isinstance(logits, list) and len(logits) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(logits, expected))
    else:
        assert torch.equal(logits, expected)
    assert torch.equal(full_resolution(logits), expected[0] if deep_supervision else expected)
    assert bottleneck.shape == (2, 16, *([4] * dim)) and bottleneck.shape[1] == bottleneck_channels(net)
    assert torch.equal(encoder_bottleneck(net, x), bottleneck)
    # highest resolution first, channels as announced, and no hooks left behind
    assert [f.shape[1] for f in features] == decoder_stage_channels(net) == [4, 8]
    assert features[0].shape[2:] == x.shape[2:] and features[1].shape[2:] == tuple([8] * dim)
    assert all(not stage._forward_hooks for stage in net.decoder.stages)


def test_forward_with_features_rejects_other_architectures():
    with pytest.raises(TypeError, match="PlainConvUNet"):
        forward_with_features(nn.Conv3d(1, 1, 1), torch.zeros(1, 1, 4, 4, 4))


def test_hooks_are_removed_when_the_forward_fails():
    net = _net("plain", 3, False)
    with pytest.raises(RuntimeError):
        forward_with_features(net, torch.zeros(1, 5, 8, 8, 8))  # wrong channel count
    assert all(not stage._forward_hooks for stage in net.decoder.stages)


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_global_projector_masked_mean(spatial):
    torch.manual_seed(0)
    head = GlobalProjector(8, 4)
    x = torch.randn(2, 8, *spatial)
    assert head(x).shape == (2, 4)
    weights = torch.zeros(2, 1, *spatial)
    weights[:, :, 0] = 1.0  # only the first slab is valid
    masked = head(x, weights)
    manual = head.mlp(x[:, :, 0].flatten(2).mean(-1))
    assert torch.allclose(masked, manual, atol=1e-6)


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_pointwise_mlp_is_a_1x1_convolution(spatial):
    torch.manual_seed(0)
    head = PointwiseMLP(3, 6, 3)
    x = torch.randn(2, 3, *spatial)
    conv = nn.Conv2d if len(spatial) == 2 else nn.Conv3d
    c1, c2 = conv(3, 6, 1), conv(6, 3, 1)
    for c, lin in ((c1, head.mlp[0]), (c2, head.mlp[1])):
        c.weight.data = lin.weight.data.view(c.weight.shape)
        c.bias.data = lin.bias.data
    assert torch.allclose(head(x), c2(c1(x)), atol=1e-5)


def test_head_shapes_and_bad_options():
    assert Predictor(6)(torch.randn(3, 6)).shape == (3, 6)
    assert RepresentationMLP(12, 5)(torch.randn(7, 12)).shape == (7, 5)
    with pytest.raises(ValueError, match="positive integer"):
        TwoLinear(0, 4, 4)
    with pytest.raises(ValueError, match="positive integer"):
        RepresentationMLP(4, -1)
