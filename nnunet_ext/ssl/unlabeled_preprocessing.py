"""Preprocessing of unlabeled images (``nnUNet_raw/<Dataset>/imagesUnlabeled``) with a dataset's nnU-Net plans.

Every unlabeled case goes through exactly the per-case code path nnU-Net uses for labelled cases
(``preprocessor.run_case(files, None, ...)``: transpose, crop to non-zero, normalise with the *labelled*
fingerprint statistics, resample) and is written into a folder of its own,
``nnUNet_preprocessed/<Dataset>/<data_identifier>__unlabeled/``:

- ``<case>.b2nd``: the data ``[C, *spatial]`` float32, blosc2, chunked for the configuration's patch size;
- ``<case>.pkl``: the preprocessing properties with ``class_locations = {}``;
- ``manifest.json``: which plans/configuration/data identifier produced the folder, the case list, a
  signature of the preprocessing settings (to detect stale data after re-planning), a fingerprint of each case's
  source files (to redo changed cases) and whether the run completed. It is written before any case file
  changes and lists only cases made with its signature, so an interrupted run never claims cases of other plans.

A separate folder is required: ``nnUNetDatasetBlosc2.get_identifiers`` lists every ``.b2nd`` of the labelled
folder, so unlabeled cases there would enter the cross-validation split and crash on the missing ``_seg`` file.
Nothing is written next to the labelled data, the raw data is only read, and the fingerprint/plans are not
touched (normalisation statistics come from labelled cases only).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from nnunet_ext.errors import InputError
from nnunet_ext.ssl.unlabeled_sources import find_source_problems, source_record, unchanged_record

MANIFEST_FILE = "manifest.json"
UNLABELED_SUFFIX = "__unlabeled"
RAW_UNLABELED_DIR = "imagesUnlabeled"
# 2: per-case source fingerprints ("sources") and "complete"; the manifest exists while a run is in progress
MANIFEST_FORMAT_VERSION = 2


class UnlabeledDataError(InputError):
    """Invalid raw unlabeled images or an impossible preprocessing request (raised before any work is done)."""


def unlabeled_folder(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    """Folder holding the preprocessed unlabeled cases of one data identifier.

    Args:
        preprocessed_dataset_folder_base: ``nnUNet_preprocessed/<Dataset>``
            (``trainer.preprocessed_dataset_folder_base``).
        data_identifier: ``configuration_manager.data_identifier``, e.g. ``nnUNetPlans_3d_fullres``.

    Returns:
        ``<preprocessed_dataset_folder_base>/<data_identifier>__unlabeled``.
    """
    return os.path.join(preprocessed_dataset_folder_base, data_identifier + UNLABELED_SUFFIX)


def preprocess_command(dataset: str | int, configuration: str, plans_identifier: str) -> str:
    """The CLI call that (re)creates an unlabeled folder; quoted in every error message."""
    return f"nnunet-ext preprocess-unlabeled -d {dataset} -c {configuration} -p {plans_identifier}"


def _dataset_ref_from_folder(folder: str) -> str:
    """``DatasetXXX_Name`` parent folder -> ``XXX`` for the CLI hint (falls back to the name)."""
    name = os.path.basename(os.path.dirname(os.path.abspath(folder)))
    match = re.fullmatch(r"Dataset(\d{3})_.+", name)
    return str(int(match.group(1))) if match else name or "<DATASET>"


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so signatures compare equal whether they come from plans or from a manifest."""
    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o)}")
    return json.loads(json.dumps(obj, default=default, sort_keys=True))


