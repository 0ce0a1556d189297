"""The few places where nnunet-ext depends on nnU-Net internals, kept in one file.

Each helper names the nnU-Net behaviour it relies on, so that a change upstream breaks one function (and its
test) instead of every trainer.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch._dynamo import OptimizedModule

#: Parameter names of ``build_network_architecture`` since nnU-Net 2.7. The trainer and the predictor call
#: the new form only if a parameter named ``plans_manager`` exists.
BUILDER_PARAMETERS = (
    "plans_manager",
    "configuration_manager",
    "num_input_channels",
    "num_output_channels",
    "enable_deep_supervision",
)


def builder_signature_is_supported(builder) -> bool:
    """True if ``builder`` has the nnU-Net >= 2.7 ``build_network_architecture`` parameters, in order."""
    names = [p for p in inspect.signature(builder).parameters if p not in ("self", "cls")]
    return tuple(names[: len(BUILDER_PARAMETERS)]) == BUILDER_PARAMETERS


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel and ``torch.compile`` wrappers (as nnU-Net's ``save_checkpoint`` does)."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    if isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


def logging_dict(trainer) -> dict[str, list]:
    """The local logger's per-epoch value lists (``LocalLogger.my_fantastic_logging`` in nnU-Net 2.8)."""
    return trainer.logger.local_logger.my_fantastic_logging


def torch_load_cpu(filename: str) -> dict:
    """Load an nnU-Net checkpoint on the CPU (checkpoints hold numpy/pickled objects, hence no weights_only)."""
    return torch.load(filename, map_location=torch.device("cpu"), weights_only=False)


def nnunet_checkpoint(trainer) -> dict:
    """The dict nnU-Net 2.8.1's ``nnUNetTrainer.save_checkpoint`` writes, built from the trainer's own pieces.

    Reproduced rather than reused because nnU-Net builds this dict inside ``save_checkpoint`` and passes it straight
    to ``torch.save`` on the final file name: there is no hook to add our state before the write or to write
    elsewhere first. ``tests/training/test_checkpoint_atomic.py`` compares it with what nnU-Net itself writes, so an
    nnU-Net upgrade that changes the dict fails there.
    """
    return {
        "network_weights": unwrap(trainer.network).state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": trainer.logger.get_checkpoint(),
        "_best_ema": trainer._best_ema,
        "current_epoch": trainer.current_epoch + 1,
        "init_args": trainer.my_init_kwargs,
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
    }
