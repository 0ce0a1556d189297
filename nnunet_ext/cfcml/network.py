"""``CFCMLNet``: plan-derived image encoders + tabular tokenizer + CFCML's coarse stage (MG-CIE) + classifier,
next to nnU-Net's segmentation decoder.

Follows the official implementation (IsDling/CFCML) with the spec's substitutions (design spec §7.3):

* image encoders are dynamic-network-architectures ``PlainConvEncoder`` s built from the nnU-Net plans (one per
  image group, optionally shared) instead of ResMamba/Swin-T (no ``mamba-ssm``, no pretrained weights);
* the segmentation decoder is the plans' ``UNetDecoder`` on the first group's encoder, so ``forward(x)`` returns
  segmentation logits only and nnU-Net's predictor loads ``network_weights`` unchanged;
* the tabular encoder is a learned field tokenizer (no CLIP download); numeric statistics are buffers filled
  from the training fold, so they travel inside ``network_weights``.

Reused from dynamic-network-architectures: ``PlainConvEncoder``, ``UNetDecoder``, ``InitWeights_He``. Not reusable
there (written here): the token compression, the tabular tokenizer, the granularity aggregation and the classifier
(CFCML-specific); the cross-attention is ``torch.nn.MultiheadAttention`` (q/k/v/out projections with bias, no
residual, no LayerNorm, no dropout, as CFCML's CIE).
"""
from __future__ import annotations

import math
import pydoc
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunet_ext.cfcml.tabular import TabularBatch

MODALITY_CHOICES = ("all", "image", "tabular")
FUSION_CHOICES = ("cie", "concat")


def pooled_grid(grid: Sequence[int], max_tokens: int) -> tuple[int, ...]:
    """Largest grid with at most ``max_tokens`` positions and (about) the aspect ratio of ``grid``."""
    grid = tuple(int(g) for g in grid)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if math.prod(grid) <= max_tokens:
        return grid
    scale = (max_tokens / math.prod(grid)) ** (1.0 / len(grid))
    out = [max(1, int(math.floor(g * scale))) for g in grid]
    while math.prod(out) > max_tokens:  # floating-point edge cases: shrink the largest axis
        out[int(np.argmax(out))] -= 1
    return tuple(out)


