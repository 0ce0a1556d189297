"""``CIMLNet``: one encoder per modality, one decoder per subtask, gated variational messages between them.

Shapes (3D; 2D drops one spatial axis): input ``x [B, M, *patch]``; encoder ``E_m`` maps ``x[:, m:m+1]`` to skips
``F_m^s [B, C_s, *V_s]`` for stages ``s = 0..S-1``. For a pair (auxiliary ``a`` -> subtask ``k``) and a message
stage ``s``:

    (mu, log sigma^2) = Conv1x1(F_a^s)                                   [B, C'_s, *V_s] each
    z = mu + sigma * eps (training), z = mu (eval)
    alpha = sigmoid(Conv_kxk([mean_c F_p^s, max_c F_p^s, mean_c z, max_c z]))   [B, 1, *V_s], in [0, 1]
    m = alpha * P(z)                                                     [B, C_s, *V_s]
    G_k^s = F_p^s + sum_a m_{a->k}^s   (primary features are only added to)

Decoder ``k`` (nnU-Net's ``UNetDecoder`` built on the primary encoder) reads ``G_k`` and emits logits for its output
channels; the outputs are assembled into nnU-Net's channel order (labels mode: channel 0 is a constant zero
background logit). Every layout detail is a Design decision of this package (CIML spec section 3).

Reused from dynamic-network-architectures: ``PlainConvEncoder`` / ``ResidualEncoder`` (per modality, from the
plan), ``UNetDecoder`` (per subtask), ``InitWeights_He``. Written here because no equivalent exists there: the
message encoder, the cross-modal attention gate and the output assembly.
"""
from __future__ import annotations

import pydoc
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunet_ext.ciml.decomposition import MessageConfig, SubtaskSpec, effective_settings, validate_resolved
from nnunet_ext.ciml.vib import gaussian_kl, kl_density
from nnunet_ext.errors import InputError


