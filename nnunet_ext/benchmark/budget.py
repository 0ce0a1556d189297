"""Training budgets (and seeds) as generated trainer subclasses.

nnU-Net has no command-line option for the number of epochs or iterations; its convention is a subclass per
budget (``nnUNetTrainer_5epochs``). For a user-chosen budget we write such subclasses into a folder that is
added to ``nnUNet_extTrainer``, so training and prediction still go through the stock CLI and the checkpoint's
``trainer_name`` says which budget (and seed) produced it.

Names: ``<Trainer>_e{E}i{I}`` (demo) and ``<Trainer>_e{E}i{I}s{S}`` (benchmark run with seed ``S``).
"""
from __future__ import annotations

import ast
import importlib.util
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunet_ext.discovery import shipped_trainers
from nnunet_ext.errors import InputError

BUDGET_MODULE = "nnunet_ext_budget_trainers.py"
STOCK_TRAINER = "nnUNetTrainer"


@dataclass(frozen=True)
class Budget:
    """Epochs x training iterations per epoch (and validation iterations per epoch) of every run.

    Raises:
        ValueError: a non-positive number.
    """

    epochs: int
    iterations: int
    val_iterations: int = 5

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.iterations < 1 or self.val_iterations < 1:
            raise InputError(f"budget must be positive, got epochs={self.epochs}, iterations={self.iterations}, "
                             f"val_iterations={self.val_iterations}")


def budget_trainer_name(trainer: str, epochs: int, iterations: int, seed: int | None = None) -> str:
    """Name of ``trainer`` with the given budget, e.g. ``nnUNetTrainer_e3i25`` or, with a seed, ``..._e3i25s1``."""
    name = f"{trainer}_e{epochs}i{iterations}"
    return name if seed is None else f"{name}s{seed}"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (network initialisation, nnU-Net's case sampling and
    augmentation in the main process all draw from these)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_trainer_from_file(class_name: str, path: str) -> type:
    """Import a trainer class from a file outside any package (a user's ``nnUNet_extTrainer`` folder).

    The module is registered under a private name so nnU-Net's lookup (which evicts the modules of the folder it
    searches) never sees a half-imported copy.
    """
    module_name = f"_nnunet_ext_budget_source_{Path(path).stem}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
    return getattr(module, class_name)


def _classes_in_folder(folder: Path) -> dict[str, Path]:
    """``{class name: file}`` for the top-level ``*.py`` files of a trainer folder, read without importing."""
    classes = {}
    for path in sorted(Path(folder).glob("*.py")):
        if path.name == "__init__.py" or path.name == BUDGET_MODULE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        classes.update({node.name: path.resolve() for node in tree.body if isinstance(node, ast.ClassDef)})
    return classes


def _builtin_trainer_module(trainer: str) -> str | None:
    """Module of a trainer shipped with nnU-Net (e.g. ``nnUNetTrainerNoDA``), or None."""
    import os

    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), trainer,
                                      "nnunetv2.training.nnUNetTrainer", nnunetv2.__path__[0])
    return None if cls is None else cls.__module__


def trainer_import_lines(trainers: Sequence[str], extra_trainer_dirs: Sequence[str | Path] = ()) -> list[str]:
    """Import statements that make every trainer name available in a generated module.

    Looked up in this order: stock ``nnUNetTrainer``, trainers shipped by nnunet-ext (absolute import from the
    installed ``nnunet_ext_trainers`` package), classes in ``extra_trainer_dirs`` (imported from their file),
    trainers shipped with nnU-Net.

    Raises:
        ValueError: a trainer found nowhere.
    """
    shipped = shipped_trainers()
    extra: dict[str, Path] = {}
    for folder in reversed([Path(d) for d in extra_trainer_dirs]):  # the first folder wins, as in nnU-Net
        extra.update(_classes_in_folder(folder))
    lines = []
    for trainer in dict.fromkeys(trainers):
        if trainer == STOCK_TRAINER:
            lines.append(f"from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import {STOCK_TRAINER}")
        elif trainer in shipped:
            lines.append(f"from nnunet_ext_trainers.{shipped[trainer]} import {trainer}")
        elif trainer in extra:
            lines.append(f"{trainer} = load_trainer_from_file({trainer!r}, {str(extra[trainer])!r})")
        else:
            module = _builtin_trainer_module(trainer)
            if module is None:
                raise InputError(f"unknown trainer {trainer!r}; known: {STOCK_TRAINER} and nnU-Net's trainers, "
                                 f"{sorted(shipped)}" + (f", {sorted(extra)}" if extra else ""))
            lines.append(f"from {module} import {trainer}")
    return lines


