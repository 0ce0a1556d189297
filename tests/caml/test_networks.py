"""CAML networks: embedding replay, auxiliary U-Net (interpolation upsampling + CMA), CMA placement, heads."""
from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_ext.caml.networks import (
    AuxiliaryUNet,
    CAMLHeads,
    FeatureHead,
    InterpolationUpsample,
    build_auxiliary_unet,
    check_supported_unet,
    forward_with_embedding,
    full_resolution,
    labeled_part,
    resolve_cma_stage,
)

CASES = [  # (dim, architecture, strides, patch)
    (3, "plain", [1, 2, 2], (8, 12, 8)),
    (3, "residual", [1, (1, 2, 2), 2], (4, 12, 8)),
    (2, "plain", [1, 2, 2], (16, 12)),
    (2, "residual", [1, 2, 2], (12, 16)),
]


def make_unet(dim=3, architecture="plain", strides=(1, 2, 2), deep_supervision=False, features=(8, 16, 32),
              in_channels=2, classes=3, seed=0):
    torch.manual_seed(seed)
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    kwargs = dict(input_channels=in_channels, n_stages=len(features), features_per_stage=list(features),
                  conv_op=conv, kernel_sizes=3, strides=list(strides), num_classes=classes,
                  n_conv_per_stage_decoder=1, conv_bias=True, norm_op=norm,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                  deep_supervision=deep_supervision)
    if architecture == "plain":
        net = PlainConvUNet(n_conv_per_stage=2, **kwargs)
    else:
        net = ResidualEncoderUNet(n_blocks_per_stage=1, **kwargs)
    net.apply(net.initialize)
    return net


def _x(batch, patch, channels=2, seed=1):
    return torch.randn((batch, channels, *patch), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ replay
@pytest.mark.parametrize("dim, architecture, strides, patch", CASES)
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_replay_reproduces_logits_and_returns_last_decoder_features(dim, architecture, strides, patch,
                                                                     deep_supervision):
    net = make_unet(dim, architecture, strides, deep_supervision).eval()
    x = _x(2, patch)
    with torch.no_grad():
        expected = net(x)
        out = forward_with_embedding(net, x)
    if deep_supervision:
        assert len(out.seg) == len(expected) and all(torch.equal(a, b) for a, b in zip(out.seg, expected))
    else:
        assert torch.equal(out.seg, expected)
    assert out.embedding.shape == (2, 8, *patch)
    with torch.no_grad():
        torch.testing.assert_close(net.decoder.seg_layers[-1](out.embedding), full_resolution(out.seg))


def test_module_after_encoder_stage_replaces_skip_and_next_input():
    net = make_unet().eval()
    x = _x(2, (8, 12, 8))
    seen = []

    class Record(nn.Module):
        def forward(self, features):
            seen.append(features.shape)
            return torch.zeros_like(features)

    with torch.no_grad():
        baseline = forward_with_embedding(net, x).seg
        zeroed = forward_with_embedding(net, x, {1: Record()}).seg
        negative_index = forward_with_embedding(net, x, {-2: Record()}).seg
    assert seen == [(2, 16, 4, 6, 4)] * 2
    assert not torch.allclose(baseline, zeroed)
    assert torch.equal(zeroed, negative_index)
    with pytest.raises(ValueError, match="out of range"):
        forward_with_embedding(net, x, {3: nn.Identity()})


# ------------------------------------------------------------------ upsampling and the auxiliary model
@pytest.mark.parametrize("conv, scale, spatial", [
    (nn.Conv3d, (2, 2, 2), (3, 4, 5)),
    (nn.Conv3d, (1, 2, 2), (3, 4, 5)),
    (nn.Conv2d, (2, 2), (5, 3)),
])
def test_interpolation_upsample_matches_transposed_conv_shape(conv, scale, spatial):
    transposed = (nn.ConvTranspose3d if conv is nn.Conv3d else nn.ConvTranspose2d)(16, 8, scale, scale)
    upsample = InterpolationUpsample(16, 8, scale, conv)
    x = torch.randn(2, 16, *spatial)
    assert upsample(x).shape == transposed(x).shape


def test_interpolation_upsample_bad_options():
    with pytest.raises(ValueError, match="conv_op"):
        InterpolationUpsample(4, 4, 2, nn.Linear)
    with pytest.raises(ValueError, match="positive"):
        InterpolationUpsample(4, 4, (0, 2), nn.Conv2d)


@pytest.mark.parametrize("dim, architecture, strides, patch", CASES)
def test_auxiliary_unet_differs_as_in_the_paper(dim, architecture, strides, patch):
    vanilla = make_unet(dim, architecture, strides, seed=0)
    aux = build_auxiliary_unet(make_unet(dim, architecture, strides, seed=1), patch, cma_dropout=0.0)
    assert isinstance(aux, AuxiliaryUNet)
    assert not any(isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)) for m in aux.unet.decoder.modules())
    assert all(isinstance(m, InterpolationUpsample) for m in aux.unet.decoder.transpconvs)
    # independently initialised
    weights_v = vanilla.encoder.state_dict()
    assert any(not torch.equal(weights_v[k], v) for k, v in aux.unet.encoder.state_dict().items()
               if k.endswith("conv.weight"))
    x = _x(2, patch)
    out = aux.train()(x)
    assert full_resolution(out.seg).shape == vanilla(x).shape == (2, 3, *patch)
    assert out.embedding.shape == (2, 8, *patch)


