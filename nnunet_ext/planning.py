"""Plan and preprocess a dataset with a planner from this package or from nnU-Net.

``nnUNetv2_plan_and_preprocess -pl NAME`` looks planners up only inside the installed ``nnunetv2`` tree, so it
cannot see the planners shipped in ``nnunet_ext_planners`` (the repository folder ``planners/``). This module
resolves the planner class by name itself and drives nnU-Net's Python API
(``nnunetv2.experiment_planning.plan_and_preprocess_api``) with the class object.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from os.path import isfile, join

from nnunet_ext.errors import InputError
from nnunet_ext.inputs import require_dataset, require_nnunet_folder

#: Configurations preprocessed when none are given; the same default as ``nnUNetv2_plan_and_preprocess``.
#: Configurations that the planner did not create (e.g. ``3d_lowres`` for small images) are skipped by nnU-Net.
DEFAULT_CONFIGURATIONS: tuple[str, ...] = ("2d", "3d_fullres", "3d_lowres")

_PLANNERS_PACKAGE = "nnunet_ext_planners"


def _is_planner_class(obj: object) -> bool:
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    return inspect.isclass(obj) and issubclass(obj, ExperimentPlanner)


def _iter_package_planner_modules() -> Iterator[object]:
    """Yields every module of ``nnunet_ext_planners``; import errors propagate so broken planners are noticed."""
    package = importlib.import_module(_PLANNERS_PACKAGE)
    for module_info in pkgutil.walk_packages(package.__path__, prefix=f"{_PLANNERS_PACKAGE}."):
        yield importlib.import_module(module_info.name)


def _iter_nnunet_planner_modules() -> Iterator[object]:
    """Yields the modules of ``nnunetv2.experiment_planning``, the tree that nnU-Net's ``-pl`` searches."""
    import nnunetv2.experiment_planning as nnunet_planning

    for module_info in pkgutil.walk_packages(nnunet_planning.__path__, prefix="nnunetv2.experiment_planning."):
        yield importlib.import_module(module_info.name)


def _planner_names_defined_in(modules: Iterator[object]) -> set[str]:
    # Only classes defined in the module itself: every planner module also imports ExperimentPlanner.
    return {
        name
        for module in modules
        for name, obj in vars(module).items()
        if _is_planner_class(obj) and obj.__module__ == module.__name__
    }


def available_planners() -> list[str]:
    """Names accepted by :func:`plan_dataset`.

    Returns:
        The planner class names of this package (``nnunet_ext_planners``) followed by those of nnU-Net
        (``nnunetv2.experiment_planning``), each group sorted.
    """
    ours = _planner_names_defined_in(_iter_package_planner_modules())
    nnunet = _planner_names_defined_in(_iter_nnunet_planner_modules()) - ours
    return sorted(ours) + sorted(nnunet)


def find_planner_class(name: str) -> type:
    """Resolves a planner class by name, this package first, then nnU-Net.

    Args:
        name: Class name, e.g. ``"CPUPlanner"``, ``"ExperimentPlanner"`` or ``"nnUNetPlannerResEncM"``.

    Returns:
        The planner class (a subclass of nnU-Net's ``ExperimentPlanner``).

    Raises:
        InputError: If no planner of that name exists; the message lists the available names.
    """
    for module in _iter_package_planner_modules():
        candidate = getattr(module, name, None)
        if _is_planner_class(candidate):
            return candidate

    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    # The same lookup nnUNetv2_plan_and_preprocess uses for -pl, so nnU-Net's planner names behave identically.
    candidate = recursive_find_python_class(join(nnunetv2.__path__[0], "experiment_planning"), name,
                                            current_module="nnunetv2.experiment_planning")
    if _is_planner_class(candidate):
        return candidate
    raise InputError(f"Unknown planner {name!r}. Available planners: {', '.join(available_planners())}")


@contextmanager
def _positive_n_proc_da() -> Iterator[None]:
    """Temporarily replaces a non-positive ``nnUNet_n_proc_DA`` by 1.

    nnU-Net 2.8.1 calls ``torch.set_num_threads(get_allowed_n_proc_DA())`` in its memory estimate, so the
    ``nnUNet_n_proc_DA=0`` recommended for CPU training makes planning fail with "set_num_threads expects a
    positive integer". Planning does not use data-augmentation workers, so any positive value is equivalent.
    """
    variable = "nnUNet_n_proc_DA"
    original = os.environ.get(variable)
    if original is None:
        yield
        return
    try:
        value = int(original)
    except ValueError as error:
        raise InputError(f"{variable} must be an integer, got {original!r}") from error
    if value > 0:
        yield
        return
    os.environ[variable] = "1"
    try:
        yield
    finally:
        os.environ[variable] = original


