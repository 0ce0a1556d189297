"""What the benchmark and the demo need to know about a trainer class before training it.

The class is loaded through nnU-Net's own lookup (``recursive_find_trainer_class_by_name`` with
``nnUNet_extTrainer`` pointing at our trainers and any extra folders), exactly as ``nnUNetv2_train`` will load it,
so a trainer that cannot be imported fails here, before any run starts. Only the benchmark and the demo call
this; ``nnunet-ext env`` never imports a trainer.
"""
from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunet_ext.discovery import ENV_VAR, ext_trainer_path

SEMI_SUPERVISED_BASE = "ExtSemiSupervisedTrainerBase"


@dataclass(frozen=True)
class TrainerTraits:
    """``task_kind`` is the class attribute of :class:`~nnunet_ext.training.base_trainer.ExtTrainerBase`
    (``"segmentation"`` for stock nnU-Net trainers); ``semi_supervised`` means the class derives from
    ``ExtSemiSupervisedTrainerBase`` and needs ``nnunet-ext preprocess-unlabeled``; ``handles_missing_modalities``
    (class attribute, False when absent) means its models can predict without some input channels by design
    (``nnunet-ext predict --missing-mode messages-off``, CIML)."""

    name: str
    task_kind: str
    semi_supervised: bool
    module: str
    handles_missing_modalities: bool = False


@contextlib.contextmanager
def _trainer_lookup_path(extra_trainer_dirs: Sequence[str | Path]):
    old = os.environ.get(ENV_VAR)
    value = ext_trainer_path(old)
    if extra_trainer_dirs:
        value = os.pathsep.join([value, *(str(Path(d).resolve()) for d in extra_trainer_dirs)])
    os.environ[ENV_VAR] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def load_trainer_class(name: str, extra_trainer_dirs: Sequence[str | Path] = ()) -> type:
    """The trainer class ``name`` as ``nnUNetv2_train`` will load it (nnU-Net's lookup over our trainer folders
    and ``extra_trainer_dirs``).

    Raises:
        ValueError: nnU-Net cannot find the class (the message lists where it looked).
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with _trainer_lookup_path(extra_trainer_dirs), contextlib.redirect_stdout(io.StringIO()):
        try:
            return recursive_find_trainer_class_by_name(name)
        except RuntimeError as e:  # nnU-Net's "could not find" (import errors of a trainer file propagate)
            raise ValueError(f"trainer {name!r}: {e}") from e


def trainer_traits(name: str, extra_trainer_dirs: Sequence[str | Path] = ()) -> TrainerTraits:
    """Load ``name`` as nnU-Net would (:func:`load_trainer_class`) and read its traits.

    Raises:
        ValueError: nnU-Net cannot find the class (the message lists where it looked).
    """
    cls = load_trainer_class(name, extra_trainer_dirs)
    return TrainerTraits(
        name=name,
        task_kind=str(getattr(cls, "task_kind", "segmentation")),
        semi_supervised=any(c.__name__ == SEMI_SUPERVISED_BASE for c in cls.__mro__),
        module=cls.__module__,
        handles_missing_modalities=bool(getattr(cls, "handles_missing_modalities", False)),
    )
