"""Checkpoints: the ``nnunet_ext`` key, atomic writes, and choosing an intact checkpoint on ``--c``.

``network_weights`` stays exactly the module that ``build_network_architecture`` rebuilds for inference;
everything else a trainer needs to resume (teachers, peer models, heads, memory banks, queues, RNG state) goes
under one namespaced key so that stock nnU-Net ignores it and ``--c`` restores it.

A checkpoint (nnU-Net's content and ours, one dict) is written once, to a temporary file in the same folder, flushed
to disk and renamed onto its final name, so a process killed at any moment leaves either the previous checkpoint
or the new one, never a truncated one or one without our state. Temporary files of a killed save are never read
(nnU-Net's ``--c`` opens only the final names) and are removed by the next save in that folder.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from nnunet_ext.compat import torch_load_cpu
from nnunet_ext.errors import InputError
from nnunet_ext.version import __version__

CHECKPOINT_KEY = "nnunet_ext"
CHECKPOINT_FORMAT = 1

#: The checkpoints ``nnUNetv2_train --c`` resumes from, in the order nnU-Net 2.8.1's ``maybe_load_checkpoint``
#: looks for them.
RESUMABLE_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
#: Temporary files are ``<final name>.<random>.tmp``; ``<final name>.tmp`` is also cleaned (nnunet-ext 0.1.0's).
TEMPORARY_SUFFIX = ".tmp"
NO_EXTRA_STATE = "has no nnunet-ext state"


def make_extra_payload(family: str, state: dict) -> dict:
    """The value stored under ``checkpoint['nnunet_ext']``."""
    return {"format": CHECKPOINT_FORMAT, "family": family, "package_version": __version__, "state": state}


def leftover_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Temporary checkpoint files in ``folder`` that a killed save left behind."""
    folder = Path(folder)
    return sorted({*folder.glob(f"*.pth.*{TEMPORARY_SUFFIX}"), *folder.glob(f"*.pth{TEMPORARY_SUFFIX}")})


def write_checkpoint_atomically(checkpoint: dict, filename: str | os.PathLike) -> None:
    """``torch.save(checkpoint, filename)`` such that ``filename`` is, at every moment, the old file or the new one.

    Writes a temporary file in the same folder (``os.replace`` is atomic only within one file system), flushes and
    fsyncs it, renames it onto ``filename`` and fsyncs the folder so the rename itself survives a power cut. Only
    one process may save into a folder at a time (nnU-Net: rank 0), so temporary files found there beforehand are
    leftovers of a killed save and are removed.
    """
    filename = Path(filename)
    folder = filename.parent
    for leftover in leftover_temporary_files(folder):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    # not tempfile.mkstemp: its files are private (0600), while a checkpoint should get the usual umask permissions
    temporary = folder / f"{filename.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
    file = open(temporary, "xb")  # opened before the try: if this fails there is nothing to remove
    try:
        with file as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, filename)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable. Not possible on every platform (Windows cannot open folders)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def extra_state_of(checkpoint: dict, filename: str | os.PathLike, family: str) -> dict | None:
    """The extra state stored in a loaded checkpoint, or ``None`` if it has none (e.g. stock nnU-Net).

    Raises:
        ValueError: if the checkpoint's extra state belongs to another method family or a newer format.
    """
    payload = checkpoint.get(CHECKPOINT_KEY)
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


def read_extra_state(filename: str | os.PathLike, family: str) -> dict | None:
    """The extra state stored in the checkpoint file ``filename`` (see :func:`extra_state_of`)."""
    return extra_state_of(torch_load_cpu(str(filename)), filename, family)


@dataclass
class ResumeChoice:
    """The checkpoint to resume from.

    Attributes:
        filename: the file to load (the requested one unless it was not intact).
        state: its nnunet-ext state, ``None`` if it has none.
        epoch: the epoch training continues at (nnU-Net's stored ``current_epoch``).
        warning: why another file than the requested one is used, or ``None``.
    """

    filename: str
    state: dict | None
    epoch: int | None
    warning: str | None = None


def _inspect(filename: Path, family: str) -> tuple[dict | None, int | None, str | None]:
    """(state, epoch, problem) of one checkpoint file; ``problem`` is ``None`` for an intact file with our state."""
    if not filename.is_file():
        return None, None, "is missing"
    try:
        checkpoint = torch_load_cpu(str(filename))
    except Exception as e:  # truncated, 0 bytes, not a torch file: all mean "not usable", named in the message
        return None, None, f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty'})"
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        return None, None, "is not an nnU-Net checkpoint"
    state = extra_state_of(checkpoint, filename, family)
    epoch = checkpoint.get("current_epoch")
    if state is None:
        return None, epoch, NO_EXTRA_STATE
    return state, epoch, None


def choose_checkpoint_to_resume(filename: str | os.PathLike, family: str) -> ResumeChoice:
    """The checkpoint to load for ``filename``, falling back to the newest intact sibling if it is not intact.

    nnU-Net's ``--c`` picks ``checkpoint_final``, else ``checkpoint_latest``, else ``checkpoint_best`` by existence
    alone. If that file cannot be read (e.g. a 0-byte or truncated file of a killed non-atomic save) or lacks the
    nnunet-ext state (a save killed between nnunet-ext 0.1.0's two writes), the other two are tried:
    ``checkpoint_final`` first (nnU-Net's preference), then the others newest first by modification time.
    ``checkpoint_best`` is usually an older state; resuming from it repeats the epochs since, as the warning says.

    Intact means readable and holding this family's nnunet-ext state; failing that, a readable checkpoint without
    that state (stock nnU-Net; the extra state then starts fresh) is used, the requested one first. A file that is
    not one of the three names (an explicit path) is never replaced by another file.

    Raises:
        InputError: if no candidate can be read; the message names every file and its problem.
        ValueError: if a checkpoint holds another method family's state or a newer format.
    """
    requested = Path(filename)
    candidates = [requested]
    if requested.name in RESUMABLE_CHECKPOINTS:
        siblings = [requested.parent / name for name in RESUMABLE_CHECKPOINTS if name != requested.name]
        siblings = [p for p in siblings if p.is_file()]
        siblings.sort(key=lambda p: (p.name != RESUMABLE_CHECKPOINTS[0], -p.stat().st_mtime))
        candidates += siblings
    problems: list[tuple[Path, str]] = []
    without_state: ResumeChoice | None = None
    for candidate in candidates:
        state, epoch, problem = _inspect(candidate, family)
        if problem is None:
            return ResumeChoice(str(candidate), state, epoch, _fallback_warning(requested, problems, candidate, epoch))
        problems.append((candidate, problem))
        if problem == NO_EXTRA_STATE and without_state is None:
            without_state = ResumeChoice(str(candidate), None, epoch)
    if without_state is not None:
        without_state.warning = _fallback_warning(requested, problems, Path(without_state.filename),
                                                  without_state.epoch)
        return without_state
    listed = "; ".join(f"{path.name} {problem}" for path, problem in problems)
    raise InputError(f"cannot resume from {requested.parent}: no readable checkpoint ({listed}). Move the broken "
                     f"files away to start this fold anew")


def _fallback_warning(requested: Path, problems: list[tuple[Path, str]], chosen: Path, epoch: int | None) -> str | None:
    """The warning for resuming from ``chosen`` instead of ``requested`` (``None`` if they are the same file)."""
    if chosen == requested:
        return None
    return (f"WARNING: {requested} {problems[0][1]}; resuming from {chosen} instead: training continues at its "
            f"epoch {epoch}")