def plan_dataset(dataset_id: int, planner: str = "CPUPlanner", configurations: Sequence[str] | None = None,
                 gpu_memory_target_in_gb: float | None = None, overwrite_plans_name: str | None = None,
                 num_processes: int = 2, preprocess: bool = True, verify_dataset_integrity: bool = True,
                 verbose: bool = False, overwrite_fingerprint: bool = False,
                 overwrite_target_spacing: Sequence[float] | None = None) -> str:
    """Fingerprints, plans and (optionally) preprocesses a dataset with a planner chosen by name.

    Equivalent to ``nnUNetv2_plan_and_preprocess -d ID -pl PLANNER`` but ``planner`` may also name a planner of
    this package (e.g. ``CPUPlanner``). Reads ``nnUNet_raw`` and writes ``nnUNet_preprocessed``.

    Args:
        dataset_id: nnU-Net dataset id (``DatasetXXX_Name`` in ``nnUNet_raw``).
        planner: Planner class name; see :func:`available_planners`.
        configurations: Configurations to preprocess; ``None`` means ``2d``, ``3d_fullres`` and ``3d_lowres``
            (those the planner did not create are skipped).
        gpu_memory_target_in_gb: Passed to the planner; ``None`` keeps the planner's default.
        overwrite_plans_name: Plans identifier to write instead of the planner's default.
        num_processes: Worker processes for fingerprinting, integrity check and preprocessing.
        preprocess: Preprocess after planning; ``False`` only writes the plans file.
        verify_dataset_integrity: Run nnU-Net's dataset integrity check first.
        verbose: Let nnU-Net print per-case details.
        overwrite_fingerprint: Recompute ``dataset_fingerprint.json`` even if it exists.
        overwrite_target_spacing: Target spacing in mm, in the axis order of nnU-Net's arrays (before the planner's
            transposition), instead of the one nnU-Net derives from the fingerprint, e.g. a coarser one for CPU
            plans; nnU-Net 2.8.1 uses its in-plane part for ``2d`` too. Use it with ``overwrite_plans_name`` so the
            default plans are not replaced.

    Returns:
        The plans identifier, i.e. the value for ``nnUNetv2_train -p``.

    Raises:
        InputError: before any work, if the planner name is unknown, ``nnUNet_raw`` or ``nnUNet_preprocessed`` is
            not set, the dataset is not in ``nnUNet_raw``, the target spacing is invalid or ``nnUNet_n_proc_DA``
            is not an integer.
    """
    planner_class = find_planner_class(planner)
    target_spacing = None
    if overwrite_target_spacing is not None:
        target_spacing = [float(value) for value in overwrite_target_spacing]
        if len(target_spacing) != 3 or min(target_spacing) <= 0:
            raise InputError(f"overwrite_target_spacing must be three positive spacings (z, y, x in mm), "
                             f"got {list(overwrite_target_spacing)}")
    require_nnunet_folder("nnUNet_preprocessed")
    require_dataset(dataset_id, "nnUNet_raw")

    from nnunetv2.experiment_planning import plan_and_preprocess_api
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity as verify
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    with _positive_n_proc_da():
        dataset_name = convert_id_to_dataset_name(dataset_id)
        if verify_dataset_integrity:
            verify(join(os.environ["nnUNet_raw"], dataset_name), num_processes)
        fingerprint_file = join(os.environ["nnUNet_preprocessed"], dataset_name, "dataset_fingerprint.json")
        if overwrite_fingerprint or not isfile(fingerprint_file):
            plan_and_preprocess_api.extract_fingerprint_dataset(
                dataset_id, num_processes=num_processes, check_dataset_integrity=False, clean=True, verbose=verbose)
        _, plans_identifier = plan_and_preprocess_api.plan_experiment_dataset(
            dataset_id, experiment_planner_class=planner_class, gpu_memory_target_in_gb=gpu_memory_target_in_gb,
            overwrite_target_spacing=target_spacing, overwrite_plans_name=overwrite_plans_name)
        if preprocess:
            configurations = list(DEFAULT_CONFIGURATIONS if configurations is None else configurations)
            # nnU-Net's preprocess_dataset wants one process count per configuration, not a bare int.
            plan_and_preprocess_api.preprocess_dataset(dataset_id, plans_identifier, configurations,
                                                       [num_processes] * len(configurations), verbose=verbose)
    return plans_identifier
