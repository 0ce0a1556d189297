"""The ``nnunet_ext`` checkpoint key: extra trainer state that nnU-Net's own checkpoint does not hold.

``network_weights`` stays exactly the module that ``build_network_architecture`` rebuilds for inference;
everything else a trainer needs to resume (teachers, peer models, heads, memory banks, queues, RNG state) goes
under one namespaced key so that stock nnU-Net ignores it and ``--c`` restores it.
"""
from __future__ import annotations

import os

import torch

from nnunet_ext.compat import torch_load_cpu
from nnunet_ext.version import __version__

CHECKPOINT_KEY = "nnunet_ext"
CHECKPOINT_FORMAT = 1


def make_extra_payload(family: str, state: dict) -> dict:
    """The value stored under ``checkpoint['nnunet_ext']``."""
    return {"format": CHECKPOINT_FORMAT, "family": family, "package_version": __version__, "state": state}


def add_extra_state(filename: str, family: str, state: dict) -> None:
    """Add the extra state to a checkpoint nnU-Net has just written, atomically.

    nnU-Net's ``save_checkpoint`` builds its dict internally, so instead of copying its body we re-open the file
    and replace it through a temporary file (a crash never leaves a half-written checkpoint).
    """
    checkpoint = torch_load_cpu(filename)
    checkpoint[CHECKPOINT_KEY] = make_extra_payload(family, state)
    tmp = filename + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, filename)


def read_extra_state(filename: str, family: str) -> dict | None:
    """The extra state stored in ``filename``, or ``None`` if the checkpoint has none (e.g. stock nnU-Net).

    Raises:
        ValueError: if the checkpoint's extra state belongs to another method family or a newer format.
    """
    payload = torch_load_cpu(filename).get(CHECKPOINT_KEY)
    if payload is None:
        return None
    if payload.get("family") != family:
        raise ValueError(
            f"{filename} holds nnunet-ext state of method family {payload.get('family')!r}, "
            f"but this trainer belongs to {family!r}; resume with the trainer that wrote it"
        )
    if payload.get("format", 0) > CHECKPOINT_FORMAT:
        raise ValueError(
            f"{filename} was written by nnunet-ext {payload.get('package_version')} (checkpoint format "
            f"{payload['format']}); this installation ({__version__}) reads format <= {CHECKPOINT_FORMAT}"
        )
    return payload["state"]
