"""``nnunet-ext configure cfcml``: validate the tabular sidecar and write the CFCML block into derived plans.

The network's embedding sizes, classes and image groups must be known to ``build_network_architecture``, which
nnU-Net's predictor calls with the plans only; so everything is resolved here (or, when a user trains
``CFCMLTrainer`` on plans without the block, by the trainer with the same function and no overrides) and stored
in the plans as ``plans["nnunet_ext"]["cfcml"] = {"schema": ..., "settings": ...}``. The trainer copies those
plans into the results folder, so prediction sees exactly what training used.

Side effects in ``nnUNet_preprocessed/<Dataset>/``: ``tabular.csv``/``tabular.json`` copied from the raw dataset
to ``tabular/<plans identifier>/`` with their sha256 recorded in the block (training never needs ``nnUNet_raw``,
and notices a raw table edited since; :mod:`nnunet_ext.cfcml.configured_table`) and a class-stratified
``splits_final.json`` unless one exists.
"""
from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nnunet_ext.cfcml.configured_table import TABLE_RECORD_KEY, write_configured_copy
from nnunet_ext.cfcml.prediction_table import TabularDataWarning
from nnunet_ext.cfcml.tabular import (
    TABULAR_CSV,
    TABULAR_JSON,
    TabularDataError,
    TabularSchema,
    TabularTable,
    image_groups_from_json,
    infer_schema,
    load_tabular_json,
    read_csv_rows,
)
from nnunet_ext.plans import derive_plans as derive_method_plans
from nnunet_ext.plans import merge_settings

#: Every setting and its default; ``None`` means "resolved automatically for the dataset" (documented per key).
DEFAULT_SETTINGS: dict[str, Any] = {
    "d": 128,                        # shared token width (CFCML 8c = 128)
    "heads": 4,                      # CIE attention heads
    "num_latents_image": None,       # L_img: 32 (2D) / 48 (3D)
    "num_latents_tabular": None,     # L_tab: 24 (2D) / 16 (3D)
    "max_tokens": 4096,              # stage maps with more positions are pooled before token compression
    "token_conv_kernel": 3,          # CFCML: 3 (mixes neighbouring feature channels); 1 = pure token mixing
    "tabular_embed_dim": 512,        # per-field embedding width (CFCML's CLIP width)
    "num_granularities": 4,          # last encoder stages used by MG-CIE
    "fusion": "cie",                 # "cie" (CFCML cross-attention) or "concat" (late fusion baseline)
    "modalities": "all",             # "all", "image" (image-only baseline) or "tabular" (tabular-only baseline)
    "dropout": 0.5,                  # both classifier dropouts
    "width_factor": 1.0,             # multiplies the plans' encoder widths
    "share_branch_encoders": None,   # auto: True when there are several 3-channel (RGB) image groups
    "image_groups": None,            # auto: tabular.json "image_groups", else one group of all channels
    "mask_free": None,               # auto: tabular.json "mask_free", else labels == {background, roi}
    "tau": 0.07,                     # HRM temperature
    "w_seg": None,                   # auto: 0 for mask-free datasets, else 1
    "w_sam": None,                   # auto: 0.04 (K = 2) / 0.06 (K >= 3), run.sh of the official code
    "w_up": None,                    # auto: 0.06 (K = 2) / 0.04 (K >= 3)
    "w_cp": None,                    # auto: 0.18 (K = 2) / 0.24 (K >= 3)
    "cross_modal_negatives": False,  # HRM ablation option (not in the original)
    "batch_size": None,              # auto: K * max(2, ceil(plans batch / K)) per configuration
    "num_epochs": 50,
    "initial_lr": 5e-4,
    "weight_decay": 1e-4,            # coupled L2 (Adam, as CFCML)
    "faithful_warmup": False,        # True: the original schedule whose first epoch runs at lr 0
    "cls_val_every": 1,              # classification validation every N epochs
    "crop": "center",                # "center" or "lesion" (centre the patch on the foreground bounding box)
    "force_split": False,            # overwrite an existing splits_final.json with a stratified one
    "split_seed": 12345,
}

HRM_WEIGHTS = {2: (0.04, 0.06, 0.18), 3: (0.06, 0.04, 0.24)}  # (w_sam, w_up, w_cp), official run.sh
CROP_CHOICES = ("center", "lesion")


def _image_identifiers(folder: str, file_ending: str) -> list[str]:
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    if not os.path.isdir(folder):
        return []
    return [str(i) for i in get_identifiers_from_splitted_dataset_folder(folder, file_ending)]


