"""Test-split evaluation: nnU-Net's Dice per class plus surface distances (HD95, ASD) in mm from MedPy.

Dice (and IoU, TP/FP/FN) come from nnU-Net's own per-case function
(``nnunetv2.evaluation.evaluate_predictions.compute_metrics``), so they equal what ``nnUNetv2_evaluate_folder``
reports, including the ignore label and region-based training. Surface distances come from MedPy
(``medpy.metric.binary.hd95`` / ``asd``) with the image's voxel spacing, i.e. in mm.

Empty masks, where MedPy raises, follow one explicit convention (also in the report):

========================  ======  ======
reference / prediction    HD95    ASD
========================  ======  ======
both empty                NaN     NaN      (nothing to measure; nnU-Net's Dice is NaN too)
exactly one empty         inf     inf      (a missed or a hallucinated structure)
both non-empty            MedPy   MedPy
========================  ======  ======

Means over cases use the finite values only and count the NaN and inf cases separately.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DISTANCE_METRICS = ("HD95", "ASD")


def _check_masks(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None) -> None:
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    if prediction.ndim not in (2, 3):
        raise ValueError(f"expected 2D or 3D masks, got {prediction.ndim} dimensions")
    if spacing is not None:
        if len(spacing) != prediction.ndim:
            raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} entries for {prediction.ndim}D masks")
        if any(not (s > 0) for s in spacing):
            raise ValueError(f"spacing must be positive, got {tuple(spacing)}")


def surface_distances(prediction: np.ndarray, reference: np.ndarray,
                      spacing: Sequence[float] | None = None) -> dict[str, float]:
    """95th-percentile Hausdorff distance and average (symmetric) surface distance of two binary masks.

    HD95 is MedPy's ``hd95``: the 95th percentile of the union of both directed surface-distance sets;
    ASD is MedPy's ``asd`` (mean surface distance from prediction to reference). See the module docstring for
    empty masks.

    Args:
        prediction: binary mask, shape ``[X, Y]`` or ``[X, Y, Z]`` (any array order; spacing in the same order).
        reference: binary mask of the same shape.
        spacing: voxel size per axis in mm (``None``: 1 per axis, i.e. voxel units).

    Returns:
        ``{"HD95": float, "ASD": float}`` (NaN, inf or a finite distance).

    Raises:
        ValueError: shapes differ, not 2D/3D, or a bad spacing.
    """
    from medpy.metric import binary

    prediction, reference = np.asarray(prediction).astype(bool), np.asarray(reference).astype(bool)
    _check_masks(prediction, reference, spacing)
    has_pred, has_ref = bool(prediction.any()), bool(reference.any())
    if not has_pred and not has_ref:
        return {"HD95": math.nan, "ASD": math.nan}
    if has_pred != has_ref:
        return {"HD95": math.inf, "ASD": math.inf}
    voxelspacing = None if spacing is None else tuple(float(s) for s in spacing)
    return {"HD95": float(binary.hd95(prediction, reference, voxelspacing=voxelspacing)),
            "ASD": float(binary.asd(prediction, reference, voxelspacing=voxelspacing))}


def summarise_values(values: Sequence[float]) -> dict[str, float | int]:
    """Mean over the finite values, plus how many were NaN or inf (see the module docstring).

    Returns:
        ``{"mean": float (NaN if no finite value, inf if all non-NaN values are inf), "n_finite", "n_nan",
        "n_inf"}``.
    """
    array = np.asarray(list(values), dtype=float)
    finite = array[np.isfinite(array)]
    n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    if finite.size:
        mean = float(finite.mean())
    else:
        mean = math.inf if n_inf else math.nan
    return {"mean": mean, "n_finite": int(finite.size), "n_nan": n_nan, "n_inf": n_inf}


def _plain(label_or_region) -> int | tuple[int, ...]:
    """A label as ``int`` or a region as a tuple of ``int`` (nnU-Net's label manager hands out NumPy integers)."""
    if isinstance(label_or_region, (list, tuple, np.ndarray)):
        return tuple(int(v) for v in label_or_region)
    return int(label_or_region)


def label_key(label_or_region) -> str:
    # the same keys as nnU-Net's summary.json (str of the label or of the region tuple)
    return str(_plain(label_or_region))


def summarise_cases(label_names: dict[str, str], per_case: list[dict]) -> dict:
    """The evaluation of a set of cases from their per-case metrics (as :func:`evaluate_folder` returns it).

    Also pools evaluations: the per-case lists of several folds, concatenated, give the evaluation over all their
    cases (``nnunet_ext.benchmark.cross_validation``).

    Args:
        label_names: ``{label key: name}``, the keys of every case's ``metrics``.
        per_case: ``[{"case", "metrics": {key: {"Dice", "HD95", "ASD", ...}}, ...}]``.

    Returns:
        ``{"labels", "per_case", "mean", "foreground_mean", "n_cases"}`` as described in :func:`evaluate_folder`.
    """
    mean = {}
    for key in label_names:
        dice = [c["metrics"][key]["Dice"] for c in per_case]
        mean[key] = {"Dice": float(np.nanmean(dice)) if not all(math.isnan(d) for d in dice) else math.nan}
        mean[key].update({m: summarise_values([c["metrics"][key][m] for c in per_case]) for m in DISTANCE_METRICS})
    # nnU-Net: foreground mean = plain mean over the classes' means (NaN if a class has no defined Dice)
    foreground = {"Dice": float(np.mean([mean[k]["Dice"] for k in label_names]))}
    for metric in DISTANCE_METRICS:
        foreground[metric] = float(np.mean([mean[k][metric]["mean"] for k in label_names]))
    return {"labels": dict(label_names), "per_case": list(per_case), "mean": mean, "foreground_mean": foreground,
            "n_cases": len(per_case)}


def evaluate_folder(reference_folder: str | os.PathLike, prediction_folder: str | os.PathLike,
                    dataset_json_file: str | os.PathLike, plans_file: str | os.PathLike,
                    output_file: str | os.PathLike | None = None) -> dict:
    """Evaluate every reference case against the prediction of the same name.

    Args:
        reference_folder: ``labelsTs``-like folder (``<case><file_ending>``).
        prediction_folder: the output folder of ``nnUNetv2_predict``.
        dataset_json_file: the dataset's ``dataset.json`` (file ending, labels or regions, ignore label).
        plans_file: the plans used for training (label handling as in ``nnUNetv2_evaluate_folder``).
        output_file: optional JSON file for the result.

    Returns:
        ``{"labels": {key: name}, "per_case": [{"case", "metrics": {key: {"Dice", "IoU", "HD95", "ASD", ...}}}],
        "mean": {key: {"Dice": float, "HD95": summary, "ASD": summary}}, "foreground_mean": {...}}`` where a
        summary is :func:`summarise_values`; ``mean[..]["Dice"]`` is the NaN-ignoring mean over cases and
        ``foreground_mean["Dice"]`` the mean over classes, both as nnU-Net computes them.

    Raises:
        FileNotFoundError: no reference case, or a reference case without prediction (named).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics, region_or_label_to_mask
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    reference_folder, prediction_folder = Path(reference_folder), Path(prediction_folder)
    dataset_json = load_json(str(dataset_json_file))
    file_ending = dataset_json["file_ending"]
    references = sorted(p for p in reference_folder.iterdir() if p.name.endswith(file_ending))
    if not references:
        raise FileNotFoundError(f"no reference segmentation ending in {file_ending} in {reference_folder}")
    missing = [p.name for p in references if not (prediction_folder / p.name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} reference case(s) have no prediction in {prediction_folder}: "
                                f"{missing[:10]}")
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(references[0]))()
    label_manager = PlansManager(str(plans_file)).get_label_manager(dataset_json)
    labels = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    names = {_plain(v): k for k, v in dataset_json["labels"].items()}
    label_names = {label_key(lab): str(names.get(_plain(lab), label_key(lab))) for lab in labels}

    per_case = []
    for reference in references:
        case = reference.name[:-len(file_ending)]
        prediction = prediction_folder / reference.name
        nnunet = compute_metrics(str(reference), str(prediction), reader, labels, label_manager.ignore_label)
        seg_ref, props = reader.read_seg(str(reference))
        seg_pred, _ = reader.read_seg(str(prediction))
        if seg_ref.shape != seg_pred.shape:
            raise ValueError(f"case {case}: prediction shape {seg_pred.shape} differs from reference {seg_ref.shape}")
        spacing = [float(s) for s in props["spacing"]]
        ignore = seg_ref[0] == label_manager.ignore_label if label_manager.ignore_label is not None else None
        metrics = {}
        for label in labels:
            ref_mask = region_or_label_to_mask(seg_ref[0], label)
            pred_mask = region_or_label_to_mask(seg_pred[0], label)
            if ignore is not None:  # as nnU-Net's Dice: ignored voxels count for neither side
                ref_mask, pred_mask = ref_mask & ~ignore, pred_mask & ~ignore
            values = {k: float(v) for k, v in nnunet["metrics"][label].items()}
            values.update(surface_distances(pred_mask, ref_mask, spacing))
            metrics[label_key(label)] = values
        per_case.append({"case": case, "reference_file": str(reference), "prediction_file": str(prediction),
                         "metrics": metrics})

    result = summarise_cases(label_names, per_case)
    if output_file is not None:
        Path(output_file).write_text(json.dumps(result, indent=2, allow_nan=True))
    return result
