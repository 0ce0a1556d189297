"""``ExtTrainerBase``: the nnU-Net trainer every nnunet-ext trainer derives from.

It adds, without copying nnU-Net's method bodies (except the checkpoint dict,
:func:`~nnunet_ext.compat.nnunet_checkpoint`):

* one training step built from :func:`~nnunet_ext.training.step.optimise_step` (subclasses implement
  :meth:`ExtTrainerBase.compute_loss` and optionally :meth:`ExtTrainerBase.after_optimizer_step`);
* extra modules (teachers, peer models, heads) built once the network exists and, when trainable, optimised
  together with it;
* extra per-epoch values in the log and in ``progress.png`` (``extra_log_keys``);
* extra checkpoint state under the ``nnunet_ext`` key, restored by ``nnUNetv2_train --c``; checkpoints are written
  atomically, and ``--c`` falls back to the newest intact checkpoint if the chosen one is broken;
* per-dataset method settings read from the plans (``method_settings``);
* a clear refusal of setups a method does not support (DDP, cascade);
* multi-GPU (DDP) wiring for the methods that declare ``supports_ddp`` (``docs/ddp.md`` rules R1-R5): extra modules
  broadcast from rank 0 after ``initialize``, gradients of every optimised parameter averaged over ranks in the
  shared step, global means of the extra log values, per-rank RNG states in the checkpoint.

Hyper-parameters are class attributes; variants are tiny subclasses, as in nnU-Net's ``variants/`` folder.
"""
from __future__ import annotations

import random
from typing import Any, ClassVar

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from torch import nn

from nnunet_ext.compat import nnunet_checkpoint, unwrap
from nnunet_ext.plans import METHOD_FAMILIES, method_settings
from nnunet_ext.training.checkpoint import (
    CHECKPOINT_KEY,
    choose_checkpoint_to_resume,
    make_extra_payload,
    write_checkpoint_atomically,
)
from nnunet_ext.training.distributed import (
    all_gather_objects,
    average_gradients_,
    broadcast_module_,
    rank,
    world_size,
)
from nnunet_ext.training.logging import ExtLocalLogger, log_epoch_values, register_log_keys
from nnunet_ext.training.step import autocast_context, optimise_step, optimised_parameters


def move_to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside lists/tuples, e.g. deep-supervision targets) to ``device``; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(v.to(device, non_blocking=True) for v in value)
    return value


