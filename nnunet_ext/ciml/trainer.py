"""``CIMLTrainerBase``: nnU-Net training of :class:`~nnunet_ext.ciml.network.CIMLNet` with the VIB loss.

Loss (CIML spec section 4): ``L = L_seg + beta(e) * sum_pairs KL_pair``, where ``L_seg`` is nnU-Net's own loss
(DC+BCE for regions, DC+CE for labels, deep-supervision wrapper) on the assembled output, ``KL_pair`` the mean
KL of the pair's messages (averaged over its message stages, fp32) and ``beta(e)`` the linear warm-up of
:class:`~nnunet_ext.ciml.vib.BetaSchedule`, a function of the epoch only (identical on every rank and after
``--c``). Everything else (optimiser, schedule, augmentation, validation, export) is nnU-Net's.

The trainers in ``trainers/ciml_trainers.py`` are thin subclasses that only set ``ciml_overrides``.
"""
from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import numpy as np
import torch
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from torch._dynamo import OptimizedModule

from nnunet_ext.ciml.decomposition import check_block_against_dataset, effective_settings
from nnunet_ext.ciml.network import CIMLNet, build_ciml_network
from nnunet_ext.ciml.vib import BetaSchedule
from nnunet_ext.training.base_trainer import ExtTrainerBase
from nnunet_ext.training.distributed import all_reduce_mean_, world_size
from nnunet_ext.training.step import fp32_context


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP and ``torch.compile`` wrappers."""
    if isinstance(network, torch.nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


class CIMLTrainerBase(ExtTrainerBase):
    """CIML on nnU-Net (see the module docstring). Variants override ``ciml_overrides`` only.

    Class attributes:
        ciml_overrides: settings that replace the plans' CIML settings (e.g. ``{"messages": False}``); keys of
            :data:`nnunet_ext.ciml.decomposition.DEFAULT_SETTINGS`. They change the architecture, so the same trainer
            name is needed at prediction time (it is, through the checkpoint's ``trainer_name``).
        kl_log_file: per-epoch, per-pair KL values written into the fold folder.
    """

    method_family: ClassVar[str] = "ciml"
    # DDP (docs/ddp.md 4.4): the training forward goes through the DDP wrapper, which averages the network's
    # gradients; there are no extra modules. beta(e) is a function of the epoch (identical on every rank).
    supports_ddp: ClassVar[bool] = True
    network_gradients_via_ddp: ClassVar[bool] = True
    extra_log_keys: ClassVar[tuple[str, ...]] = ("ciml_loss_seg", "ciml_kl_total", "ciml_beta")
    ciml_overrides: ClassVar[dict[str, Any]] = {}
    # an auxiliary modality may be absent at inference: its messages are switched off (nnunet-ext predict --missing);
    # read by nnunet-ext benchmark --missing-channels to choose that mode instead of zero-filling the channel
    handles_missing_modalities: ClassVar[bool] = True
    kl_log_file: ClassVar[str] = "ciml_kl.json"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ciml_config: dict[str, Any] | None = None
        self.beta_schedule: BetaSchedule | None = None
        self.beta_now = 0.0
        self.kl_history: list[dict[str, Any]] = []
        self._kl_pair_sum: torch.Tensor | None = None
        self._kl_steps = 0

    # ------------------------------------------------------------------ set-up
    @classmethod
    def ciml_settings(cls, plans_manager, num_input_channels: int, num_output_channels: int) -> dict[str, Any]:
        """The effective CIML settings: the plans' block (or the automatic default) plus ``ciml_overrides``."""
        return effective_settings(cls.method_settings(plans_manager) or None, cls.ciml_overrides, num_input_channels,
                                  num_output_channels, where=f"plans {plans_manager.plans_name!r}")

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> CIMLNet:
        return build_ciml_network(configuration_manager, num_input_channels, num_output_channels,
                                  cls.method_settings(plans_manager) or None, cls.ciml_overrides,
                                  enable_deep_supervision)

    def initialize(self) -> None:
        if not self.was_initialized:
            self.check_supported_setup()
            block = self.method_settings(self.plans_manager)
            if block:
                # names in the block must still exist: catches a dataset.json that changed after configure
                check_block_against_dataset(block, self.dataset_json)
            num_inputs = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                      self.dataset_json)
            self.ciml_config = self.ciml_settings(self.plans_manager, num_inputs,
                                                  self.label_manager.num_segmentation_heads)
            mode = self.ciml_config["resolved"]["output_mode"]
            if (mode == "regions") != self.label_manager.has_regions and mode != "direct":
                raise ValueError(f"the CIML block is in {mode!r} mode but the dataset is "
                                 f"{'region' if self.label_manager.has_regions else 'label'}-based; run "
                                 f"nnunet-ext configure ciml again")
            self.beta_schedule = BetaSchedule(self.ciml_config["beta"], self.ciml_config["beta_warmup_fraction"])
        super().initialize()

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        # nnU-Net's version toggles network.decoder; CIMLNet has one decoder per subtask
        unwrap_network(self.network).deep_supervision = enabled

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        self.beta_now = self.beta_schedule(self.current_epoch, self.num_epochs)
        self._kl_pair_sum, self._kl_steps = None, 0
        super().on_train_epoch_start()

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seg, kl_pairs = self.network(batch["data"], return_aux=True)
        loss_seg = self.loss(seg, batch["target"])
        with fp32_context(self.device):
            kl_pairs = kl_pairs.float()
            kl_total = kl_pairs.sum()
            loss = loss_seg.float() + self.beta_now * kl_total
        detached = kl_pairs.detach()
        self._kl_pair_sum = detached if self._kl_pair_sum is None else self._kl_pair_sum + detached
        self._kl_steps += 1
        return loss, {"ciml_loss_seg": loss_seg.detach(), "ciml_kl_total": kl_total.detach(),
                      "ciml_beta": torch.tensor(self.beta_now)}

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        names = unwrap_network(self.network).pair_names
        if self._kl_pair_sum is not None:
            pair_means = self._kl_pair_sum / max(1, self._kl_steps)
            if world_size() > 1:
                # every rank ran the same number of steps: the mean of the per-rank means is the global mean
                pair_means = all_reduce_mean_(pair_means.contiguous())
            means = pair_means.cpu().tolist()
        else:
            means = [float("nan")] * len(names)
        self.kl_history = [h for h in self.kl_history if h["epoch"] < self.current_epoch]
        self.kl_history.append({"epoch": self.current_epoch, "beta": self.beta_now,
                                "kl_total": float(np.nansum(means)) if means else 0.0,
                                "kl_pairs": dict(zip(names, means))})
        if self.local_rank == 0:
            os.makedirs(self.output_folder, exist_ok=True)
            with open(os.path.join(self.output_folder, self.kl_log_file), "w") as f:
                json.dump(self.kl_history, f, indent=1)

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict[str, Any]:
        state = super().extra_checkpoint_state()
        state.update({"config": self.ciml_config, "kl_history": self.kl_history})
        return state

    def restore_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().restore_extra_checkpoint_state(state)
        self.kl_history = [h for h in state.get("kl_history", []) if h["epoch"] < self.current_epoch]
