"""Up-front checks of the inputs every command shares: nnU-Net folders, datasets, plans, model folders, files.

Each check raises :class:`~nnunet_ext.errors.InputError` naming the variable, folder or file and what was expected,
so a command stops before it does any work with one line (``nnunet-ext <command>: error: ...``, exit 2). They exist
because nnU-Net's own look-ups fail late or with multi-line messages (``convert_id_to_dataset_name`` raises a
RuntimeError listing every folder variable; an unset folder variable surfaces as ``None`` deep inside a run).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from typing import Any

from nnunet_ext.errors import InputError

#: nnU-Net's folder variables (documentation/setting_up_paths.md).
NNUNET_FOLDER_VARIABLES: tuple[str, ...] = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")

#: What puts a dataset into each folder, for the error message when it is not there.
_HOW_TO_FILL = {"nnUNet_raw": "convert it first (nnunet-ext convert, or nnU-Net's dataset format)",
                "nnUNet_preprocessed": "plan it first (nnunet-ext plan -d ID)",
                "nnUNet_results": "train a model first (nnUNetv2_train)"}


def require_nnunet_folder(variable: str) -> str:
    """The folder an nnU-Net path variable names (read now, not at import time).

    Raises:
        InputError: the variable is unset or empty.
    """
    # existence is checked where a dataset folder is required: nnU-Net creates nnUNet_preprocessed/results itself
    value = os.environ.get(variable)
    if not value:
        raise InputError(f"environment variable {variable} is not set; set nnUNet_raw, nnUNet_preprocessed and "
                         f"nnUNet_results (nnU-Net's documentation/setting_up_paths.md)")
    return value


def dataset_name(dataset: str | int) -> str:
    """``DatasetXXX_Name`` for a dataset ID or name, found like nnU-Net does (raw, preprocessed, results folders).

    Raises:
        InputError: not an ID or ``Dataset...`` name, no folder with that ID, or two names for one ID.
    """
    from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets

    text = str(dataset)
    if text.startswith("Dataset"):
        return text
    try:
        dataset_id = int(text)
    except ValueError:
        raise InputError(f"dataset {text!r}: expected a dataset ID (e.g. 990) or a name DatasetXXX_Name") from None
    candidates = [str(name) for name in find_candidate_datasets(dataset_id)]
    if not candidates:
        folders = ", ".join(f"{var}={os.environ.get(var) or 'NOT SET'}" for var in NNUNET_FOLDER_VARIABLES)
        raise InputError(f"dataset {dataset_id}: no folder Dataset{dataset_id:03d}_* in {folders}")
    if len(candidates) > 1:
        raise InputError(f"dataset {dataset_id}: several names {candidates} share this ID across nnUNet_raw, "
                         f"nnUNet_preprocessed and nnUNet_results; rename or remove all but one")
    return candidates[0]


def require_dataset(dataset: str | int, variable: str) -> str:
    """The folder ``$variable/DatasetXXX_Name`` of ``dataset`` (ID or name), which must exist.

    Raises:
        InputError: ``variable`` unset, or the dataset is unknown or has no folder there.
    """
    base = require_nnunet_folder(variable)
    name = dataset_name(dataset)
    folder = os.path.join(base, name)
    if not os.path.isdir(folder):
        raise InputError(f"dataset {dataset}: {folder} does not exist; {_HOW_TO_FILL.get(variable, variable)}")
    return folder


def load_json_file(path: str | os.PathLike, what: str) -> Any:
    """The parsed content of the JSON file ``path``; ``what`` says what the file is for (e.g. ``"--config file"``).

    Raises:
        InputError: the file does not exist or is not valid JSON (with line and column of the error).
    """
    if not os.path.isfile(path):
        raise InputError(f"{what} {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise InputError(f"{what} {path} is not valid JSON: {error.msg} at line {error.lineno} column "
                         f"{error.colno}") from None
    except UnicodeDecodeError as error:
        raise InputError(f"{what} {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def require_plans(preprocessed_dataset_folder: str, plans_identifier: str,
                  configurations: Sequence[str] = ()) -> dict:
    """The plans ``<preprocessed_dataset_folder>/<plans_identifier>.json``, holding every requested configuration.

    Raises:
        InputError: the plans file is missing or invalid, or lacks a configuration (the message lists the
            available ones).
    """
    path = os.path.join(preprocessed_dataset_folder, plans_identifier + ".json")
    if not os.path.isfile(path):
        raise InputError(f"plans file {path} not found; plan the dataset first (nnunet-ext plan -d ID, or the "
                         f"planner that writes '{plans_identifier}')")
    plans = load_json_file(path, "plans file")
    available = sorted(plans.get("configurations", {})) if isinstance(plans, dict) else []
    unknown = [c for c in configurations if c not in available]
    if unknown:
        raise InputError(f"configuration(s) {unknown} not in plans file {path}; available: {available}")
    return plans


def require_model_folder(dataset: str | int, trainer: str, plans_identifier: str, configuration: str,
                         folds: Sequence[int | str] | None, checkpoint_name: str) -> str:
    """``nnUNet_results/<Dataset>/<trainer>__<plans>__<configuration>``, with ``checkpoint_name`` in every fold.

    ``folds=None`` means the folds nnU-Net's predictor detects (``fold_N`` folders holding the checkpoint), at
    least one.

    Raises:
        InputError: ``nnUNet_results`` unset, no such model folder, no fold, or a fold without the checkpoint.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    require_nnunet_folder("nnUNet_results")
    folder = get_output_folder(dataset_name(dataset), trainer, plans_identifier, configuration)
    if not os.path.isdir(folder):
        raise InputError(f"no trained model in {folder} (check -d, -c, -tr and -p)")
    for required in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(folder, required)):
            raise InputError(f"{os.path.join(folder, required)} not found; is {folder} a complete training output?")
    if folds is None:
        with contextlib.redirect_stdout(io.StringIO()):  # the detection prints what it finds
            folds = nnUNetPredictor.auto_detect_available_folds(folder, checkpoint_name)
        if not folds:
            raise InputError(f"{folder} holds no fold_N folder with {checkpoint_name}; train a fold first, or pick "
                             f"the checkpoint with -chk")
    missing = [os.path.join(folder, f"fold_{fold}", checkpoint_name) for fold in folds
               if not os.path.isfile(os.path.join(folder, f"fold_{fold}", checkpoint_name))]
    if missing:
        raise InputError(f"checkpoint(s) {missing} not found (check -f and -chk)")
    return folder


def require_input_folder(path: str | os.PathLike, option: str) -> str:
    """``path`` as a string; it must be an existing folder (``option`` names the argument, e.g. ``"-i"``)."""
    if not os.path.isdir(path):
        raise InputError(f"{option} {path}: folder not found")
    return str(path)


def require_input_file(path: str | os.PathLike, option: str) -> str:
    """``path`` as a string; it must be an existing file (``option`` names the argument or the file's role)."""
    if not os.path.isfile(path):
        raise InputError(f"{option} {path}: file not found")
    return str(path)


def require_new_file(path: str | os.PathLike, option: str) -> str:
    """``path`` as a string; it must not exist yet (outputs never overwrite user data)."""
    if os.path.exists(path):
        raise InputError(f"{option} {path} exists; choose another output file (it is never overwritten)")
    return str(path)