class TokenCompression(nn.Module):
    """Compress one encoder stage map into ``num_latents`` tokens of width ``d`` (CFCML MG-CIE part A).

    ``Z[b, l, j] = bias_l + Σ_n Σ_δ W[l, n, δ] X[b, n, j+δ]``: a ``Conv1d`` whose input channels are the ``N``
    spatial positions and whose sequence axis is the feature axis, then ``Linear(C -> d)`` (always applied, also
    when C = d — a trivial deviation). Stage maps with more than ``max_tokens`` positions are first
    adaptive-average-pooled to :func:`pooled_grid` (spec §7.3; the original would need 7 M weights per modality).

    Args:
        grid: spatial size of the stage map (2 or 3 axes); inputs of another size raise a ``ValueError``.
        channels: C, feature channels of the stage map.
        num_latents: L, output tokens.
        d: output token width.
        max_tokens: pooling threshold.
        kernel_size: width of the convolution along the feature axis (CFCML: 3; 1 = pure token mixing). Odd.

    Shapes:
        ``[B, C, *grid]`` -> ``[B, L, d]``.
    """

    def __init__(self, grid: Sequence[int], channels: int, num_latents: int, d: int, max_tokens: int = 4096,
                 kernel_size: int = 3):
        super().__init__()
        if len(grid) not in (2, 3):
            raise ValueError(f"grid must have 2 or 3 axes, got {tuple(grid)}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        if min(channels, num_latents, d) < 1:
            raise ValueError(f"channels, num_latents and d must be >= 1, got {channels}, {num_latents}, {d}")
        self.grid = tuple(int(g) for g in grid)
        self.pooled = pooled_grid(self.grid, max_tokens)
        self.mix = nn.Conv1d(math.prod(self.pooled), num_latents, kernel_size, padding=kernel_size // 2)
        self.project = nn.Linear(channels, d)

    def forward(self, stage_map: torch.Tensor) -> torch.Tensor:
        if tuple(stage_map.shape[2:]) != self.grid:
            raise ValueError(f"CFCML token compression expects a stage map of spatial size {self.grid} (derived from "
                             f"the plans' patch size), got {tuple(stage_map.shape[2:])}: classification inputs must "
                             f"have exactly the patch size")
        if self.pooled != self.grid:
            pool = F.adaptive_avg_pool2d if len(self.grid) == 2 else F.adaptive_avg_pool3d
            stage_map = pool(stage_map, self.pooled)
        tokens = stage_map.flatten(2).transpose(1, 2)  # [B, N, C]
        return self.project(self.mix(tokens))  # [B, L, C] -> [B, L, d]


class TabularTokenizer(nn.Module):
    """Learned offline replacement of CFCML's frozen-CLIP field sentences (spec §2.3 / §7.3).

    Categorical field f -> ``Embedding(n_f + 1, E)`` (index 0 = missing/unknown). Numeric field ->
    ``x̃·w_f + b_f`` with ``x̃ = (x − mean_f) / std_f`` (training-fold statistics in buffers; 0 where missing)
    plus a learned missing vector. Then, as CFCML, ``Linear(E -> d) + ReLU`` and ``Conv1d(F -> L_tab, k=3)`` over
    the field axis.

    Args:
        vocabulary_sizes: categories per categorical field (without the unknown index).
        num_numeric: number of numeric fields.
        num_latents: L_tab output tokens.
        d: token width.
        embed_dim: E, per-field embedding width (CFCML's CLIP width 512).

    Shapes:
        TabularBatch of ``B`` rows -> ``[B, L_tab, d]``.
    """

    def __init__(self, vocabulary_sizes: Sequence[int], num_numeric: int, num_latents: int, d: int,
                 embed_dim: int = 512):
        super().__init__()
        num_fields = len(vocabulary_sizes) + num_numeric
        if num_fields < 1:
            raise ValueError("the tabular tokenizer needs at least one field")
        if any(v < 1 for v in vocabulary_sizes):
            raise ValueError(f"every categorical field needs >= 1 category, got {list(vocabulary_sizes)}")
        self.embeddings = nn.ModuleList(nn.Embedding(v + 1, embed_dim) for v in vocabulary_sizes)
        self.numeric_weight = nn.Parameter(torch.randn(num_numeric, embed_dim) * 0.02)
        self.numeric_bias = nn.Parameter(torch.zeros(num_numeric, embed_dim))
        self.missing_vector = nn.Parameter(torch.randn(num_numeric, embed_dim) * 0.02)
        # neutral until the trainer writes the training-fold statistics (saved with the network weights)
        self.register_buffer("numeric_mean", torch.zeros(num_numeric))
        self.register_buffer("numeric_std", torch.ones(num_numeric))
        self.project = nn.Sequential(nn.Linear(embed_dim, d), nn.ReLU(inplace=True))
        self.field_mix = nn.Conv1d(num_fields, num_latents, 3, padding=1)

    def set_numeric_stats(self, mean: Sequence[float] | np.ndarray, std: Sequence[float] | np.ndarray) -> None:
        mean_t = torch.as_tensor(np.asarray(mean, np.float32), device=self.numeric_mean.device)
        std_t = torch.as_tensor(np.asarray(std, np.float32), device=self.numeric_std.device)
        if mean_t.shape != self.numeric_mean.shape or std_t.shape != self.numeric_std.shape:
            raise ValueError(f"expected {tuple(self.numeric_mean.shape)} numeric statistics, got "
                             f"{tuple(mean_t.shape)} and {tuple(std_t.shape)}")
        if (std_t <= 0).any():
            raise ValueError("numeric standard deviations must be > 0")
        self.numeric_mean.copy_(mean_t)
        self.numeric_std.copy_(std_t)

    def forward(self, tab: TabularBatch) -> torch.Tensor:
        n_cat = len(self.embeddings)
        if tab.categorical.shape[1] != n_cat or tab.numeric.shape[1] != self.numeric_mean.numel():
            raise ValueError(f"tabular batch has {tab.categorical.shape[1]} categorical / {tab.numeric.shape[1]} "
                             f"numeric fields; the network was built for {n_cat} / {self.numeric_mean.numel()}")
        tokens = [emb(tab.categorical[:, i]) for i, emb in enumerate(self.embeddings)]  # each [B, E]
        if self.numeric_mean.numel():
            missing = tab.missing.to(self.numeric_weight.dtype)[..., None]  # [B, F_num, 1]
            scaled = (tab.numeric.float() - self.numeric_mean) / self.numeric_std
            scaled = torch.where(tab.missing, torch.zeros_like(scaled), scaled)[..., None]
            numeric = scaled * self.numeric_weight + self.numeric_bias + missing * self.missing_vector
            tokens.extend(numeric.unbind(1))
        fields = torch.stack(tokens, 1)  # [B, F, E]
        return self.field_mix(self.project(fields))  # [B, L_tab, d]


class CrossModalEnhancement(nn.Module):
    """CFCML's CIE for one (stage, modality): multi-head cross-attention of a modality's tokens to the other
    modalities' tokens, completed by concatenation (no residual, no LayerNorm, no dropout).

    Shapes:
        query ``[B, L, d]``, context ``[B, L_ctx, d]`` -> ``[B, 2L, d]``.
    """

    def __init__(self, d: int, heads: int = 4):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} must be divisible by heads={heads}")
        self.attention = nn.MultiheadAttention(d, heads, dropout=0.0, bias=True, batch_first=True)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(query, context, context, need_weights=False)
        return torch.cat([query, attended], 1)


class GranularityAggregation(nn.Module):
    """Concatenated tokens of all granularities -> ``Conv1d(T -> L, k=3)`` (tokens as channels) -> mean over tokens.

    Shapes:
        ``[B, T, d]`` -> ``[B, d]``.
    """

    def __init__(self, num_tokens_in: int, num_latents: int):
        super().__init__()
        self.mix = nn.Conv1d(num_tokens_in, num_latents, 3, padding=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mix(tokens).mean(1)


class CFCMLClassifier(nn.Sequential):
    """CFCML's head: ``Linear(M·d -> d) + ReLU + Dropout -> Linear(d -> 16) + ReLU + Dropout -> Linear(16 -> K)``."""

    def __init__(self, in_features: int, d: int, num_classes: int, dropout: float = 0.5):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        super().__init__(nn.Linear(in_features, d), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(d, 16), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(16, num_classes))


class CFCMLNet(nn.Module):
    """Segmentation U-Net (group 0) plus CFCML classification from image groups and a table.

    Args:
        encoder_kwargs: ``PlainConvEncoder`` arguments except ``input_channels``/``return_skips`` (from the plans).
        n_conv_per_stage_decoder: the plans' decoder depth.
        num_segmentation_heads: segmentation output channels.
        patch_size: the plans' patch size; classification inputs must have it exactly.
        image_groups: input channels of each image modality, e.g. ``[[0, 1, 2]]`` or ``[[0], [1], [2]]``.
        num_classes: K.
        vocabulary_sizes / num_numeric: tabular schema (ignored when ``modalities == "image"``).
        d, heads, num_latents_image, num_latents_tabular, max_tokens, token_conv_kernel, tabular_embed_dim,
            dropout: CFCML hyper-parameters (spec §7.4 defaults).
        num_granularities: number of last encoder stages used (CFCML: 4; 1 = no multi-granularity).
        share_encoders: one encoder for every image group (groups must have equal channel counts).
        modalities: ``"all"`` (images + table), ``"image"`` (image-only baseline), ``"tabular"`` (tabular-only
            baseline; the encoders then serve segmentation only).
        fusion: ``"cie"`` (CFCML cross-attention) or ``"concat"`` (late fusion of pooled features, no CIE).
        deep_supervision: initial decoder deep-supervision flag.

    Shapes:
        ``forward(x [B, C, *patch])`` -> segmentation logits (a list, full resolution first, with deep supervision).
        ``forward_all(x, tab)`` -> ``(segmentation, logits [B, K], features [M, B, d])``.
    """

    def __init__(self, encoder_kwargs: Mapping[str, Any], n_conv_per_stage_decoder: Sequence[int],
                 num_segmentation_heads: int, patch_size: Sequence[int], image_groups: Sequence[Sequence[int]],
                 num_classes: int, vocabulary_sizes: Sequence[int] = (), num_numeric: int = 0, d: int = 128,
                 heads: int = 4, num_latents_image: int = 32, num_latents_tabular: int = 24, max_tokens: int = 4096,
                 token_conv_kernel: int = 3, tabular_embed_dim: int = 512, dropout: float = 0.5,
                 num_granularities: int = 4, share_encoders: bool = False, modalities: str = "all",
                 fusion: str = "cie", deep_supervision: bool = True):
        super().__init__()
        if modalities not in MODALITY_CHOICES:
            raise ValueError(f"modalities must be one of {MODALITY_CHOICES}, got {modalities!r}")
        if fusion not in FUSION_CHOICES:
            raise ValueError(f"fusion must be one of {FUSION_CHOICES}, got {fusion!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not image_groups or any(len(g) == 0 for g in image_groups):
            raise ValueError(f"image_groups must be non-empty lists of channels, got {image_groups}")
        if share_encoders and len({len(g) for g in image_groups}) != 1:
            raise ValueError(f"share_encoders needs image groups with equal channel counts, got {image_groups}")
        if num_granularities < 1:
            raise ValueError(f"num_granularities must be >= 1, got {num_granularities}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.image_groups = [list(map(int, g)) for g in image_groups]
        self.num_classes = int(num_classes)
        self.modalities = modalities
        self.fusion = fusion
        self.share_encoders = bool(share_encoders)

        kwargs = dict(encoder_kwargs)
        n_encoders = 1 if share_encoders else len(self.image_groups)
        self.encoders = nn.ModuleList(
            PlainConvEncoder(len(self.image_groups[i]), return_skips=True, **kwargs) for i in range(n_encoders))
        self.decoder = UNetDecoder(self.encoders[0], num_segmentation_heads, n_conv_per_stage_decoder,
                                   deep_supervision, nonlin_first=kwargs.get("nonlin_first", False))
        self.apply(InitWeights_He(1e-2))

        # granularities: the last stages, never a full-resolution 3D stage (spec §7.3 item 2)
        strides = [np.atleast_1d(s) * np.ones(len(self.patch_size), int) for s in kwargs["strides"]]
        grids, size = [], np.array(self.patch_size)
        for stride in strides:
            size = np.ceil(size / stride).astype(int)
            grids.append(tuple(int(g) for g in size))
        candidates = [s for s in range(len(grids))
                      if not (len(self.patch_size) == 3 and all(g == p for g, p in zip(grids[s], self.patch_size)))]
        self.stages = candidates[-num_granularities:]
        self.token_grids = [grids[s] for s in self.stages]
        channels = list(kwargs["features_per_stage"])

        self.num_image_modalities = len(self.image_groups) if modalities != "tabular" else 0
        self.use_table = modalities != "image"
        num_modalities = self.num_image_modalities + int(self.use_table)
        self.num_modalities = num_modalities
        latents = [num_latents_image] * self.num_image_modalities + ([num_latents_tabular] if self.use_table else [])
        self.compression = nn.ModuleList(
            nn.ModuleList(TokenCompression(grids[s], channels[s], num_latents_image, d, max_tokens, token_conv_kernel)
                          for s in self.stages)
            for _ in range(self.num_image_modalities))
        self.tabular = (TabularTokenizer(vocabulary_sizes, num_numeric, num_latents_tabular, d, tabular_embed_dim)
                        if self.use_table else None)
        self.use_cie = fusion == "cie" and num_modalities > 1
        self.cie = nn.ModuleList(
            nn.ModuleList(CrossModalEnhancement(d, heads) for _ in range(num_modalities))
            for _ in self.stages) if self.use_cie else None
        expansion = 2 if self.use_cie else 1
        self.aggregation = nn.ModuleList(GranularityAggregation(expansion * len(self.stages) * n, n) for n in latents)
        self.classifier = CFCMLClassifier(num_modalities * d, d, num_classes, dropout)

    # ------------------------------------------------------------------ segmentation (nnU-Net's predictor)
    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = enabled

    def _group_input(self, x: torch.Tensor, group: int) -> torch.Tensor:
        channels = self.image_groups[group]
        if channels == list(range(x.shape[1])):
            return x
        return x[:, channels]

    def _encode(self, x: torch.Tensor, group: int) -> list[torch.Tensor]:
        encoder = self.encoders[0 if self.share_encoders else group]
        return encoder(self._group_input(x, group))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segmentation logits only (what ``nnUNetv2_predict`` and nnU-Net's validation call)."""
        return self.decoder(self._encode(x, 0))

    # ------------------------------------------------------------------ classification
    def forward_all(self, x: torch.Tensor, tab: TabularBatch | None, with_segmentation: bool = True
                    ) -> tuple[torch.Tensor | list[torch.Tensor] | None, torch.Tensor, torch.Tensor]:
        """One encoder pass per image group feeding both the decoder and the classification path.

        Returns:
            ``(segmentation or None, class logits [B, K], per-modality features [M, B, d])``; modalities are the
            image groups, then the table.
        """
        if tuple(x.shape[2:]) != self.patch_size:
            raise ValueError(f"classification inputs must have the patch size {self.patch_size}, got "
                             f"{tuple(x.shape[2:])} (crop or pad to the patch first)")
        if self.use_table and tab is None:
            raise ValueError("this CFCMLNet uses the table: pass a TabularBatch")
        needed = range(len(self.image_groups)) if self.num_image_modalities else [0]
        skips = {g: self._encode(x, g) for g in needed} if (with_segmentation or self.num_image_modalities) else {}
        segmentation = self.decoder(skips[0]) if with_segmentation else None

        per_stage: list[list[torch.Tensor]] = [[] for _ in self.stages]
        for m in range(self.num_image_modalities):
            for s_index, stage in enumerate(self.stages):
                per_stage[s_index].append(self.compression[m][s_index](skips[m][stage]))
        if self.use_table:
            table_tokens = self.tabular(tab)  # identical for every granularity, as CFCML
            for tokens in per_stage:
                tokens.append(table_tokens)

        enhanced: list[list[torch.Tensor]] = [[] for _ in range(self.num_modalities)]
        for s_index, tokens in enumerate(per_stage):
            for m, own in enumerate(tokens):
                if self.use_cie:
                    context = torch.cat([t for j, t in enumerate(tokens) if j != m], 1)
                    own = self.cie[s_index][m](own, context)
                enhanced[m].append(own)
        features = torch.stack([agg(torch.cat(enhanced[m], 1)) for m, agg in enumerate(self.aggregation)], 0)
        logits = self.classifier(features.transpose(0, 1).flatten(1))  # concat_m f[m] -> [B, M*d]
        return segmentation, logits, features

    def classify(self, x: torch.Tensor, tab: TabularBatch | None) -> torch.Tensor:
        """Class logits ``[B, K]`` (no decoder pass)."""
        return self.forward_all(x, tab, with_segmentation=False)[1]

    def set_numeric_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if self.tabular is not None:
            self.tabular.set_numeric_stats(mean, std)


def encoder_kwargs_from_plans(configuration_manager, width_factor: float = 1.0) -> tuple[dict, list[int]]:
    """``PlainConvEncoder`` kwargs and decoder depth from a plans configuration (ops resolved with pydoc).

    Raises:
        ValueError: the plans' architecture is not a plain/residual U-Net with the usual keys.
    """
    arch = dict(configuration_manager.network_arch_init_kwargs)
    for key in configuration_manager.network_arch_init_kwargs_req_import:
        if arch.get(key) is not None:
            located = pydoc.locate(arch[key])
            if located is None:
                raise ValueError(f"cannot import {arch[key]!r} (plans key {key!r})")
            arch[key] = located
    if "n_conv_per_stage" not in arch and "n_blocks_per_stage" in arch:
        # residual-encoder plans: same stage layout, plain conv blocks (documented deviation)
        arch["n_conv_per_stage"] = arch["n_blocks_per_stage"]
    required = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
                "n_conv_per_stage_decoder")
    missing = [k for k in required if k not in arch]
    if missing:
        raise ValueError(f"CFCMLNet needs a U-Net configuration in the plans; keys {missing} are missing from "
                         f"network_arch_init_kwargs ({configuration_manager.network_arch_class_name})")
    if width_factor <= 0:
        raise ValueError(f"width_factor must be > 0, got {width_factor}")
    features = [max(1, int(round(f * width_factor))) for f in arch["features_per_stage"]]
    encoder = {"n_stages": arch["n_stages"], "features_per_stage": features, "conv_op": arch["conv_op"],
               "kernel_sizes": arch["kernel_sizes"], "strides": arch["strides"],
               "n_conv_per_stage": arch["n_conv_per_stage"], "conv_bias": arch.get("conv_bias", False),
               "norm_op": arch.get("norm_op"), "norm_op_kwargs": arch.get("norm_op_kwargs"),
               "dropout_op": arch.get("dropout_op"), "dropout_op_kwargs": arch.get("dropout_op_kwargs"),
               "nonlin": arch.get("nonlin"), "nonlin_kwargs": arch.get("nonlin_kwargs")}
    return encoder, list(arch["n_conv_per_stage_decoder"])