def _class_lines(name: str, base: str, budget: Budget, seed: int | None, skip_final_validation: bool,
                 class_attributes: Mapping[str, object] | None = None) -> list[str]:
    doc = f"{base} for {budget.epochs} epochs x {budget.iterations} iterations" + \
        ("." if seed is None else f", seed {seed}.")
    lines = [
        "", "",
        f"class {name}({base}):",
        f'    """{doc}"""',
        "",
    ]
    if class_attributes:
        lines += [*(f"    {attribute} = {value!r}" for attribute, value in class_attributes.items()), ""]
    lines += [
        # nnU-Net records __init__'s named arguments in every checkpoint: keep the exact signature
        "    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):",
    ]
    if seed is not None:
        # before anything random happens: network initialisation (initialize), case sampling and augmentation
        lines.append(f"        seed_everything({seed})")
    lines += [
        "        super().__init__(plans, configuration, fold, dataset_json, device)",
        f"        self.num_epochs = {budget.epochs}",
        f"        self.num_iterations_per_epoch = {budget.iterations}",
        f"        self.num_val_iterations_per_epoch = {budget.val_iterations}",
    ]
    if skip_final_validation:
        lines += [
            "",
            "    def perform_actual_validation(self, save_probabilities: bool = False):",
            "        # the benchmark evaluates the held-out test split instead (nnunet-ext benchmark)",
            '        self.print_to_log_file("nnunet-ext benchmark: final validation skipped; the test split is '
            'evaluated instead")',
        ]
    return lines


def _write_module(folder: str | Path, import_lines: list[str], class_blocks: list[list[str]]) -> None:
    lines = ['"""Generated by nnunet-ext: training budgets for a benchmark run. Do not edit."""',
             "import torch",
             "from nnunet_ext.benchmark.budget import load_trainer_from_file, seed_everything  # noqa: F401",
             *import_lines]
    for block in class_blocks:
        lines += block
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BUDGET_MODULE).write_text("\n".join(lines) + "\n")


def write_budget_trainers(folder: str | Path, trainers: list[str], epochs: int, iterations: int,
                          val_iterations: int = 5, skip_final_validation: bool = False) -> dict[str, str]:
    """Write one budget subclass per trainer into ``folder``; returns ``{trainer: budget trainer name}``.

    ``trainers`` are ``nnUNetTrainer``, trainers shipped by nnunet-ext or by nnU-Net. ``skip_final_validation``
    replaces nnU-Net's prediction of the validation cases after training (for callers that evaluate a test split).

    Raises:
        ValueError: for an unknown trainer or a non-positive budget (nothing is written then).
    """
    budget = Budget(epochs, iterations, val_iterations)
    imports = trainer_import_lines(trainers)
    names = {trainer: budget_trainer_name(trainer, epochs, iterations) for trainer in trainers}
    _write_module(folder, imports, [_class_lines(names[t], t, budget, None, skip_final_validation)
                                       for t in names])
    return names


def write_benchmark_trainers(folder: str | Path, trainers: Sequence[str], budget: Budget, seeds: Sequence[int],
                             skip_final_validation: bool = True, extra_trainer_dirs: Sequence[str | Path] = (),
                             class_attributes: Mapping[str, object] | None = None,
                             further_budgets: Sequence[tuple[str, Budget, int]] = ()) -> dict[tuple[str, int], str]:
    """Write one subclass per (trainer, seed) with the budget, seeding in ``__init__``.

    Args:
        folder: where ``nnunet_ext_budget_trainers.py`` is written (replaced: it is generated).
        trainers: trainer class names (see :func:`trainer_import_lines`).
        budget: epochs and iterations of every run.
        seeds: one class per seed; the seed is part of the class name, hence of the nnU-Net results folder.
        skip_final_validation: replace nnU-Net's final validation (prediction of the validation cases, with fold
            ``all`` every training case) by a log line, because the benchmark evaluates the test split.
        extra_trainer_dirs: further folders with trainer files (e.g. the user's own ``nnUNet_extTrainer``).
        class_attributes: class attributes every generated class sets (``{name: literal value}``), e.g.
            ``{"segmentation_validation": False}`` for classification trainers.
        further_budgets: further ``(trainer, budget, seed)`` classes with their own budget, named
            ``<trainer>_e{E}i{I}s{S}`` like the others (e.g. the equal-time stock runs); a name that is already
            among the classes above is written once.

    Returns:
        ``{(trainer, seed): generated class name}``.

    Raises:
        ValueError: unknown trainer, non-integer or duplicate seed (nothing is written then).
    """
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise InputError(f"seeds must be distinct non-negative integers, got {list(seeds)}")
    imports = trainer_import_lines([*trainers, *(t for t, _, _ in further_budgets)], extra_trainer_dirs)
    names = {(t, s): budget_trainer_name(t, budget.epochs, budget.iterations, s)
             for t in dict.fromkeys(trainers) for s in seeds}
    blocks = {name: _class_lines(name, t, budget, s, skip_final_validation, class_attributes)
              for (t, s), name in names.items()}
    for trainer, further, seed in further_budgets:
        name = budget_trainer_name(trainer, further.epochs, further.iterations, seed)
        if name not in blocks:
            blocks[name] = _class_lines(name, trainer, further, seed, skip_final_validation, class_attributes)
    _write_module(folder, imports, list(blocks.values()))
    return names
