"""Cross-sample Mutual Attention (CMA) of CAML (Gao et al., MICCAI 2023, Sec. 2.2).

Two standard post-norm Transformer encoder layers on the voxels of one encoder feature map: first
*intra-sample* attention (the sequence is one sample's voxels, positions mix, samples never do), then
*inter-sample* attention (the sequence is the mini-batch's samples at one voxel position, samples mix, positions
never do). The inter-sample step is the path through which labeled samples of a batch inform unlabeled ones.
No positional encoding, as officially. Active in training only: in eval mode the module is the identity.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

CMA_MODES = ("intra+inter", "inter")


def attention_heads_for(channels: int, requested: int) -> int:
    """``requested`` if it divides ``channels``, else the largest of 2 and 1 that does (spec: 4 -> 2 -> 1)."""
    if channels % requested == 0:
        return requested
    return 2 if channels % 2 == 0 else 1


class CrossSampleMutualAttention(nn.Module):
    """Intra- then inter-sample self-attention on a feature map ``[B, C, *spatial]`` (2D or 3D).

    Each layer is ``nn.TransformerEncoderLayer(C, heads, ffn_mult * C, dropout, ReLU, post-norm)``, as officially
    (official: C = 128, 4 heads, FFN 512, dropout 0.5).

    Args:
        channels: feature channels C (the token dimension).
        num_heads: attention heads; reduced to 2 or 1 when it does not divide ``channels``.
        ffn_mult: feed-forward width as a multiple of ``channels``.
        dropout: dropout on attention weights, residual branches and inside the FFN.
        mode: ``"intra+inter"`` (CAML, official ``'v2+'``) or ``"inter"`` (inter-sample only, ablation).

    Shapes:
        input and output ``[B, C, *spatial]``; N = prod(spatial) tokens per sample.

    Raises:
        ValueError: for non-positive sizes, dropout outside [0, 1) or an unknown mode.
    """

    modes: ClassVar[tuple[str, ...]] = CMA_MODES

    def __init__(self, channels: int, num_heads: int = 4, ffn_mult: int = 4, dropout: float = 0.5,
                 mode: str = "intra+inter"):
        super().__init__()
        if channels < 1 or num_heads < 1 or ffn_mult < 1:
            raise ValueError(f"channels, num_heads and ffn_mult must be >= 1, got {channels}, {num_heads}, {ffn_mult}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if mode not in CMA_MODES:
            raise ValueError(f"unknown CMA mode {mode!r}; expected one of {CMA_MODES}")
        self.channels = channels
        self.num_heads = attention_heads_for(channels, num_heads)
        self.mode = mode

        def layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(channels, self.num_heads, ffn_mult * channels, dropout,
                                              activation="relu", batch_first=True, norm_first=False)

        self.intra = layer() if mode == "intra+inter" else None
        self.inter = layer()

    def attend_within_samples(self, tokens: torch.Tensor) -> torch.Tensor:
        """Intra-sample layer on tokens ``[B, N, C]`` (sequence = one sample's N voxels)."""
        if self.intra is None:
            return tokens
        return self.intra(tokens)

    def attend_across_samples(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inter-sample layer on tokens ``[B, N, C]`` (sequence = the B samples at one voxel position)."""
        return self.inter(tokens.transpose(0, 1)).transpose(0, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return features
        if features.ndim < 3 or features.shape[1] != self.channels:
            raise ValueError(f"expected features [B, {self.channels}, *spatial], got {tuple(features.shape)}")
        batch, channels, *spatial = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # [B, N, C]
        tokens = self.attend_across_samples(self.attend_within_samples(tokens))
        return tokens.transpose(1, 2).reshape(batch, channels, *spatial)