def test_transpconv_auxiliary_keeps_transposed_convolutions():
    aux = build_auxiliary_unet(make_unet(), (8, 12, 8), upsampling="transpconv")
    assert all(isinstance(m, nn.ConvTranspose3d) for m in aux.unet.decoder.transpconvs)
    with pytest.raises(ValueError, match="upsampling"):
        build_auxiliary_unet(make_unet(), (8, 12, 8), upsampling="nearest")


def test_only_the_auxiliary_model_mixes_samples_and_only_in_training():
    patch = (8, 12, 8)
    vanilla = make_unet(seed=0).train()
    aux = build_auxiliary_unet(make_unet(seed=1), patch, cma_dropout=0.0).train()
    x = _x(3, patch)
    y = x.clone()
    y[1] += torch.randn_like(y[1])
    with torch.no_grad():
        assert (aux(x).seg[0] - aux(y).seg[0]).abs().max() > 1e-6
        torch.testing.assert_close(forward_with_embedding(vanilla, x).seg[0],
                                   forward_with_embedding(vanilla, y).seg[0])
        aux.eval()
        torch.testing.assert_close(aux(x).seg[:1], aux(x[:1]).seg, atol=1e-5, rtol=0)


def test_auxiliary_deep_supervision_switch():
    aux = build_auxiliary_unet(make_unet(deep_supervision=True), (8, 12, 8))
    assert isinstance(aux(_x(2, (8, 12, 8))).seg, list)
    aux.set_deep_supervision(False)
    assert isinstance(aux(_x(2, (8, 12, 8))).seg, torch.Tensor)


def test_cma_sits_after_the_resolved_stage():
    aux = build_auxiliary_unet(make_unet(features=(8, 16, 32, 64), strides=(1, 2, 2, 2)), (16, 16, 16))
    assert aux.cma_stage == 3 and aux.cma.channels == 64  # stride 8 is reached at stage 3
    aux = build_auxiliary_unet(make_unet(), (8, 12, 8), cma_stage=1)
    assert aux.cma_stage == 1 and aux.cma.channels == 16


def test_unsupported_architecture_is_named():
    class Other(nn.Module):
        decoder = None

    with pytest.raises(ValueError, match="Other"):
        check_supported_unet(Other())
    with pytest.raises(ValueError, match="channels"):
        AuxiliaryUNet(make_unet(), __import__("nnunet_ext.caml.attention", fromlist=["x"])
                      .CrossSampleMutualAttention(4), 1)


# ------------------------------------------------------------------ CMA placement
@pytest.mark.parametrize("strides, patch, expected", [
    ([1, 2, 2, 2, 2, (1, 2, 2)], (80, 160, 128), (3, 3200)),
    ([1, 2, 2, 2], (40, 56, 40), (3, 175)),
    ([1, 2, 2, 2, 2, 2, 2, 2], (512, 512), (3, 4096)),
    ([1, 2, 2, 2, 2, 2, 2, 2], (1024, 1024), (4, 4096)),
    ([(1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)], (20, 320, 256), (4, 1600)),
    ([1, 2, 2], (16, 16), (2, 16)),  # stride 8 never reached -> bottleneck
    ([[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]], (28, 40, 32), (3, 140)),  # the demo's CPU plans
])
def test_resolve_cma_stage_examples(strides, patch, expected):
    assert resolve_cma_stage(strides, patch) == expected


def test_resolve_cma_stage_override_and_errors():
    assert resolve_cma_stage([1, 2, 2, 2], (40, 56, 40), stage=-2) == (2, 10 * 14 * 10)
    with pytest.raises(ValueError, match="out of range"):
        resolve_cma_stage([1, 2], (8, 8), stage=2)
    with pytest.raises(ValueError, match="does not match"):
        resolve_cma_stage([1, (2, 2)], (8, 8, 8))
    with pytest.raises(ValueError, match="max_tokens"):
        resolve_cma_stage([1, 2], (8, 8), max_tokens=0)


# ------------------------------------------------------------------ heads and helpers
def test_heads_shapes_and_memory_features():
    heads = CAMLHeads(8, 32)
    rows_v, rows_a = torch.randn(10, 8), torch.randn(10, 8)
    u_v, u_a = heads.correlation_features(rows_v, rows_a)
    assert u_v.shape == u_a.shape == (10, 32)
    heads.eval()
    torch.testing.assert_close(heads.memory_features(rows_v, rows_a),
                               0.5 * (heads.proj_v(rows_v) + heads.proj_a(rows_a)))
    # official projection head: 1,664 parameters
    assert sum(p.numel() for p in FeatureHead(16, 32).parameters()) == 16 * 32 + 32 + 64 + 32 * 32 + 32
    with pytest.raises(ValueError, match="head sizes"):
        FeatureHead(0)


def test_labeled_part_slices_every_deep_supervision_level():
    outputs = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 4, 4)]
    assert [o.shape[0] for o in labeled_part(outputs, 2)] == [2, 2]
    assert labeled_part(outputs[0], 1).shape[0] == 1
    assert full_resolution(outputs) is outputs[0]
