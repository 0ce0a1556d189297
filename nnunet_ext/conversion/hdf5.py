"""HDF5 volume converters: the UA-MT/CAML Left Atrium layout and the SSL4MIS ACDC layout.

* ``h5`` (Left Atrium as prepared by UA-MT, used by CAML): ``<root>/<case>/<file>.h5`` (e.g. ``mri_norm2.h5``)
  with datasets ``image`` and ``label`` in **x, y, z** order (the arrays come from ``nrrd.read``); the lists
  ``train.list``/``test.list`` sit in ``<root>`` or its parent. Flat ``<root>/<case>.h5`` files work too.
* ``acdc-h5`` (SSL4MIS): ``<root>/data/<patientXXX_frameYY>.h5`` volumes with ``image`` and ``label`` in
  **z, y, x** order (they were made with ``sitk.GetArrayFromImage``); ``<root>/data/slices/<case>_slice_<k>.h5``
  holds 2D slices. The SSL4MIS download has volumes only for the validation and test frames: training frames
  without a volume are rebuilt from their slices (:mod:`nnunet_ext.conversion.h5_slices`). ``train.list``,
  ``val.list``, ``test.list`` name the frames. ``val`` frames join the training pool (nnU-Net cross-validates on
  its own). The two frames (ED, ES) of a patient are two cases that are always split together.

UA-MT, CAML and SSL4MIS label the **first** N entries of ``train.list`` (``labeled_order="list"``,
``--labeled-order list``); the default draws them at random.

Neither layout stores the voxel spacing, so the user gives it (``spacing`` in x, y, z order, mm, the SimpleITK
convention). SimpleITK arrays are z, y, x: x, y, z arrays are transposed before writing.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from nnunet_ext.conversion.common import ConversionError, require_source_folder, resolve_raw_root, warn
from nnunet_ext.conversion.splits import read_list_file
from nnunet_ext.conversion.volumes import VolumeCase, convert_volume_cases

AXIS_ORDERS = ("xyz", "zyx")
# ACDC (Bernard et al. 2018): 1 right ventricle cavity, 2 myocardium, 3 left ventricle cavity.
ACDC_LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
LEFT_ATRIUM_LABELS = {"background": 0, "left_atrium": 1}
ACDC_FRAME = re.compile(r"^(?P<patient>.+?)_frame\d+$")


def _require_h5py():
    try:
        import h5py
    except ImportError:
        raise ConversionError("reading HDF5 needs h5py: pip install 'nnunet-ext[h5]' (or pip install h5py)") \
            from None
    return h5py


def _check_spacing(spacing: Sequence[float] | None) -> tuple[float, float, float]:
    if spacing is None or len(spacing) != 3:
        raise ConversionError(f"HDF5 files carry no voxel spacing: give it as three numbers in x, y, z order "
                              f"(--spacing X Y Z, mm), got {spacing}")
    values = tuple(float(s) for s in spacing)
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ConversionError(f"spacing values must be positive, got {spacing}")
    return values


def _to_sitk(array: np.ndarray, axis_order: str, spacing: tuple[float, float, float], where: str, what: str):
    import SimpleITK as sitk

    if array.ndim != 3:
        raise ConversionError(f"{where}: dataset '{what}' has shape {array.shape}; expected a 3D volume")
    if axis_order == "xyz":
        array = np.ascontiguousarray(array.transpose(2, 1, 0))  # -> z, y, x for SimpleITK
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def h5_dataset_names(path: Path, image_key: str) -> set[str]:
    """The dataset names of an HDF5 file that must hold ``image_key`` (a ConversionError naming the file if not)."""
    h5py = _require_h5py()
    try:
        with h5py.File(path, "r") as f:
            keys = set(f.keys())
    except OSError as e:
        raise ConversionError(f"{path}: cannot open as HDF5 ({e})") from None
    if image_key not in keys:
        raise ConversionError(f"{path}: no dataset '{image_key}' (datasets: {sorted(keys)})")
    return keys


def _h5_case(case_id: str, path: Path, image_key: str, label_key: str, axis_order: str,
             spacing: tuple[float, float, float]) -> VolumeCase:
    h5py = _require_h5py()
    keys = h5_dataset_names(path, image_key)

    def load(with_label: bool):
        with h5py.File(path, "r") as f:
            image = f[image_key][()]
            label = f[label_key][()] if with_label else None
        if label is not None and label.shape != image.shape:
            raise ConversionError(f"case {case_id}: {path}: '{label_key}' has shape {label.shape} but "
                                  f"'{image_key}' has {image.shape}")
        return ([_to_sitk(image, axis_order, spacing, str(path), image_key)],
                None if label is None else _to_sitk(label, axis_order, spacing, str(path), label_key))

    return VolumeCase(case_id, str(path), loader=load, has_label=label_key in keys)


def _find_h5_cases(source: Path, h5_name: str | None) -> dict[str, Path]:
    """``<source>/<case>/<file>.h5`` (one per folder, or ``h5_name``), else flat ``<source>/<case>.h5``."""
    if not source.is_dir():
        raise ConversionError(f"{source} is not a folder")
    found: dict[str, Path] = {}
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if h5_name is not None:
            candidates = [folder / h5_name] if (folder / h5_name).is_file() else []
        else:
            candidates = sorted(folder.glob("*.h5"))
        if len(candidates) > 1:
            raise ConversionError(f"{folder} has several .h5 files {[c.name for c in candidates]}; choose one with "
                                  f"--h5-name")
        if candidates:
            found[folder.name] = candidates[0]
    if not found:
        found = {p.name[:-3]: p for p in sorted(source.glob("*.h5"))}
    if not found:
        raise ConversionError(f"no HDF5 cases in {source}: expected <case>/<file>.h5 or <case>.h5")
    return found


def _list_cases(path: Path, cases: Sequence[str]) -> list[str]:
    """Entries of a list file mapped to case ids (entries may be paths such as ``<case>/mri_norm2.h5``)."""
    known = set(cases)
    result = []
    for entry in read_list_file(path):
        candidates = [entry, Path(entry).name, Path(entry).stem, Path(entry).parent.name]
        match = next((c for c in candidates if c in known), None)
        if match is None:
            raise ConversionError(f"{path}: entry {entry!r} matches no case (cases look like {sorted(known)[:3]})")
        result.append(match)
    return result


def convert_h5(source: str | Path, dataset_id: int, name: str, spacing: Sequence[float],
               output: str | Path | None = None, *, h5_name: str | None = None, axis_order: str = "xyz",
               image_key: str = "image", label_key: str = "label", channel_name: str = "MRI",
               labels: Mapping[str, int] | None = None, label_map: Mapping[int, int] | None = None,
               train_list: str | Path | None = None, test_list: str | Path | None = None,
               ignore_lists: bool = False, labeled: str | None = None, test: str | None = None, seed: int = 0,
               split_file: str | Path | None = None, overwrite: bool = False, labeled_order: str = "random") -> Path:
    """Convert ``<source>/<case>/<file>.h5`` (UA-MT/CAML Left Atrium layout) into ``Dataset<ID>_<name>``.

    Args:
        spacing: voxel spacing in mm, x, y, z order (Left Atrium: 0.625 0.625 0.625).
        axis_order: order of the HDF5 arrays, ``xyz`` (UA-MT) or ``zyx`` (arrays from ``sitk.GetArrayFromImage``).
        train_list, test_list: list files; default ``train.list``/``test.list`` in ``source`` or its parent.
            Given lists fix the test cases (``test`` must then be None) unless ``ignore_lists``.
        labels: default inferred (``label_<v>``); for the Left Atrium pass :data:`LEFT_ATRIUM_LABELS`
            (``--labels background=0 left_atrium=1``).
        split_file: a previous ``split.json`` (the list files are then not read).
        labeled_order: ``random`` or ``list``: the first ``labeled`` cases of ``train.list``, as UA-MT and CAML
            label them (``--labeled 8 --labeled-order list`` gives their 10 % split of the 80 training cases).
    """
    source = require_source_folder(source)
    if axis_order not in AXIS_ORDERS:
        raise ConversionError(f"axis_order must be one of {AXIS_ORDERS}, got {axis_order!r}")
    spacing = _check_spacing(spacing)
    files = _find_h5_cases(source, h5_name)
    cases = {c: _h5_case(c, p, image_key, label_key, axis_order, spacing) for c, p in files.items()}
    fixed_test = fixed_train = None
    used_lists = []
    if not ignore_lists and split_file is None:  # a split file fixes everything the lists would
        def locate(given, default_name):
            if given is not None:
                if not Path(given).is_file():
                    raise ConversionError(f"list file {given} does not exist")
                return Path(given)
            return next((d / default_name for d in (source, source.parent) if (d / default_name).is_file()), None)

        train_path, test_path = locate(train_list, "train.list"), locate(test_list, "test.list")
        if test_path is not None:
            fixed_test = _list_cases(test_path, list(cases))
            used_lists.append(str(test_path))
        if train_path is not None:
            fixed_train = _list_cases(train_path, list(cases))
            used_lists.append(str(train_path))
        if used_lists:
            warn(f"using the split of {', '.join(used_lists)} (pass --ignore-lists for a random split)")
    return convert_volume_cases(
        cases, raw_root=resolve_raw_root(output), dataset_id=dataset_id, name=name, channel_names=[channel_name],
        sources=[source], labels=labels, label_map=label_map, labeled=labeled, test=test, seed=seed,
        split_file=split_file, overwrite=overwrite, fixed_test=fixed_test, fixed_train=fixed_train,
        labeled_order=labeled_order, description=f"converted by nnunet-ext from HDF5 files in {source}",
        split_info={"converter": "h5", "axis_order": axis_order, "spacing_xyz": list(spacing),
                    "list_files": used_lists})


def acdc_patient(case_id: str) -> str:
    """``patient001_frame01`` -> ``patient001`` (a name without ``_frame`` is its own patient)."""
    match = ACDC_FRAME.match(case_id)
    return match["patient"] if match else case_id


def convert_acdc_h5(source: str | Path, dataset_id: int, name: str, spacing: Sequence[float],
                    output: str | Path | None = None, *, labels: Mapping[str, int] | None = ACDC_LABELS,
                    ignore_lists: bool = False, labeled: str | None = None, test: str | None = None,
                    seed: int = 0, split_file: str | Path | None = None, overwrite: bool = False,
                    labeled_order: str = "random") -> Path:
    """Convert the SSL4MIS ACDC folder (``data/*.h5`` volumes, z, y, x arrays) into ``Dataset<ID>_<name>``.

    ``train.list`` + ``val.list`` form the training pool and ``test.list`` the test cases unless
    ``ignore_lists``. Frames without a volume in ``data/`` are rebuilt from ``data/slices/<case>_slice_<k>.h5``
    (SSL4MIS ships the training frames only as slices). ``labeled`` and ``test`` count **patients**: both frames
    of a patient are labelled, unlabelled or tested together, as in SSL4MIS (``labeled_order="list"``: the first
    patients of ``train.list``, SSL4MIS's choice). SSL4MIS dropped the spacing (ACDC is about 1.5 x 1.5 mm in
    plane, 5-10 mm between slices), so give one.
    """
    from nnunet_ext.conversion.h5_slices import find_slice_stacks, slice_stack_case

    source = require_source_folder(source)
    data = source / "data"
    if not data.is_dir():
        raise ConversionError(f"{source}: expected the SSL4MIS ACDC layout with a data/ folder of <case>.h5 volumes")
    spacing = _check_spacing(spacing)
    files = {p.name[:-3]: p for p in sorted(data.glob("*.h5"))}
    stacks = {c: s for c, s in find_slice_stacks(data / "slices").items() if c not in files}
    if not files and not stacks:
        raise ConversionError(f"no volume files {data}/*.h5 and no slice files {data}/slices/<case>_slice_<k>.h5")
    cases = {c: _h5_case(c, p, "image", "label", "zyx", spacing) for c, p in files.items()}
    cases.update({c: slice_stack_case(c, s, spacing) for c, s in stacks.items()})
    if stacks:
        warn(f"{len(stacks)} frame(s) rebuilt from the 2D slices in {data / 'slices'} (no volume file), e.g. "
             f"{sorted(stacks)[0]}")
    fixed_test = fixed_train = None
    used = []
    if not ignore_lists and split_file is None:  # a split file fixes everything the lists would
        lists = {n: source / f"{n}.list" for n in ("train", "val", "test")}
        if lists["test"].is_file():
            fixed_test = _list_cases(lists["test"], list(cases))
            used.append(str(lists["test"]))
        train = []
        for n in ("train", "val"):
            if lists[n].is_file():
                train += _list_cases(lists[n], list(cases))
                used.append(str(lists[n]))
        fixed_train = train if (lists["train"].is_file() or lists["val"].is_file()) else None
        if used:
            warn(f"using the split of {', '.join(used)} (val joins training; --ignore-lists for a random split)")
    return convert_volume_cases(
        cases, raw_root=resolve_raw_root(output), dataset_id=dataset_id, name=name, channel_names=["cineMRI"],
        sources=[source], labels=labels, label_map=None, labeled=labeled, test=test, seed=seed,
        split_file=split_file, overwrite=overwrite, fixed_test=fixed_test, fixed_train=fixed_train,
        labeled_order=labeled_order, groups={c: acdc_patient(c) for c in cases}, group_name="patient",
        description=f"ACDC converted by nnunet-ext from the SSL4MIS HDF5 files in {source}",
        split_info={"converter": "acdc-h5", "axis_order": "zyx", "spacing_xyz": list(spacing), "list_files": used,
                    "rebuilt_from_slices": sorted(stacks)})