def preprocessing_signature(plans_manager: Any, configuration_manager: Any) -> dict:
    """Everything in the plans that changes the *values* of preprocessed data (not chunking, not the network).

    Two configurations with the same data identifier and the same signature produce identical arrays, so a
    derived plans file (other ``plans_name``) or a configuration that only inherits and changes e.g. the batch
    size can reuse the folder; a re-planned dataset (new normalisation statistics) cannot.

    Args:
        plans_manager: ``nnunetv2`` ``PlansManager``.
        configuration_manager: ``ConfigurationManager`` of the configuration.

    Returns:
        A JSON-compatible dict.
    """
    cfg = configuration_manager.configuration
    return _jsonable({
        "preprocessor_name": configuration_manager.preprocessor_name,
        "spacing": configuration_manager.spacing,
        "normalization_schemes": configuration_manager.normalization_schemes,
        "use_mask_for_norm": configuration_manager.use_mask_for_norm,
        "resampling_fn_data": cfg.get("resampling_fn_data"),
        "resampling_fn_data_kwargs": cfg.get("resampling_fn_data_kwargs"),
        "transpose_forward": plans_manager.transpose_forward,
        "image_reader_writer": plans_manager.plans.get("image_reader_writer"),
        "foreground_intensity_properties_per_channel": plans_manager.foreground_intensity_properties_per_channel,
    })


