"""CAML's networks built from nnU-Net plans: the auxiliary U-Net, its upsampling, CMA placement and MLP heads.

CAML trains two complete U-Nets that see the same batch (Gao et al., MICCAI 2023, Sec. 2): the *vanilla* model v
(here: exactly nnU-Net's planned network, ``trainer.network``, the only one used at inference) and the *auxiliary*
model a, which differs architecturally by interpolation upsampling in its decoder and Cross-sample Mutual Attention
(CMA) after one encoder stage. Both come from the same plans through nnU-Net's ``build_network_architecture``;
a is then modified in place (its transposed convolutions are swapped for :class:`InterpolationUpsample`).

The embeddings CAML's correlation terms use are the last decoder stage's output (the input of the final 1x1 seg
layer). :func:`forward_with_embedding` replays a planned U-Net (encoder stages -> decoder stages) to return them
together with logits identical to ``net(x)``; forward hooks would be the alternative but interfere with
``torch.compile``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from nnunet_ext.caml.attention import CrossSampleMutualAttention

SUPPORTED_ARCHITECTURES = (PlainConvUNet, ResidualEncoderUNet)
AUX_UPSAMPLING_MODES = ("interp", "transpconv")


def check_supported_unet(net: nn.Module) -> None:
    """Raise ``ValueError`` naming the class unless ``net`` is a plain or residual-encoder nnU-Net U-Net."""
    if not isinstance(net, SUPPORTED_ARCHITECTURES) or type(net.decoder) is not UNetDecoder:
        raise ValueError(
            f"CAML needs a planned PlainConvUNet or ResidualEncoderUNet (with nnU-Net's UNetDecoder), got "
            f"{type(net).__module__}.{type(net).__name__}; use plans whose network_arch_class_name is one of these"
        )


class UNetOutput(NamedTuple):
    """What CAML needs from one sub-model in training.

    Attributes:
        seg: logits ``[B, K, *patch]``, or nnU-Net's deep-supervision list (full resolution first).
        embedding: last decoder-stage features ``[B, C0, *patch]`` (C0 = ``features_per_stage[0]``).
    """

    seg: torch.Tensor | list[torch.Tensor]
    embedding: torch.Tensor


def forward_with_embedding(net: nn.Module, x: torch.Tensor,
                           after_encoder_stage: Mapping[int, nn.Module] | None = None) -> UNetOutput:
    """Run a planned U-Net and also return its last decoder-stage features.

    Without ``after_encoder_stage`` the logits are identical to ``net(x)`` (same modules, same order, the
    decoder's ``deep_supervision`` flag is honoured). ``after_encoder_stage={s: module}`` applies ``module`` to
    encoder stage s's output; the result replaces that skip **and** is the input of stage s + 1 (CAML's CMA).

    Args:
        net: a ``PlainConvUNet`` or ``ResidualEncoderUNet`` (unwrapped, not DDP/compiled).
        x: input ``[B, C_in, *patch]``.
        after_encoder_stage: modules applied after encoder stages, keyed by stage index (negative allowed).

    Raises:
        ValueError: unsupported architecture or stage index out of range.
    """
    check_supported_unet(net)
    encoder, decoder = net.encoder, net.decoder
    n_stages = len(encoder.stages)
    inserts = {}
    for stage, module in (after_encoder_stage or {}).items():
        if not -n_stages <= stage < n_stages:
            raise ValueError(f"encoder stage {stage} out of range for {n_stages} stages")
        inserts[stage % n_stages] = module

    stem = getattr(encoder, "stem", None)  # ResidualEncoder has a stem, PlainConvEncoder has none
    if stem is not None:
        x = stem(x)
    skips = []
    for s, stage in enumerate(encoder.stages):
        x = stage(x)
        if s in inserts:
            x = inserts[s](x)
        skips.append(x)

    # mirrors UNetDecoder.forward, keeping the last stage's features
    below = skips[-1]
    seg_outputs = []
    last = len(decoder.stages) - 1
    for s in range(len(decoder.stages)):
        features = decoder.transpconvs[s](below)
        features = decoder.stages[s](torch.cat((features, skips[-(s + 2)]), 1))
        if decoder.deep_supervision:
            seg_outputs.append(decoder.seg_layers[s](features))
        elif s == last:
            seg_outputs.append(decoder.seg_layers[-1](features))
        below = features
    seg_outputs = seg_outputs[::-1]
    return UNetOutput(seg_outputs if decoder.deep_supervision else seg_outputs[0], below)


def labeled_part(seg: torch.Tensor | list[torch.Tensor], n_labeled: int) -> torch.Tensor | list[torch.Tensor]:
    """The first ``n_labeled`` samples of every deep-supervision output (or of the single output)."""
    if isinstance(seg, (list, tuple)):
        return [s[:n_labeled] for s in seg]
    return seg[:n_labeled]


def full_resolution(seg: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """The full-resolution output: the first deep-supervision entry, or the tensor itself."""
    return seg[0] if isinstance(seg, (list, tuple)) else seg


def _as_tuple(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise ValueError(f"stride {value} does not match a {ndim}D patch")
    return value


def resolve_cma_stage(strides: Sequence[int | Sequence[int]], patch_size: Sequence[int], max_tokens: int = 4096,
                      stage: int | None = None) -> tuple[int, int]:
    """Encoder stage that receives the CMA, and its number of tokens per sample (a pure function of the plans).

    CAML places the CMA at cumulative stride 8 (1,960 tokens on its LA patch). Rule for any plan: the shallowest
    stage s >= 1 whose largest cumulative stride is >= 8 (the last stage if none is); then deeper while the stage
    has more than ``max_tokens`` tokens (intra-sample attention costs N^2) and a deeper stage exists. ``stage``
    (negative indices allowed) overrides the rule.

    Args:
        strides: the encoder's per-stage strides (plans ``strides``, first entry usually 1).
        patch_size: the configuration's patch size.
        max_tokens: token budget for the automatic rule.
        stage: explicit stage index, or None for the rule.

    Returns:
        ``(stage, tokens)`` with tokens = prod(ceil(patch_i / cumulative_stride_i)).

    Raises:
        ValueError: empty strides, mismatching dimensions, ``max_tokens < 1`` or ``stage`` out of range.
    """
    ndim = len(patch_size)
    if not strides:
        raise ValueError("strides must not be empty")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    cumulative, running = [], (1,) * ndim
    for s in strides:
        running = tuple(a * b for a, b in zip(running, _as_tuple(s, ndim)))
        cumulative.append(running)
    n_stages = len(cumulative)

    def tokens(s: int) -> int:
        return math.prod(math.ceil(p / c) for p, c in zip(patch_size, cumulative[s]))

    if stage is not None:
        if not -n_stages <= stage < n_stages:
            raise ValueError(f"cma_stage {stage} out of range for an encoder with {n_stages} stages")
        stage = stage % n_stages
        return stage, tokens(stage)
    chosen = next((s for s in range(1, n_stages) if max(cumulative[s]) >= 8), n_stages - 1)
    while tokens(chosen) > max_tokens and chosen < n_stages - 1:
        chosen += 1
    return chosen, tokens(chosen)


class InterpolationUpsample(nn.Module):
    """CAML's auxiliary decoder upsampling: (bi/tri)linear interpolation (``align_corners=True``, as officially),
    then a 3x3(x3) convolution with bias to the skip's channels.

    No norm or nonlinearity inside: the following nnU-Net decoder stage normalises (the V-Net's BN + ReLU belong
    to its own block design). The output shape equals that of the transposed convolution it replaces
    (``[B, out, *(spatial * scale)]``); anisotropic scales such as (1, 2, 2) are fine.

    Args:
        in_channels: channels of the stage below.
        out_channels: channels of the skip.
        scale: per-axis integer upsampling factor (the decoder stage's stride).
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.

    Raises:
        ValueError: for a conv op other than Conv2d/Conv3d, non-positive channels or scales.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: Sequence[int], conv_op: type[nn.Module]):
        super().__init__()
        if conv_op not in (nn.Conv2d, nn.Conv3d):
            raise ValueError(f"conv_op must be nn.Conv2d or nn.Conv3d, got {conv_op}")
        ndim = 3 if conv_op is nn.Conv3d else 2
        scale = _as_tuple(scale, ndim)
        if in_channels < 1 or out_channels < 1 or min(scale) < 1:
            raise ValueError(f"channels and scales must be positive, got {in_channels}, {out_channels}, {scale}")
        self.scale = scale
        self.mode = "trilinear" if ndim == 3 else "bilinear"
        self.conv = conv_op(in_channels, out_channels, kernel_size=3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s != 1 for s in self.scale):
            x = F.interpolate(x, scale_factor=tuple(float(s) for s in self.scale), mode=self.mode,
                              align_corners=True)
        return self.conv(x)