class VariationalMessageEncoder(nn.Module):
    """Gaussian message from sender features: a 1x1 conv gives (mu, log sigma^2) (only mu when not variational).

    Args:
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        in_channels: C_s of the sender's stage.
        latent_channels: C'_s.
        variational: False builds no log-variance head (noVIB variant, no unused parameters) and z = mu.
        logvar_clamp: log sigma^2 is clamped to ``[-clamp, clamp]`` (fp16 safety).
    """

    def __init__(self, conv_op: type[nn.Module], in_channels: int, latent_channels: int, variational: bool = True,
                 logvar_clamp: float = 10.0) -> None:
        super().__init__()
        if in_channels < 1 or latent_channels < 1:
            raise ValueError(f"channels must be positive, got {in_channels} and {latent_channels}")
        self.variational = variational
        self.latent_channels = latent_channels
        self.logvar_clamp = logvar_clamp
        self.conv = conv_op(in_channels, latent_channels * (2 if variational else 1), 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``features [B, C_s, *V]`` -> ``(z, mu, logvar)``, each ``[B, C'_s, *V]`` (``logvar`` None if
        deterministic)."""
        out = self.conv(features)
        if not self.variational:
            return out, out, None
        mu, logvar = out[:, : self.latent_channels], out[:, self.latent_channels:]
        logvar = logvar.clamp(-self.logvar_clamp, self.logvar_clamp)
        if not self.training:
            return mu, mu, logvar
        # reparameterisation; exp in fp32 so fp16 activations cannot overflow
        std = torch.exp(0.5 * logvar.float()).to(mu.dtype)
        return mu + std * torch.randn_like(mu), mu, logvar


class CrossModalSpatialAttention(nn.Module):
    """Where the receiver accepts a message: ``alpha [B, 1, *V]`` in [0, 1].

    ``"cbam"``: a k x k(x k) conv over ``[mean_c F_p, max_c F_p, mean_c z, max_c z]`` (4 -> 1 channels) and a sigmoid
    (CBAM's spatial gate, Woo et al. ECCV 2018, conditioned on both modalities). ``"concat"``: 1x1 conv on
    ``[F_p, z]`` to ``C_s / 4`` channels, LeakyReLU, k x k conv to 1 channel, sigmoid (heavier).
    """

    def __init__(self, conv_op: type[nn.Module], primary_channels: int, latent_channels: int, kernel: int = 7,
                 attention_type: str = "cbam") -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"attention kernel must be odd and positive, got {kernel}")
        if attention_type not in ("cbam", "concat"):
            raise ValueError(f"attention_type must be 'cbam' or 'concat', got {attention_type!r}")
        self.attention_type = attention_type
        if attention_type == "cbam":
            self.gate = conv_op(4, 1, kernel, padding=kernel // 2)
        else:
            hidden = max(1, primary_channels // 4)
            self.gate = nn.Sequential(conv_op(primary_channels + latent_channels, hidden, 1),
                                      nn.LeakyReLU(0.01, inplace=True),
                                      conv_op(hidden, 1, kernel, padding=kernel // 2))

    def forward(self, primary: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
        if self.attention_type == "cbam":
            pooled = torch.cat([primary.mean(1, keepdim=True), primary.amax(1, keepdim=True),
                                message.mean(1, keepdim=True), message.amax(1, keepdim=True)], 1)
            return torch.sigmoid(self.gate(pooled))
        return torch.sigmoid(self.gate(torch.cat([primary, message], 1)))


class PairMessage(nn.Module):
    """Receiver-specific part of one message (sender a -> subtask k at one stage): encoder (unless shared),
    attention gate and projection P (identity when C'_s = C_s)."""

    def __init__(self, conv_op: type[nn.Module], channels: int, latent_channels: int, cfg: MessageConfig,
                 kernel: int, own_encoder: bool) -> None:
        super().__init__()
        self.encoder = (VariationalMessageEncoder(conv_op, channels, latent_channels, cfg.variational,
                                                  cfg.logvar_clamp) if own_encoder else None)
        self.attention = CrossModalSpatialAttention(conv_op, channels, latent_channels, kernel, cfg.attention_type)
        self.projection = nn.Identity() if latent_channels == channels else conv_op(latent_channels, channels, 1)


class CIMLNet(nn.Module):
    """CIML segmentation network (see the module docstring for shapes and equations).

    Args:
        encoder_kwargs: keyword arguments of ``encoder_class`` except ``input_channels`` and ``return_skips``
            (ops already resolved to classes), e.g. from the plan's ``network_arch_init_kwargs``.
        decoder_n_conv: convolutions per decoder stage (the plan's ``n_conv_per_stage_decoder``).
        num_modalities: M, input channels of ``forward``.
        subtasks: resolved subtasks (see :mod:`nnunet_ext.ciml.decomposition`).
        msg_cfg: message options.
        output_mode: ``"regions"``, ``"labels"`` or ``"direct"``.
        num_outputs: nnU-Net's ``num_segmentation_heads``.
        deep_supervision: return one output per decoder stage (full resolution first) instead of one tensor.
        encoder_class: ``PlainConvEncoder`` or ``ResidualEncoder``.
        modality_names: names for ``pair_names`` (default: channel indices).
        patch_size: patch size, to pick a 3 x 3 attention kernel at stages whose smallest side is < 8.

    Raises:
        ValueError: inconsistent subtasks/outputs, or a message stage the plan does not have.
    """

    def __init__(self, encoder_kwargs: dict[str, Any], decoder_n_conv: int | Sequence[int], num_modalities: int,
                 subtasks: Sequence[SubtaskSpec], msg_cfg: MessageConfig, output_mode: str, num_outputs: int,
                 deep_supervision: bool, encoder_class: type[nn.Module] = PlainConvEncoder,
                 modality_names: Sequence[str] | None = None, patch_size: Sequence[int] | None = None) -> None:
        super().__init__()
        resolved = {"output_mode": output_mode, "num_modalities": num_modalities, "num_outputs": num_outputs,
                    "subtasks": [{"name": s.name, "primary": s.primary, "auxiliary": list(s.auxiliary),
                                  "out_channels": list(s.out_channels)} for s in subtasks]}
        self.subtasks = validate_resolved(resolved, num_modalities, num_outputs)
        self.output_mode = output_mode
        self.num_modalities = num_modalities
        self.num_outputs = num_outputs
        self.msg_cfg = msg_cfg
        self.modality_names = list(modality_names) if modality_names else [str(m) for m in range(num_modalities)]
        if len(self.modality_names) != num_modalities:
            raise ValueError(f"{len(self.modality_names)} modality names for {num_modalities} modalities")
        # senders per subtask: none at all without messages (noMessages builds no encoder for sender-only modalities)
        self.senders = [tuple(s.auxiliary) if msg_cfg.enabled else () for s in self.subtasks]
        used = sorted({s.primary for s in self.subtasks} | {a for senders in self.senders for a in senders})
        self.used_modalities = used
        self.encoders = nn.ModuleDict({str(m): encoder_class(input_channels=1, return_skips=True, **encoder_kwargs)
                                       for m in used})
        reference = self.encoders[str(used[0])]
        channels = list(reference.output_channels)
        conv_op = reference.conv_op
        num_stages = len(channels)
        self.message_stages = msg_cfg.stage_indices(num_stages) if msg_cfg.enabled else ()
        kernels = self._attention_kernels(msg_cfg.attention_kernel, reference.strides, patch_size)
        latent = [c if msg_cfg.latent_channels == "same" else int(msg_cfg.latent_channels) for c in channels]
        shared = msg_cfg.mode == "shared"
        self.messages = nn.ModuleDict()
        self.shared_encoders = nn.ModuleDict()
        for k, senders in enumerate(self.senders):
            for a in senders:
                for s in self.message_stages:
                    self.messages[self.pair_key(a, k, s)] = PairMessage(conv_op, channels[s], latent[s], msg_cfg,
                                                                        kernels[s], own_encoder=not shared)
                    if shared and f"{a}@{s}" not in self.shared_encoders:
                        self.shared_encoders[f"{a}@{s}"] = VariationalMessageEncoder(
                            conv_op, channels[s], latent[s], msg_cfg.variational, msg_cfg.logvar_clamp)
        self.decoders = nn.ModuleList([
            UNetDecoder(self.encoders[str(s.primary)], len(s.out_channels), decoder_n_conv, deep_supervision)
            for s in self.subtasks])
        # position of every output channel in [zero background (labels mode)] + subtask outputs in subtask order
        order = ([0] if output_mode == "labels" else []) + [c for s in self.subtasks for c in s.out_channels]
        self.register_buffer("_gather", torch.tensor([order.index(c) for c in range(num_outputs)]), persistent=False)
        self.missing_modalities: frozenset[int] = frozenset()

    # ------------------------------------------------------------------ structure
    @staticmethod
    def pair_key(sender: int, subtask: int, stage: int) -> str:
        return f"{sender}->{subtask}@{stage}"

    @staticmethod
    def _attention_kernels(kernel: int, strides: Sequence[Sequence[int]], patch_size: Sequence[int] | None
                           ) -> list[int]:
        if patch_size is None:
            return [kernel] * len(strides)
        size, kernels = np.array(patch_size, dtype=float), []
        for stride in strides:
            size = size / np.array(stride, dtype=float)
            kernels.append(kernel if size.min() >= 8 else min(kernel, 3))
        return kernels

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(sender, subtask index) in fixed order: subtask-major, sender ascending."""
        return [(a, k) for k, senders in enumerate(self.senders) for a in senders]

    @property
    def pair_names(self) -> list[str]:
        """``"T1->WT"``-style names in the order of the ``kl_stats`` returned by ``forward(..., return_aux=True)``."""
        return [f"{self.modality_names[a]}->{self.subtasks[k].name}" for a, k in self.pairs]

    @property
    def deep_supervision(self) -> bool:
        return self.decoders[0].deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        for decoder in self.decoders:
            decoder.deep_supervision = enabled

    def set_missing_modalities(self, modalities: Sequence[int]) -> None:
        """Switch off every message from these senders (inference without them; nnU-Net issue #513).

        Raises:
            InputError: a modality is the primary of a subtask (its branch cannot run without it) or out of range.
        """
        missing = frozenset(int(m) for m in modalities)
        for m in missing:
            if not 0 <= m < self.num_modalities:
                raise InputError(f"missing modality {m} out of range 0..{self.num_modalities - 1}")
            primaries = [s.name for s in self.subtasks if s.primary == m]
            if primaries:
                raise InputError(f"modality {self.modality_names[m]!r} is the primary modality of subtask(s) "
                                 f"{primaries}; a missing primary modality cannot be compensated")
        self.missing_modalities = missing

    # ------------------------------------------------------------------ forward
    def _sender_keep(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Training-time message dropout: per sample and sender, 0 drops all its messages (to every subtask)."""
        if not self.training or self.msg_cfg.dropout <= 0:
            return {}
        senders = sorted({a for senders in self.senders for a in senders})
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return {a: (torch.rand(shape, device=x.device) >= self.msg_cfg.dropout).to(x.dtype) for a in senders}

    def _run(self, x: torch.Tensor, collect: bool = False) -> tuple[list, list[torch.Tensor], dict]:
        """Per-subtask decoder outputs, per-pair KL scalars and (``collect``) per-pair message maps."""
        if x.shape[1] != self.num_modalities:
            raise ValueError(f"CIMLNet expects {self.num_modalities} input channels, got {x.shape[1]}")
        skips = {m: self.encoders[str(m)](x[:, m:m + 1]) for m in self.used_modalities
                 if m not in self.missing_modalities}
        keep = self._sender_keep(x)
        shared_cache: dict[str, tuple] = {}
        kls: list[torch.Tensor] = []
        collected: dict[str, dict[str, torch.Tensor]] = {}
        outputs = []
        for k, subtask in enumerate(self.subtasks):
            primary = skips[subtask.primary]
            fused = list(primary)
            for a in self.senders[k]:
                if a in self.missing_modalities:
                    kls.append(x.new_zeros((), dtype=torch.float32))
                    continue
                pair_kl = []
                for s in self.message_stages:
                    module = self.messages[self.pair_key(a, k, s)]
                    if module.encoder is None:
                        key = f"{a}@{s}"
                        if key not in shared_cache:
                            shared_cache[key] = self.shared_encoders[key](skips[a][s])
                        z, mu, logvar = shared_cache[key]
                    else:
                        z, mu, logvar = module.encoder(skips[a][s])
                    alpha = module.attention(primary[s], z)
                    message = alpha * module.projection(z)
                    if a in keep:
                        message = message * keep[a]
                    fused[s] = fused[s] + message
                    if logvar is None:  # deterministic messages: only the 0.5 mu^2 part of the KL exists
                        pair_kl.append(0.5 * mu.float().square().mean())
                    else:
                        pair_kl.append(gaussian_kl(mu, logvar))
                    if collect:
                        name = f"{self.modality_names[a]}->{subtask.name}"
                        collected.setdefault(name, {})
                        collected[name][f"attention@{s}"] = alpha
                        collected[name][f"magnitude@{s}"] = message.float().norm(dim=1, keepdim=True)
                        collected[name][f"kl@{s}"] = kl_density(mu, logvar, self.msg_cfg.logvar_clamp)
                kls.append(torch.stack(pair_kl).mean() if pair_kl else x.new_zeros((), dtype=torch.float32))
            outputs.append(self.decoders[k](fused))
        return outputs, kls, collected

    def _assemble(self, per_subtask: list[torch.Tensor]) -> torch.Tensor:
        parts = list(per_subtask)
        if self.output_mode == "labels":
            parts.insert(0, torch.zeros_like(parts[0][:, :1]))
        return torch.cat(parts, 1).index_select(1, self._gather)

    def forward(self, x: torch.Tensor, return_aux: bool = False
                ) -> torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        """``x [B, M, *patch]`` -> logits ``[B, num_outputs, *patch]`` (a list over resolutions with deep supervision).

        With ``return_aux=True`` also returns ``kl_stats [n_pairs]`` fp32 (mean KL per pair, ``pair_names`` order).
        Eval mode is deterministic (z = mu, no message dropout).
        """
        outputs, kls, _ = self._run(x)
        if self.deep_supervision:
            seg = [self._assemble([o[i] for o in outputs]) for i in range(len(outputs[0]))]
        else:
            seg = self._assemble(outputs)
        if not return_aux:
            return seg
        kl = torch.stack(kls) if kls else x.new_zeros((0,), dtype=torch.float32)
        return seg, kl

    @torch.no_grad()
    def message_tensors(self, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Eval-only: per pair name, ``attention@s`` (alpha), ``magnitude@s`` (L2 norm over channels of the accepted
        message m) and ``kl@s`` (KL density in nats), each ``[B, 1, *V_s]``."""
        if self.training:
            raise RuntimeError("message_tensors is for interpretation; call net.eval() first")
        return self._run(x, collect=True)[2]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Voxels of all feature maps (encoders, decoders, message tensors); nnU-Net's planner memory proxy."""
        total = np.int64(0)
        for m in self.used_modalities:
            total += self.encoders[str(m)].compute_conv_feature_map_size(input_size)
        for decoder in self.decoders:
            total += decoder.compute_conv_feature_map_size(input_size)
        reference = self.encoders[str(self.used_modalities[0])]
        size = np.array(input_size, dtype=np.int64)
        stage_voxels = []
        for stride in reference.strides:
            size = size // np.array(stride, dtype=np.int64)
            stage_voxels.append(int(np.prod(size)))
        for (a, k) in self.pairs:
            for s in self.message_stages:
                c = reference.output_channels[s]
                # mu, logvar, z, P(z), m and the fused sum, plus the 4-channel pooled map and alpha
                total += np.int64((6 * c + 5) * stage_voxels[s])
        return total


def resolve_arch_kwargs(configuration_manager) -> tuple[type[nn.Module], dict[str, Any], int | list[int]]:
    """``(encoder_class, encoder_kwargs, decoder_n_conv)`` from a configuration's architecture entries.

    Ops listed in ``network_arch_init_kwargs_req_import`` are resolved with ``pydoc.locate``, as nnU-Net's
    ``get_network_from_plans`` does; decoder-only keys are split off.

    Raises:
        ValueError: an architecture other than nnU-Net's PlainConvUNet or ResidualEncoderUNet.
    """
    arch = configuration_manager.network_arch_class_name
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    for key in configuration_manager.network_arch_init_kwargs_req_import:
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    decoder_n_conv = kwargs.pop("n_conv_per_stage_decoder")
    kwargs.pop("deep_supervision", None)
    name = arch.rsplit(".", 1)[-1]
    if name == "PlainConvUNet":
        return PlainConvEncoder, kwargs, decoder_n_conv
    if name == "ResidualEncoderUNet":
        return ResidualEncoder, kwargs, decoder_n_conv
    raise ValueError(f"CIML builds its encoders from PlainConvUNet or ResidualEncoderUNet plans; this configuration "
                     f"uses {arch}")


def build_ciml_network(configuration_manager, num_input_channels: int, num_output_channels: int,
                       block: dict[str, Any] | None, overrides: dict[str, Any] | None = None,
                       enable_deep_supervision: bool = True, allow_init: bool = True) -> CIMLNet:
    """Build ``CIMLNet`` from a configuration and the plans' CIML block (``None`` = automatic default).

    The structure depends only on these arguments (never on the deep-supervision flag), so the predictor rebuilds
    the trained network from the plans alone.
    """
    settings = effective_settings(block, overrides or {}, num_input_channels, num_output_channels)
    resolved = settings["resolved"]
    subtasks = validate_resolved(resolved, num_input_channels, num_output_channels)
    encoder_class, encoder_kwargs, decoder_n_conv = resolve_arch_kwargs(configuration_manager)
    network = CIMLNet(encoder_kwargs, decoder_n_conv, num_input_channels, subtasks,
                      MessageConfig.from_settings(settings), resolved["output_mode"], num_output_channels,
                      enable_deep_supervision, encoder_class=encoder_class,
                      modality_names=settings["modality_names"], patch_size=configuration_manager.patch_size)
    if allow_init:
        network.apply(InitWeights_He(1e-2))
    return network


def upsample_to(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linear interpolation of ``[B, C, *V]`` maps to ``size`` (bilinear in 2D, trilinear in 3D)."""
    mode = "trilinear" if volume.ndim == 5 else "bilinear"
    return F.interpolate(volume.float(), size=tuple(size), mode=mode, align_corners=False)