def load_unlabeled_manifest(folder: str, expected_plans_name: str, expected_configuration: str,
                            expected_data_identifier: str, *,
                            expected_preprocessing: dict | None = None) -> dict:
    """Read and check the manifest of an unlabeled folder before training uses it.

    The folder is accepted when its ``data_identifier`` matches and, if ``expected_preprocessing`` is given,
    the preprocessing signature matches. The configuration must be one the folder was created for, unless the
    signature was given and matched (then the data is provably identical, e.g. ``3d_fullres_bs4`` inheriting
    from ``3d_fullres``). ``expected_plans_name`` is *not* compared: a derived plans file keeps the data
    identifier and so the data; it appears in error messages as context.

    Args:
        folder: ``<data_identifier>__unlabeled`` folder.
        expected_plans_name: plans name of the training run (context and the ``-p`` of the hint).
        expected_configuration: configuration of the training run.
        expected_data_identifier: data identifier of the training configuration.
        expected_preprocessing: :func:`preprocessing_signature` of the training plans/configuration, or None.

    Returns:
        The manifest dict.

    Raises:
        RuntimeError: missing or empty folder, missing/unreadable manifest, mismatching data identifier,
            configuration or preprocessing settings, or cases listed in the manifest whose files are missing.
            The message names ``nnunet-ext preprocess-unlabeled``.
    """
    command = preprocess_command(_dataset_ref_from_folder(folder), expected_configuration, expected_plans_name)
    context = (f"(training: plans '{expected_plans_name}', configuration '{expected_configuration}', "
               f"data identifier '{expected_data_identifier}')")
    if not os.path.isdir(folder):
        raise RuntimeError(f"No preprocessed unlabeled images found: {folder} does not exist {context}. Put the "
                           f"images into nnUNet_raw/<Dataset>/{RAW_UNLABELED_DIR}/ and run `{command}`.")
    if not any(f.endswith(".b2nd") for f in os.listdir(folder)):
        raise RuntimeError(f"The unlabeled folder {folder} holds no preprocessed case (.b2nd) {context}. "
                           f"Run `{command}`.")
    manifest_file = os.path.join(folder, MANIFEST_FILE)
    try:
        with open(manifest_file, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise RuntimeError(f"{manifest_file} is missing (interrupted preprocessing?) {context}. "
                           f"Run `{command}`.") from None
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{manifest_file} is not valid JSON ({e}) {context}. Run `{command} --overwrite`.") from e

    if manifest.get("complete") is False:  # format 1 manifests have no key and were written only when complete
        raise RuntimeError(f"The unlabeled folder {folder} is incomplete: its preprocessing was interrupted or "
                           f"failed ({len(manifest.get('cases', []))} case(s) done) {context}. Run `{command}` to "
                           f"finish it.")
    found = (f"(folder: plans '{manifest.get('plans_name')}', configuration(s) "
             f"{manifest.get('configurations', [manifest.get('configuration')])}, "
             f"data identifier '{manifest.get('data_identifier')}')")
    if manifest.get("data_identifier") != expected_data_identifier:
        raise RuntimeError(f"The unlabeled folder {folder} was preprocessed for another data identifier "
                           f"{found} {context}. Run `{command}`.")
    signature_matches = None
    if expected_preprocessing is not None:
        signature_matches = manifest.get("preprocessing") == _jsonable(expected_preprocessing)
        if not signature_matches:
            raise RuntimeError(f"The unlabeled folder {folder} was preprocessed with other preprocessing settings "
                               f"than the training plans (spacing, normalisation statistics, ...; was the dataset "
                               f"re-planned?) {found} {context}. Run `{command} --overwrite`.")
    configurations = manifest.get("configurations", [manifest.get("configuration")])
    if expected_configuration not in configurations and not signature_matches:
        raise RuntimeError(f"The unlabeled folder {folder} was preprocessed for another configuration {found} "
                           f"{context}. Run `{command}`.")
    missing = [c for c in manifest.get("cases", [])
               if not (os.path.isfile(os.path.join(folder, c + ".b2nd"))
                       and os.path.isfile(os.path.join(folder, c + ".pkl")))]
    if missing or not manifest.get("cases"):
        raise RuntimeError(f"The unlabeled folder {folder} is incomplete: files of case(s) {missing} listed in "
                           f"{MANIFEST_FILE} are missing {context}. Run `{command}`.")
    return manifest


def save_unlabeled_case(data: np.ndarray, properties: dict, output_filename_truncated: str,
                        patch_size: Sequence[int] | None = None) -> None:
    """Write ``<truncated>.b2nd`` (data only) and ``<truncated>.pkl`` like nnU-Net's blosc2 dataset, minus ``_seg``.

    Same codec, level and chunking rule as ``nnUNetDatasetBlosc2.save_case`` called from
    ``DefaultPreprocessor.run_case_save`` (chunks from ``comp_blosc2_params(data.shape, patch_size, itemsize)``),
    so patch reads cost the same as for labelled data. The ``.pkl`` is written last: a case counts as done only
    when both files exist, so an interrupted write is redone on the next run.

    Args:
        data: ``[C, *spatial]`` array (stored as float32).
        properties: preprocessing properties (pickled as given).
        output_filename_truncated: output path without extension.
        patch_size: the configuration's patch size (2 or 3 entries); None = whole-image access pattern.
    """
    import blosc2
    from batchgenerators.utilities.file_and_folder_operations import write_pickle
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    data = np.ascontiguousarray(data, dtype=np.float32)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(patch_size) if patch_size is not None
                                        else tuple(data.shape[1:]), data.itemsize)
    codec, clevel = blosc2.Codec.LZ4HC, 5
    # nnU-Net 2.8.1 picks NOFILTER vs SHUFFLE per image by trial compression; reuse it when present
    select_filter = getattr(nnUNetDatasetBlosc2, "_select_filter", None)
    data_filter = select_filter(data, blocks, chunks, codec, clevel) if select_filter else blosc2.Filter.SHUFFLE
    for ext in (".pkl", ".b2nd"):  # blosc2 refuses to write over an existing urlpath
        if os.path.isfile(output_filename_truncated + ext):
            os.remove(output_filename_truncated + ext)
    blosc2.asarray(data, urlpath=output_filename_truncated + ".b2nd", chunks=chunks, blocks=blocks,
                   cparams={"codec": codec, "filters": [data_filter], "nthreads": 4, "clevel": clevel})
    write_pickle(properties, output_filename_truncated + ".pkl")