class ExtTrainerBase(nnUNetTrainer):
    """Base class of the nnunet-ext trainers (see the module docstring).

    Class attributes (override in subclasses):
        method_family: key of the method's block in the plans and tag of its checkpoint state.
        extra_log_keys: per-epoch values logged besides nnU-Net's; ``compute_loss`` may return them as
            components (averaged over the epoch's steps), everything else is logged as NaN.
        supports_ddp: False makes ``initialize`` refuse ``-num_gpus > 1`` with a clear message.
        network_gradients_via_ddp: True if ``compute_loss`` runs the network through the DDP wrapper
            (``self.network(...)``) for every parameter, so DDP already averaged the network's gradients and the
            shared step averages only the other optimised parameters. False (default, always correct): every
            optimised parameter is averaged by the step (forwards through ``unwrap(self.network)`` bypass DDP).
        supports_cascade: False refuses cascade configurations (previous-stage segmentations as input).
        clip_norm: gradient clipping norm over all optimised parameters (nnU-Net: 12).
        task_kind: ``"segmentation"`` or ``"classification"`` (sidecar classifiers such as CFCML); the demo and the
            benchmark pick the evaluation that matches.
    """

    method_family: ClassVar[str] = "base"
    task_kind: ClassVar[str] = "segmentation"
    extra_log_keys: ClassVar[tuple[str, ...]] = ()
    supports_ddp: ClassVar[bool] = False
    network_gradients_via_ddp: ClassVar[bool] = False
    supports_cascade: ClassVar[bool] = False
    clip_norm: ClassVar[float] = 12.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        local = ExtLocalLogger(self.extra_log_keys, verbose=self.logger.local_logger.verbose)
        local.my_fantastic_logging = self.logger.local_logger.my_fantastic_logging
        self.logger.local_logger = local
        self.extra_modules = nn.ModuleDict()

    # ------------------------------------------------------------------ set-up
    @classmethod
    def method_settings(cls, plans_manager) -> dict[str, Any]:
        """This method's per-dataset settings from the plans (``{}`` when the plans carry none).

        A classmethod so that ``build_network_architecture``, which nnU-Net's predictor calls on the class,
        can use it too.
        """
        if cls.method_family not in METHOD_FAMILIES:
            return {}
        return method_settings(plans_manager, cls.method_family)

    def initialize(self) -> None:
        self.check_supported_setup()
        super().initialize()
        register_log_keys(self, self.extra_log_keys)
        self.synchronise_modules()

    def synchronise_modules(self) -> None:
        """Multi-GPU: make rank 0's network and extra modules everyone's (R1 of ``docs/ddp.md``).

        Extra modules are built in ``configure_optimizers``, before nnU-Net wraps the network in DDP, with
        rank-dependent random initialisation (teachers copied from a rank's own network, heads, peer models).
        In place, so the optimiser's parameter references stay valid. A collective; nothing without DDP.
        """
        if world_size() > 1:
            broadcast_module_(self.extra_modules, src=0)
            broadcast_module_(self.network, src=0)  # DDP did this at wrap time; kept for symmetry with --c

    def check_supported_setup(self) -> None:
        """Refuse DDP and cascade configurations the method does not support, before anything is built."""
        name = type(self).__name__
        if self.is_ddp and not self.supports_ddp:
            raise NotImplementedError(
                f"{name} does not support multi-GPU (DDP) training yet: its extra state (teachers, queues, memory "
                f"banks, heads) is not synchronised across ranks. Train with -num_gpus 1."
            )
        if self.is_cascaded and not self.supports_cascade:
            raise NotImplementedError(
                f"{name} does not support cascade configurations ({self.configuration_name}); use a 2d, "
                f"3d_fullres or 3d_lowres configuration."
            )

    def build_extra_modules(self) -> dict[str, nn.Module]:
        """Modules besides the inference network (teachers, peers, heads). Called once, after the network is built.

        Trainable parameters of the returned modules are optimised with the network; teachers should set
        ``requires_grad_(False)``. Default: none.
        """
        return {}

    def configure_optimizers(self):
        # nnU-Net's initialize() builds the network and then calls configure_optimizers(): the only point where
        # extra modules can be built from the network and still be handed to the optimiser.
        if not self.extra_modules:
            self.extra_modules = nn.ModuleDict(self.build_extra_modules()).to(self.device)
        optimizer, lr_scheduler = super().configure_optimizers()
        extra = [p for p in self.extra_modules.parameters() if p.requires_grad]
        if extra:
            # inherits lr/momentum/weight decay from the optimiser's defaults; nnU-Net's PolyLRScheduler sets
            # the lr of every parameter group
            optimizer.add_param_group({"params": extra})
        return optimizer, lr_scheduler

    # ------------------------------------------------------------------ training step
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss of one step and its named components (detached or not; they are only logged).

        Called inside the autocast region; compute numerically sensitive terms under
        :func:`~nnunet_ext.training.step.fp32_context`. Default: nnU-Net's own loss on the network output.

        Args:
            batch: nnU-Net's batch dict with tensors already on ``self.device``: ``data`` ``[B, C, *patch]``,
                ``target`` (tensor or deep-supervision list), ``keys``.
        """
        output = self.network(batch["data"])
        return self.loss(output, batch["target"]), {}

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step (e.g. an EMA teacher update). Default: nothing."""

    def train_step(self, batch: dict) -> dict:
        batch = {k: move_to_device(v, self.device) for k, v in batch.items()}
        with autocast_context(self.device):
            loss, components = self.compute_loss(batch)
        unknown = set(components) - set(self.extra_log_keys)
        if unknown:
            raise KeyError(f"{type(self).__name__}.compute_loss returned components {sorted(unknown)} that are not "
                           f"in extra_log_keys {self.extra_log_keys}")
        optimise_step(self.optimizer, loss, self.grad_scaler, clip_norm=self.clip_norm,
                      synchronise_gradients=self.synchronise_gradients if world_size() > 1 else None)
        self.after_optimizer_step()
        result = {"loss": loss.detach().cpu().numpy()}
        result.update({k: torch.as_tensor(v).detach().float().cpu().numpy() for k, v in components.items()})
        return result

    def synchronise_gradients(self) -> None:
        """Multi-GPU, between backward and unscale/clip/step: every optimised parameter's gradient becomes the mean
        over ranks (R2 of ``docs/ddp.md``), as DDP would average it.

        Needed because the methods' forwards bypass the DDP wrapper (feature taps on the unwrapped network) and
        their heads and peer models are not inside DDP at all. A parameter without a gradient on some rank (a head
        skipped in this step) counts as zero there; without a gradient on every rank it stays ``None``, so no
        "unused parameters" error can arise. Network parameters are skipped when ``network_gradients_via_ddp``.
        """
        parameters = optimised_parameters(self.optimizer)
        if self.network_gradients_via_ddp:
            network = {id(p) for p in unwrap(self.network).parameters()}
            parameters = [p for p in parameters if id(p) not in network]
        average_gradients_(parameters)

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        values = {k: np.asarray(outputs[k]).ravel() for k in self.extra_log_keys if k in outputs}
        if world_size() > 1:
            # R4: every rank logs the mean over all ranks' steps (nnU-Net gathers its train loss the same way)
            per_rank = all_gather_objects([values])
            values = {k: np.concatenate([r[k] for r in per_rank if k in r])
                      for k in self.extra_log_keys if any(k in r for r in per_rank)}
        means = {k: float(np.mean(v)) for k, v in values.items()}
        log_epoch_values(self, means, self.extra_log_keys)

    def on_epoch_end(self) -> None:
        for key in self.extra_log_keys:
            self.print_to_log_file(key, np.round(self.logger.get_value(key, step=-1), decimals=4))
        super().on_epoch_end()

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict[str, Any]:
        """State saved under ``checkpoint['nnunet_ext']['state']``. Subclasses extend the dict of ``super()``.

        Written by rank 0 only under DDP, so it must not call collectives; everything in it is identical on all
        ranks except the RNG states, which :meth:`save_checkpoint` gathers beforehand (``rng_per_rank``).
        """
        return {
            "extra_modules": self.extra_modules.state_dict(),
            "rng": self._rng_state(),
        }

    def _rng_state(self) -> dict[str, Any]:
        """This process's random generators: torch (CPU), NumPy, Python and, on CUDA, the generator of this rank's
        device (each DDP rank has its own device, so gathering these per rank keeps every rank's stream)."""
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def prepare_for_extra_state(self, state: dict[str, Any]) -> None:
        """Called before nnU-Net loads the checkpoint: make the optimiser's parameter groups match the saved
        ones (e.g. a staged method's heads). Default: nothing."""

    def restore_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_checkpoint_state` saved. Subclasses call ``super()`` and restore the rest."""
        self.extra_modules.load_state_dict(state["extra_modules"], strict=True)
        per_rank = state.get("rng_per_rank") or ([state["rng"]] if state.get("rng") is not None else [])
        if not per_rank:
            return
        if len(per_rank) == world_size():
            rng = per_rank[rank()]  # same number of ranks: every rank continues its own streams exactly
        else:
            rng = per_rank[0]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if len(per_rank) != world_size() and rank() > 0:
            # another number of ranks (R5): rank 0 continues rank 0's streams; the others need their own, distinct
            # and reproducible streams (identical ones would draw identical augmentations on every rank)
            seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item()) + rank()
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus the ``nnunet_ext`` state, written once and atomically (only rank 0 writes).

        Replaces nnU-Net's ``save_checkpoint`` instead of extending it: nnU-Net writes straight into ``filename``,
        so a kill during its write or before our state was added left a broken file (see
        :func:`~nnunet_ext.training.checkpoint.write_checkpoint_atomically`).
        """
        # nnU-Net calls this on every rank. The RNG states of all ranks are gathered first (a collective, so before
        # any rank-0-only branch) so that --c on the same number of ranks is exact (R5).
        rng_per_rank = all_gather_objects([self._rng_state()]) if world_size() > 1 else None
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        state = self.extra_checkpoint_state()
        if rng_per_rank is not None:
            state["rng_per_rank"] = rng_per_rank
        checkpoint = nnunet_checkpoint(self)
        checkpoint[CHECKPOINT_KEY] = make_extra_payload(self.method_family, state)
        write_checkpoint_atomically(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: str) -> None:
        """nnU-Net's ``load_checkpoint`` plus the ``nnunet_ext`` state.

        If the file is not intact (unreadable, truncated, without our state), the newest intact one of
        ``checkpoint_final/latest/best.pth`` next to it is loaded instead, with a warning naming both files
        (:func:`~nnunet_ext.training.checkpoint.choose_checkpoint_to_resume`).
        """
        if not isinstance(filename_or_checkpoint, str):
            raise TypeError(
                f"{type(self).__name__}.load_checkpoint takes a checkpoint file path, got "
                f"{type(filename_or_checkpoint).__name__}: nnU-Net 2.8.1's own load_checkpoint fails on dicts "
                f"(UnboundLocalError), and the extra nnunet-ext state is read from the file"
            )
        if not self.was_initialized:
            self.initialize()
        choice = choose_checkpoint_to_resume(filename_or_checkpoint, self.method_family)
        if choice.warning:
            self.print_to_log_file(choice.warning)
        filename, state = choice.filename, choice.state
        if state is not None:
            self.prepare_for_extra_state(state)
        super().load_checkpoint(filename)
        if state is None:
            self.print_to_log_file(
                f"WARNING: {filename} has no nnunet-ext state (written by another trainer?); "
                f"network and optimiser were restored, {type(self).__name__}'s extra state starts fresh"
            )
        else:
            self.restore_extra_checkpoint_state(state)
        # every rank restored the same file; the broadcast is cheap insurance (e.g. state missing from old files)
        self.synchronise_modules()
        # the checkpoint replaced the whole logging dict; older checkpoints may lack our keys
        register_log_keys(self, self.extra_log_keys)