class AuxiliaryUNet(nn.Module):
    """CAML's auxiliary model a: a planned U-Net plus CMA after one encoder stage.

    Args:
        unet: a planned ``PlainConvUNet``/``ResidualEncoderUNet`` (its transposed convolutions already replaced
            when interpolation upsampling is wanted, see :func:`build_auxiliary_unet`).
        cma: the attention module (identity in eval mode).
        cma_stage: encoder stage whose output goes through ``cma`` (non-negative index).

    ``forward(x)`` returns a :class:`UNetOutput` (logits or deep-supervision list, and the embedding).
    """

    def __init__(self, unet: nn.Module, cma: CrossSampleMutualAttention, cma_stage: int):
        super().__init__()
        check_supported_unet(unet)
        channels = unet.encoder.output_channels[cma_stage]
        if cma.channels != channels:
            raise ValueError(f"CMA has {cma.channels} channels but encoder stage {cma_stage} outputs {channels}")
        self.unet = unet
        self.cma = cma
        self.cma_stage = cma_stage

    def set_deep_supervision(self, enabled: bool) -> None:
        self.unet.decoder.deep_supervision = enabled

    def forward(self, x: torch.Tensor) -> UNetOutput:
        return forward_with_embedding(self.unet, x, {self.cma_stage: self.cma})