def preprocessed_identifiers(preprocessed_folder: str, plans: Mapping[str, Any]) -> list[str]:
    """Case identifiers of the first preprocessed configuration folder that exists."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    for config in plans.get("configurations", {}).values():
        folder = os.path.join(preprocessed_folder, config.get("data_identifier", ""))
        if config.get("data_identifier") and os.path.isdir(folder) and os.listdir(folder):
            return sorted(str(i) for i in infer_dataset_class(folder).get_identifiers(folder))
    return []


def locate_sidecars(preprocessed_folder: str, raw_folder: str | None) -> tuple[str, str | None]:
    """Paths of ``tabular.csv`` and (optional) ``tabular.json``: the raw dataset wins over the preprocessed copy."""
    for folder in (raw_folder, preprocessed_folder):
        if folder and os.path.isfile(os.path.join(folder, TABULAR_CSV)):
            json_path = os.path.join(folder, TABULAR_JSON)
            return os.path.join(folder, TABULAR_CSV), json_path if os.path.isfile(json_path) else None
    places = [p for p in (raw_folder, preprocessed_folder) if p]
    raise FileNotFoundError(f"no {TABULAR_CSV} found in {places}: a CFCML dataset needs a tabular.csv with columns "
                            f"case_id, label and features in its raw dataset folder")


def raw_dataset_folder(plans: Mapping[str, Any]) -> str | None:
    """``nnUNet_raw/<dataset_name>`` if it exists (it is optional for training)."""
    from nnunetv2.paths import nnUNet_raw

    if not nnUNet_raw:
        return None
    folder = os.path.join(str(nnUNet_raw), plans["dataset_name"])
    return folder if os.path.isdir(folder) else None


def resolved_batch_size(plans_batch_size: int, num_classes: int, override: int | None = None) -> int:
    """A batch size that is a multiple of K and at least 2K (every class twice per batch).

    Raises:
        ValueError: an override that is not a positive multiple of K or smaller than 2K.
    """
    if override is not None:
        if override < 2 * num_classes or override % num_classes:
            raise ValueError(f"batch_size {override} must be a multiple of the number of classes ({num_classes}) "
                             f"and at least {2 * num_classes}")
        return int(override)
    return num_classes * max(2, math.ceil(plans_batch_size / num_classes))


def write_stratified_splits(preprocessed_folder: str, table: TabularTable, identifiers: Sequence[str],
                            n_splits: int = 5, seed: int = 12345, overwrite: bool = False) -> str:
    """Class-stratified ``splits_final.json`` over ``identifiers`` (nnU-Net's default split is not stratified).

    An existing file is kept unless ``overwrite``. Returns its path.
    """
    from sklearn.model_selection import StratifiedKFold

    path = os.path.join(preprocessed_folder, "splits_final.json")
    if os.path.isfile(path) and not overwrite:
        return path
    identifiers = sorted(identifiers)
    labels = table.labels(identifiers).numpy()
    if len(identifiers) < n_splits:
        raise TabularDataError(f"{len(identifiers)} training cases cannot be split into {n_splits} folds")
    classes, counts = np.unique(labels, return_counts=True)
    too_few = {table.schema.classes[int(c)]: int(n) for c, n in zip(classes, counts) if n < n_splits}
    if too_few:
        described = ", ".join(f"{name!r} has {n}" for name, n in too_few.items())
        if len(too_few) == len(classes):  # sklearn's StratifiedKFold cannot split at all
            raise TabularDataError(
                f"a stratified {n_splits}-fold split needs at least {n_splits} training cases in some class; "
                f"{described}. Add cases, or write your own {path} before running configure (an existing split "
                f"is kept)")
        warnings.warn(f"fewer training cases than {n_splits} folds: {described}; some validation folds have no "
                      f"case of these classes (their per-fold macro AUC leaves them out)", TabularDataWarning)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    splits = [{"train": [identifiers[i] for i in tr], "val": [identifiers[i] for i in va]}
              for tr, va in folds.split(identifiers, labels)]
    with open(path, "w") as f:
        json.dump(splits, f, indent=4)
    return path


def resolve_cfcml_block(plans: Mapping[str, Any], settings: Mapping[str, Any], preprocessed_folder: str,
                        raw_folder: str | None = None, write_files: bool = True,
                        plans_name: str | None = None) -> tuple[dict, dict[str, int]]:
    """Validate the sidecar and resolve every setting for this dataset.

    Args:
        plans: the source plans (not modified).
        settings: user overrides of :data:`DEFAULT_SETTINGS`.
        preprocessed_folder: ``nnUNet_preprocessed/<Dataset>``.
        raw_folder: ``nnUNet_raw/<Dataset>`` (optional; enables the "row without an image" check).
        write_files: copy the sidecars to ``tabular/<plans_name>/`` next to the preprocessed data (recorded in
            the block) and write a stratified split.
        plans_name: identifier of the plans that will carry the block (default: ``plans["plans_name"]``, i.e.
            the trainer resolving its own plans).

    Returns:
        ``(block, batch sizes per configuration)``.

    Raises:
        TabularDataError: bad sidecar (missing row, unlabelled training case, unknown label, empty column, fewer
            than two classes, a class without training cases, a row without an image, bad image groups).
        KeyError: an unknown setting.
    """
    resolved = merge_settings(DEFAULT_SETTINGS, settings, "the cfcml settings")
    with open(os.path.join(preprocessed_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    csv_path, json_path = locate_sidecars(preprocessed_folder, raw_folder)
    overrides = load_tabular_json(json_path)
    header, rows = read_csv_rows(csv_path)

    file_ending = dataset_json.get("file_ending", ".nii.gz")
    training_ids = _image_identifiers(os.path.join(raw_folder, "imagesTr"), file_ending) if raw_folder else []
    if not training_ids:
        training_ids = preprocessed_identifiers(preprocessed_folder, plans)
    if not training_ids:
        raise FileNotFoundError(f"no training cases found (neither nnUNet_raw imagesTr nor preprocessed data in "
                                f"{preprocessed_folder}); run nnU-Net's planning and preprocessing first")
    schema = infer_schema(header, rows, training_ids, overrides, where=csv_path)
    table = TabularTable(schema, rows, csv_path)
    table.require(training_ids, labelled=True)
    counts = {c: 0 for c in schema.classes}
    for case in training_ids:
        counts[schema.classes[table.rows[case].label]] += 1
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise TabularDataError(f"{csv_path}: class(es) {empty} have no training case (class counts {counts})")
    if raw_folder:
        with_images = set(training_ids)
        for sub in ("imagesTs", "imagesUnlabeled"):
            with_images |= set(_image_identifiers(os.path.join(raw_folder, sub), file_ending))
        orphans = sorted(set(table.rows) - with_images)
        if orphans:
            raise TabularDataError(f"{csv_path}: row(s) {orphans[:20]} have no image in imagesTr, imagesTs or "
                                   f"imagesUnlabeled of {raw_folder}")

    num_channels = len(dataset_json["channel_names"])
    groups = resolved["image_groups"]
    groups = image_groups_from_json({"image_groups": groups} if groups is not None else overrides, num_channels)
    if resolved["share_branch_encoders"] is None:
        resolved["share_branch_encoders"] = len(groups) > 1 and all(len(g) == 3 for g in groups)
    if resolved["mask_free"] is None:
        labels = {k for k in dataset_json["labels"] if k != "background"}
        resolved["mask_free"] = bool(overrides.get("mask_free", labels == {"roi"}))
    if resolved["w_seg"] is None:
        resolved["w_seg"] = 0.0 if resolved["mask_free"] else 1.0
    defaults = HRM_WEIGHTS[min(schema.num_classes, 3)]
    for key, value in zip(("w_sam", "w_up", "w_cp"), defaults):
        if resolved[key] is None:
            resolved[key] = value
    if resolved["crop"] not in CROP_CHOICES:
        raise ValueError(f"crop must be one of {CROP_CHOICES}, got {resolved['crop']!r}")
    resolved["image_groups"] = groups

    batch_sizes = {name: resolved_batch_size(config["batch_size"], schema.num_classes, resolved["batch_size"])
                   for name, config in plans.get("configurations", {}).items() if "batch_size" in config}
    block = {"schema": schema.to_dict(), "settings": resolved, "class_counts": counts}
    if write_files:
        source_plans = plans.get("plans_name")
        plans_name = plans_name or source_plans
        block[TABLE_RECORD_KEY] = write_configured_copy(preprocessed_folder, plans_name, csv_path, json_path,
                                                        source_plans if source_plans != plans_name else None)
        write_stratified_splits(preprocessed_folder, table, training_ids, seed=resolved["split_seed"],
                                overwrite=resolved["force_split"])
    return block, batch_sizes


def apply_block(plans: dict, block: Mapping[str, Any], batch_sizes: Mapping[str, int]) -> None:
    """Put ``block`` into ``plans`` (in place) and set each configuration's batch size."""
    plans.setdefault("nnunet_ext", {"version": 1})["cfcml"] = copy.deepcopy(dict(block))
    for name, batch_size in batch_sizes.items():
        plans["configurations"][name]["batch_size"] = batch_size


def derive_plans(plans: dict, target_identifier: str, settings: Mapping[str, Any],
                 preprocessed_dataset_folder: str) -> dict:
    """Hook of ``nnunet-ext configure cfcml`` (see :mod:`nnunet_ext.plans`)."""
    block, batch_sizes = resolve_cfcml_block(plans, settings, preprocessed_dataset_folder, raw_dataset_folder(plans),
                                             plans_name=target_identifier)
    derived = derive_method_plans(plans, target_identifier, "cfcml", block)
    apply_block(derived, block, batch_sizes)
    return derived


def schema_from_block(block: Mapping[str, Any]) -> TabularSchema:
    return TabularSchema.from_dict(block["schema"])
