"""Decoder features of nnU-Net's plans networks without copying their forward code.

``PlainConvUNet`` and ``ResidualEncoderUNet`` (dynamic-network-architectures) compute ``decoder(encoder(x))``;
the decoder's ``stages`` produce one feature map per resolution. We run exactly that forward and record the stage
outputs with temporary forward hooks, so the logits are bit-identical to ``net(x)`` and nothing of the upstream
decoder loop is replicated. (Hooks do not mix well with ``torch.compile``; ACTION keeps compile off.)
"""
from __future__ import annotations

import torch
from torch import nn

from nnunet_ext.compat import unwrap


def check_unet_like(net: nn.Module) -> nn.Module:
    """The unwrapped network if it has the ``encoder``/``decoder.stages`` layout of nnU-Net's U-Nets.

    Raises:
        TypeError: naming the architecture class, for networks without that layout.
    """
    net = unwrap(net)
    if not (hasattr(net, "encoder") and hasattr(net, "decoder") and hasattr(net.decoder, "stages")
            and hasattr(net.encoder, "output_channels")):
        raise TypeError(
            f"ACTION needs a U-Net with encoder/decoder.stages (PlainConvUNet, ResidualEncoderUNet); got "
            f"{type(net).__name__}. Use plans whose network_arch_class_name is one of those."
        )
    return net


def decoder_stage_channels(net: nn.Module) -> list[int]:
    """Output channels of the decoder stages, highest resolution first (as :func:`forward_with_features`)."""
    net = check_unet_like(net)
    # decoder stage s outputs the channels of the skip it is concatenated with: encoder.output_channels[-(s+2)]
    return list(net.encoder.output_channels[:-1])


def bottleneck_channels(net: nn.Module) -> int:
    """Channels of the encoder bottleneck ``skips[-1]``."""
    return int(check_unet_like(net).encoder.output_channels[-1])


def encoder_bottleneck(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Encoder only: the bottleneck ``skips[-1]`` ``[B, C_b, *bottleneck_spatial]`` (stage i runs no decoder)."""
    return check_unet_like(net).encoder(x)[-1]


def forward_with_features(net: nn.Module, x: torch.Tensor
                          ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """``net(x)`` plus the bottleneck and every decoder-stage output.

    Args:
        net: a ``PlainConvUNet``/``ResidualEncoderUNet`` (possibly wrapped in DDP/``torch.compile``).
        x: ``[B, C_in, *patch]``.

    Returns:
        ``(logits, bottleneck, features)``: logits exactly as ``net(x)`` returns them (a list, full resolution
        first, when deep supervision is on); bottleneck ``[B, C_b, *]``; features ``[B, C_s, *spatial_s]`` per
        decoder stage, highest resolution first (the first one has the patch's spatial shape).
    """
    net = check_unet_like(net)
    recorded: list[torch.Tensor] = []
    handles = [stage.register_forward_hook(lambda _m, _i, out: recorded.append(out)) for stage in net.decoder.stages]
    try:
        skips = net.encoder(x)
        logits = net.decoder(skips)
    finally:
        for handle in handles:
            handle.remove()
    if len(recorded) != len(net.decoder.stages):
        raise RuntimeError(f"expected {len(net.decoder.stages)} decoder stage outputs, recorded {len(recorded)}")
    return logits, skips[-1], recorded[::-1]


def full_resolution(logits: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The full-resolution output of a network that may return a deep-supervision list."""
    return logits[0] if isinstance(logits, (list, tuple)) else logits