def _preprocess_case(case: str, image_files: list[str], output_filename_truncated: str, plans_manager: Any,
                     configuration_manager: Any, dataset_json: dict) -> str:
    """Worker: one case through the configuration's preprocessor, then written. Module-level so it pickles."""
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    try:
        data, _, properties = preprocessor.run_case(image_files, None, plans_manager, configuration_manager,
                                                    dataset_json)
    except Exception as e:  # name the case: nnU-Net's errors (reader, shapes) do not
        raise RuntimeError(f"Preprocessing unlabeled case '{case}' ({image_files}) failed: {e!r}") from e
    # seg_file=None -> nnU-Net computed no class_locations; an empty dict keeps loaders that read the key working
    properties["class_locations"] = {}
    save_unlabeled_case(data, properties, output_filename_truncated, configuration_manager.patch_size)
    return case


def _env_folder(var: str) -> str:
    # read at call time: callers (and tests) may set the variable after nnunetv2 was imported
    value = os.environ.get(var)
    if not value:
        raise UnlabeledDataError(f"Environment variable {var} is not set; nnU-Net's folders must be configured "
                                 f"(see nnU-Net's documentation/setting_up_paths.md).")
    return value


def _identifiers_in(folder: str, file_ending: str) -> set[str]:
    """Case identifiers of an nnU-Net images folder (``<case>_<XXXX><file_ending>``); empty if it is missing."""
    if not os.path.isdir(folder):
        return set()
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder
    return {str(i) for i in get_identifiers_from_splitted_dataset_folder(folder, file_ending)}


def _labelled_identifiers(raw_dataset_folder: str, dataset_json: dict) -> set[str]:
    if "dataset" in dataset_json:  # explicit file lists instead of imagesTr
        return set(dataset_json["dataset"].keys())
    return _identifiers_in(os.path.join(raw_dataset_folder, "imagesTr"), dataset_json["file_ending"])


def collect_unlabeled_cases(folder: str, file_ending: str, num_channels: int,
                            labelled_identifiers: set[str] | None = None,
                            test_identifiers: set[str] | None = None) -> dict[str, list[str]]:
    """Group ``imagesUnlabeled`` files per case and validate them; every problem is reported at once.

    Equivalent to ``nnunetv2.utilities.utils.create_lists_from_splitted_dataset_folder`` (same
    ``<case>_<XXXX><file_ending>`` rule), but without its 12-process pool and without silently dropping files
    that do not match, channel gaps or duplicates. Hidden files (``.DS_Store`` ...) are ignored.

    Args:
        folder: the ``imagesUnlabeled`` folder.
        file_ending: ``dataset.json`` ``file_ending``, e.g. ``.nii.gz``.
        num_channels: ``len(channel_names)``.
        labelled_identifiers: identifiers of ``imagesTr``; unlabeled identifiers must differ.
        test_identifiers: identifiers of ``imagesTs``; an unlabeled image with a test case's identifier is refused
            (test images must not enter training).

    Returns:
        ``{case: [file paths sorted by channel]}`` sorted by case.

    Raises:
        UnlabeledDataError: missing/empty folder, stray or misnamed files, wrong channel sets, collisions.
    """
    expected = f"'<case>_<XXXX>{file_ending}' with channel indices 0000..{num_channels - 1:04d}"
    if not os.path.isdir(folder):
        raise UnlabeledDataError(f"Unlabeled image folder {folder} does not exist. Put unlabeled images there, "
                                 f"named like imagesTr: {expected}.")
    entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    if not entries:
        raise UnlabeledDataError(f"Unlabeled image folder {folder} is empty; expected files named {expected}.")
    pattern = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})" + re.escape(file_ending))
    problems: list[str] = []
    channels: dict[str, dict[int, str]] = {}
    for name in entries:
        path = os.path.join(folder, name)
        match = pattern.fullmatch(name)
        if not os.path.isfile(path):
            problems.append(f"{name}: not a file (sub-folders are not allowed here)")
        elif not name.endswith(file_ending):
            problems.append(f"{name}: file ending does not match dataset.json file_ending '{file_ending}' "
                            f"(expected {expected})")
        elif match is None:
            problems.append(f"{name}: name does not follow {expected} (4-digit channel suffix missing)")
        else:
            channels.setdefault(match.group("case"), {})[int(match.group("channel"))] = path
    for case, per_channel in sorted(channels.items()):
        if sorted(per_channel) != list(range(num_channels)):
            found = ", ".join(f"_{c:04d}" for c in sorted(per_channel))
            problems.append(f"case '{case}': found channel file(s) {found} but dataset.json declares "
                            f"{num_channels} channel(s) (expected _0000 .. _{num_channels - 1:04d})")
        if labelled_identifiers and case in labelled_identifiers:
            problems.append(f"case '{case}': identifier also exists in imagesTr; unlabeled identifiers must differ "
                            f"from labelled ones (rename the unlabeled files)")
    leaked = sorted(set(channels) & set(test_identifiers or ()))
    if leaked:
        problems.append(f"case(s) {leaked}: identifier(s) also in imagesTs; test images must not be used for "
                        f"training (remove these files from {RAW_UNLABELED_DIR}, or rename them if they are other "
                        f"images)")
    if problems:
        raise UnlabeledDataError(_problems_message(folder, problems))
    return {case: [per_channel[c] for c in range(num_channels)] for case, per_channel in sorted(channels.items())}