def build_auxiliary_unet(unet: nn.Module, patch_size: Sequence[int], upsampling: str = "interp",
                         cma_stage: int | None = None, cma_max_tokens: int = 4096, cma_heads: int = 4,
                         cma_ffn_mult: int = 4, cma_dropout: float = 0.5,
                         cma_mode: str = "intra+inter") -> AuxiliaryUNet:
    """Turn a freshly planned U-Net into CAML's auxiliary model (modifies ``unet`` in place).

    ``upsampling="interp"`` replaces every ``decoder.transpconvs[s]`` by :class:`InterpolationUpsample` with that
    stage's stride and channels (initialised like the network, He init); ``"transpconv"`` keeps them (the two
    sub-models then differ only in CMA and initialisation). The CMA stage follows :func:`resolve_cma_stage`.

    Raises:
        ValueError: unsupported architecture or upsampling mode, bad CMA options.
    """
    check_supported_unet(unet)
    if upsampling not in AUX_UPSAMPLING_MODES:
        raise ValueError(f"unknown auxiliary upsampling {upsampling!r}; expected one of {AUX_UPSAMPLING_MODES}")
    encoder, decoder = unet.encoder, unet.decoder
    if upsampling == "interp":
        for s, transpconv in enumerate(decoder.transpconvs):
            upsample = InterpolationUpsample(transpconv.in_channels, transpconv.out_channels, transpconv.stride,
                                             encoder.conv_op)
            upsample.apply(type(unet).initialize)  # the architecture's own init (He), as for the rest of the net
            decoder.transpconvs[s] = upsample.to(transpconv.weight.device)
    stage, _ = resolve_cma_stage(encoder.strides, patch_size, cma_max_tokens, cma_stage)
    cma = CrossSampleMutualAttention(encoder.output_channels[stage], cma_heads, cma_ffn_mult, cma_dropout, cma_mode)
    return AuxiliaryUNet(unet, cma, stage).to(next(unet.parameters()).device)


class FeatureHead(nn.Sequential):
    """Voxel-wise MLP of CAML: ``Linear(in, dim) -> BatchNorm1d(dim) -> ReLU -> Linear(dim, dim)``.

    Projection heads g map embeddings (``in = C0``) to the correlation space, prediction heads h map projections
    (``in = dim``) once more (official dim 32). Shapes: ``[R, in] -> [R, dim]``; training mode needs R > 1.
    """

    def __init__(self, in_features: int, dim: int = 32):
        if in_features < 1 or dim < 1:
            raise ValueError(f"head sizes must be >= 1, got in_features={in_features}, dim={dim}")
        super().__init__(nn.Linear(in_features, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


class CAMLHeads(nn.Module):
    """The four heads: projections ``proj_v``, ``proj_a`` (embedding -> dim) and predictions ``pred_v``, ``pred_a``.

    Args:
        embedding_channels: C0, the last decoder stage's channels (``features_per_stage[0]``).
        dim: feature dimension of the correlation space (official 32).
    """

    def __init__(self, embedding_channels: int, dim: int = 32):
        super().__init__()
        self.dim = dim
        self.proj_v = FeatureHead(embedding_channels, dim)
        self.proj_a = FeatureHead(embedding_channels, dim)
        self.pred_v = FeatureHead(dim, dim)
        self.pred_a = FeatureHead(dim, dim)

    def memory_features(self, rows_v: torch.Tensor, rows_a: torch.Tensor) -> torch.Tensor:
        """``0.5 (proj_v(rows_v) + proj_a(rows_a))``: labeled features for the memory bank, ``[R, C0] -> [R, dim]``.

        Both inputs are voxel feature vectors of the same voxels (the fix of the official code, which fed sub-model
        a's embedding to ``proj_a`` without moving channels last, i.e. scrambled vectors).
        """
        return 0.5 * (self.proj_v(rows_v) + self.proj_a(rows_a))

    def correlation_features(self, rows_v: torch.Tensor, rows_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pred(proj(.))`` per sub-model for unlabeled rows: ``[R, C0]`` each -> ``[R, dim]`` each."""
        return self.pred_v(self.proj_v(rows_v)), self.pred_a(self.proj_a(rows_a))