def _problems_message(folder: str, problems: Sequence[str]) -> str:
    """Every problem in one line (the CLI prints errors as ``nnunet-ext <command>: error: <message>``)."""
    return f"Invalid unlabeled images in {folder}: " + "; ".join(problems)


def _read_manifest(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MANIFEST_FILE), encoding="utf-8") as f:
            manifest = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _write_manifest(folder: str, manifest: dict) -> None:
    """Replace the manifest atomically: a crash leaves the old or the new one, never half a file."""
    temporary = os.path.join(folder, MANIFEST_FILE + ".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(temporary, os.path.join(folder, MANIFEST_FILE))


def _remove_case_files(folder: str, case: str) -> None:
    for ext in (".b2nd", ".pkl"):
        if os.path.isfile(os.path.join(folder, case + ext)):
            os.remove(os.path.join(folder, case + ext))


def _preprocess_job(job: tuple) -> str:
    return _preprocess_case(*job)


def _run_jobs(jobs: list[tuple], num_processes: int, on_done: Callable[[str], None]) -> None:
    """Run ``_preprocess_case`` jobs; ``on_done(case)`` is called in this process as each case finishes."""
    if num_processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            on_done(_preprocess_case(*job))
        return
    # spawn like nnU-Net's own preprocessing (no forked torch/OpenMP state); poll the workers because a worker
    # killed by the OS (out of memory) would otherwise leave the pool waiting forever
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
        workers = list(pool._pool)
        results = pool.imap_unordered(_preprocess_job, jobs)
        while True:
            try:
                on_done(results.next(timeout=0.1))  # re-raises a worker's exception
            except StopIteration:
                return
            except multiprocessing.TimeoutError:
                if not all(w.is_alive() for w in workers):
                    raise RuntimeError("A preprocessing worker died (out of memory?). Retry with fewer processes "
                                       "(-np); finished cases are kept.") from None



def preprocess_unlabeled(dataset: str | int, configurations: Sequence[str] = ("3d_fullres",),
                         plans_identifier: str = "nnUNetPlans", num_processes: int = 1, overwrite: bool = False,
                         verbose: bool = False) -> list[str]:
    """Preprocess ``nnUNet_raw/<Dataset>/imagesUnlabeled`` for the given configurations of existing plans.

    All inputs are validated before anything is written: file names and channels, identifiers that collide with
    ``imagesTr`` or ``imagesTs``, and for every case to (re)do complete ``.gz`` files and one 2D/3D image per
    channel on one grid. Per configuration the configuration's own preprocessor runs ``run_case(files, None,
    ...)`` per case (identical to labelled cases, minus labels). Configurations sharing a data identifier share
    one folder. A case recorded in the manifest with unchanged source files is skipped unless ``overwrite``;
    changed cases are redone and cases whose images were removed are dropped (with a warning). A folder whose
    manifest records other preprocessing settings (the dataset was re-planned) is refused unless ``overwrite``.

    Args:
        dataset: dataset ID or ``DatasetXXX_Name``.
        configurations: plans configurations, e.g. ``("3d_fullres", "2d")``.
        plans_identifier: plans file name without ``.json``.
        num_processes: worker processes (1 = in this process).
        overwrite: re-preprocess every case, also after a re-plan.
        verbose: print one line per configuration.

    Returns:
        The output folders, one per distinct data identifier, in request order.

    Raises:
        UnlabeledDataError: unset nnU-Net folders, missing dataset/plans, unknown configuration, invalid files.
        RuntimeError: a case failed to preprocess (the message names it).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if isinstance(configurations, str):  # a bare "3d_fullres" would otherwise be iterated character by character
        configurations = (configurations,)
    if num_processes < 1:
        raise UnlabeledDataError(f"num_processes must be >= 1, got {num_processes}.")
    raw_base, preprocessed_base = _env_folder("nnUNet_raw"), _env_folder("nnUNet_preprocessed")
    try:
        # np.str_ from nnU-Net's lookup -> str, so it serialises into the manifest
        dataset_name = str(maybe_convert_to_dataset_name(dataset))
    except (RuntimeError, ValueError) as e:  # unknown or ambiguous ID: same error type as every other bad input
        raise UnlabeledDataError(str(e)) from e
    raw_folder = os.path.join(raw_base, dataset_name)
    preprocessed_folder = os.path.join(preprocessed_base, dataset_name)
    if not os.path.isdir(raw_folder):
        raise UnlabeledDataError(f"Raw dataset folder {raw_folder} does not exist.")
    plans_file = os.path.join(preprocessed_folder, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise UnlabeledDataError(f"Plans file {plans_file} not found. Plan the dataset first, e.g. "
                                 f"`nnUNetv2_plan_and_preprocess -d {dataset} -c {' '.join(configurations)}`"
                                 + ("" if plans_identifier == "nnUNetPlans" else
                                    f" (or the planner that writes '{plans_identifier}')") + ".")
    # the preprocessed copy is what nnU-Net's own preprocessing reads; fall back to the raw one
    dataset_json_file = os.path.join(preprocessed_folder, "dataset.json")
    if not os.path.isfile(dataset_json_file):
        dataset_json_file = os.path.join(raw_folder, "dataset.json")
    dataset_json = load_json(dataset_json_file)
    plans_manager = PlansManager(plans_file)

    unknown = [c for c in configurations if c not in plans_manager.available_configurations]
    if unknown or not configurations:
        raise UnlabeledDataError(f"Configuration(s) {unknown or list(configurations)} not found in {plans_file}; "
                                 f"available: {plans_manager.available_configurations}.")
    channel_names = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    file_ending = dataset_json["file_ending"]
    cases = collect_unlabeled_cases(os.path.join(raw_folder, RAW_UNLABELED_DIR), file_ending, len(channel_names),
                                    _labelled_identifiers(raw_folder, dataset_json),
                                    _identifiers_in(os.path.join(raw_folder, "imagesTs"), file_ending))

    # one folder per data identifier (e.g. 3d_cascade_fullres reuses 3d_fullres's data)
    groups: dict[str, list[str]] = {}
    for name in dict.fromkeys(configurations):
        groups.setdefault(plans_manager.get_configuration(name).data_identifier, []).append(name)
    command = preprocess_command(dataset, " ".join(dict.fromkeys(configurations)), plans_identifier)
    work = []
    for data_identifier, names in groups.items():
        configuration_manager = plans_manager.get_configuration(names[0])
        out = unlabeled_folder(preprocessed_folder, data_identifier)
        signature = preprocessing_signature(plans_manager, configuration_manager)
        old = _read_manifest(out)
        if old is not None and old.get("preprocessing") != signature and not overwrite:
            raise UnlabeledDataError(
                f"{out} holds unlabeled data preprocessed with other settings than {plans_file} (plans "
                f"'{old.get('plans_name')}', configuration(s) {old.get('configurations')}); the dataset was "
                f"probably re-planned. Replace it with `{command} --overwrite`.")
        # only cases recorded with these settings and unchanged source files are kept; a folder without a
        # (readable) manifest, e.g. left by an older version, is redone completely
        recorded = (old or {}).get("sources", {}) if not overwrite else {}
        kept = {}
        for case, files in cases.items():
            record = unchanged_record(recorded.get(case), files)
            if record is not None and all(os.path.isfile(os.path.join(out, case + ext)) for ext in (".b2nd", ".pkl")):
                kept[case] = record
        changed = sorted(c for c in recorded if c in cases and c not in kept)
        present = {f.rsplit(".", 1)[0] for f in os.listdir(out) if f.endswith((".b2nd", ".pkl"))} \
            if os.path.isdir(out) else set()
        removed = sorted(present - set(cases))
        work.append((names, configuration_manager, out, signature, old, kept, changed, removed))

    # every case to (re)do is checked (complete files, geometry) and fingerprinted before anything is written
    todo_cases = sorted({c for *_, kept, _, _ in work for c in cases if c not in kept})
    problems = find_source_problems({c: cases[c] for c in todo_cases}, plans_manager.plans.get("image_reader_writer"))
    if problems:
        raise UnlabeledDataError(_problems_message(os.path.join(raw_folder, RAW_UNLABELED_DIR), problems))
    new_records = {c: source_record(cases[c]) for c in todo_cases}

    outputs = []
    for names, configuration_manager, out, signature, old, kept, changed, removed in work:
        data_identifier = configuration_manager.data_identifier
        os.makedirs(out, exist_ok=True)
        if removed:
            warnings.warn(f"{out}: dropping case(s) {removed}: their images are no longer in {RAW_UNLABELED_DIR}.",
                          stacklevel=2)
        if changed and verbose:
            print(f"{data_identifier}: source images of case(s) {changed} changed; preprocessing them again")
        todo = [c for c in cases if c not in kept]
        previous = old.get("configurations", []) if old and old.get("preprocessing") == signature else []
        manifest = {
            "format_version": MANIFEST_FORMAT_VERSION,
            "dataset_name": dataset_name,
            "plans_identifier": plans_identifier,
            "plans_name": plans_manager.plans_name,
            "configuration": names[0],
            "configurations": sorted(set(previous) | set(names)),
            "data_identifier": data_identifier,
            "nnunetv2_version": _package_version("nnunetv2"),
            "nnunet_ext_version": _package_version("nnunet-ext"),
            "complete": False,
            "cases": sorted(kept),
            "sources": dict(sorted(kept.items())),
            # timezone.utc, not datetime.UTC: the package supports Python 3.10
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
            "preprocessing": signature,
        }
        # written before any case file changes: from now on the folder claims only cases made with `signature`
        # (kept ones, then each finished one), so an interrupted run never mixes in cases of other plans
        _write_manifest(out, manifest)
        for case in [*removed, *todo]:
            _remove_case_files(out, case)
        done = dict(kept)

        def record_done(case: str) -> None:
            done[case] = new_records[case]

        try:
            _run_jobs([(c, cases[c], os.path.join(out, c), plans_manager, configuration_manager, dataset_json)
                       for c in todo], num_processes, record_done)
        finally:
            manifest.update(cases=sorted(done), sources=dict(sorted(done.items())), complete=len(done) == len(cases))
            _write_manifest(out, manifest)
        if verbose:
            print(f"{data_identifier} ({', '.join(names)}): {len(todo)} case(s) preprocessed, "
                  f"{len(kept)} already present -> {out}")
        outputs.append(out)
    return outputs


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None
