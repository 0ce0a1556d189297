"""``nnunet-ext predict-cls``: class probabilities per case from trained CFCML folds.

``nnUNetv2_predict`` can only return segmentations, so this reads the model folder like nnU-Net's predictor
(``plans.json``, ``dataset.json``, ``checkpoint_*.pth`` per fold), rebuilds the network with the trainer class's
own ``build_network_architecture`` (resolved by the checkpoint's ``trainer_name`` through nnU-Net's lookup),
loads ``network_weights`` strictly, preprocesses each case with the configuration's preprocessor (same
resampling and normalisation as training), takes the centred patch (as training-time validation) and averages
the softmax over folds.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np
import torch

from nnunet_ext.cfcml.configured_table import changed_source, configured_csv
from nnunet_ext.cfcml.data import crop_or_pad_to_patch
from nnunet_ext.cfcml.prediction_table import read_prediction_table
from nnunet_ext.cfcml.tabular import TABULAR_CSV, TabularDataError, TabularSchema, TabularTable


def load_fold_network(folder: str, fold: int | str, checkpoint_name: str, device: torch.device):
    """``(network in eval mode, plans_manager, configuration_manager, dataset_json, trainer class)`` of one fold."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ext.discovery import ENV_VAR, ext_trainer_path

    path = os.path.join(folder, f"fold_{fold}", checkpoint_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    dataset_json = load_json(os.path.join(folder, "dataset.json"))
    plans_manager = PlansManager(os.path.join(folder, "plans.json"))
    configuration_manager = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
    os.environ[ENV_VAR] = ext_trainer_path(os.environ.get(ENV_VAR))  # our trainers first, the user's kept
    trainer_class = recursive_find_trainer_class_by_name(checkpoint["trainer_name"])
    if not hasattr(trainer_class, "cfcml_overrides"):
        raise ValueError(f"{checkpoint['trainer_name']} is not a CFCML trainer; predict-cls needs one")
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = trainer_class.build_network_architecture(plans_manager, configuration_manager, num_inputs,
                                                       num_outputs, enable_deep_supervision=False)
    network.load_state_dict(checkpoint["network_weights"], strict=True)
    return network.to(device).eval(), plans_manager, configuration_manager, dataset_json, trainer_class


def default_prediction_table(block: dict, plans_manager) -> str:
    """The table the model's plans were configured with, if its raw source is unchanged since.

    Raises:
        TabularDataError: the raw ``tabular.csv``/``tabular.json`` changed since ``configure``: choose with ``-t``.
    """
    from nnunetv2.paths import nnUNet_preprocessed

    from nnunet_ext.cfcml.configure import raw_dataset_folder

    preprocessed_folder = os.path.join(str(nnUNet_preprocessed), plans_manager.dataset_name)
    copy = configured_csv(block, preprocessed_folder)
    changed = changed_source(block, preprocessed_folder, raw_dataset_folder(plans_manager.plans))
    if changed is not None:
        edited = os.path.join(os.path.dirname(changed[0]), TABULAR_CSV)
        raise TabularDataError(f"{changed[0]} differs from the copy {changed[1]} that plans "
                               f"{plans_manager.plans_name!r} were configured with; choose the table explicitly: "
                               f"-t {copy} (as configured) or -t {edited} (edited; encoded with the trained schema)")
    return copy


def predict_classification(images_dir: str, tabular_csv: str | None, output_csv: str, dataset: str | int,
                           configuration: str, folds: Sequence[int | str], trainer: str = "CFCMLTrainer",
                           plans: str = "nnUNetPlans", checkpoint_name: str = "checkpoint_final.pth",
                           device: str = "cpu", allow_missing_tabular: bool = False, batch_size: int = 8,
                           allow_missing_columns: bool = False) -> str:
    """Write ``case_id, prediction, prob_<class>...`` for every case in ``images_dir``; returns ``output_csv``.

    The table is checked before any network is loaded (:func:`read_prediction_table`).

    Args:
        images_dir: nnU-Net-style images (``<case>_<XXXX><file_ending>``).
        tabular_csv: rows for these cases (label column optional); default: the copy the plans were configured
            with (:func:`default_prediction_table`).
        folds: folds to ensemble (softmax averaged).
        allow_missing_tabular: cases without a row get all fields missing instead of an error.
        allow_missing_columns: feature columns absent from the table are missing for every case (with a
            warning per column) instead of an error.

    Raises:
        TabularDataError: cases without a tabular row (listed), unless ``allow_missing_tabular``; feature columns
            absent from the table (listed), unless ``allow_missing_columns``; a bad cell.
        FileExistsError: ``output_csv`` exists (never overwritten).
        InputError: no trained model folder, or a fold without ``checkpoint_name``.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    from nnunet_ext.inputs import require_model_folder
    from nnunet_ext.plans import method_settings

    if os.path.exists(output_csv):
        raise FileExistsError(f"{output_csv} exists; choose another output file")
    torch_device = torch.device(device)
    folder = require_model_folder(dataset, trainer, plans, configuration, folds, checkpoint_name)
    plans_manager = PlansManager(os.path.join(folder, "plans.json"))
    block = method_settings(plans_manager, "cfcml")
    schema = TabularSchema.from_dict(block["schema"])
    if tabular_csv is None:
        tabular_csv = default_prediction_table(block, plans_manager)
    file_ending = load_json(os.path.join(folder, "dataset.json"))["file_ending"]
    files = create_lists_from_splitted_dataset_folder(images_dir, file_ending)
    if not files:
        raise FileNotFoundError(f"no images ending in {file_ending} in {images_dir}")
    # (no per-case file count check: one RGB file carries three channels through nnU-Net's natural-image reader)
    if len({len(f) for f in files}) != 1:
        raise ValueError(f"cases in {images_dir} have different numbers of channel files")
    cases = [os.path.basename(f[0])[: -len(file_ending) - 5] for f in files]
    table = read_prediction_table(schema, tabular_csv, cases, allow_missing_columns)
    missing = [c for c in cases if c not in table.rows]
    if missing and not allow_missing_tabular:
        raise TabularDataError(f"{tabular_csv}: no row for case(s) {missing[:20]} (pass --allow-missing-tabular to "
                               f"treat all their fields as missing)")
    for case in missing:
        table.rows[case] = TabularTable(schema, [{schema.id_column: case}], "<missing row>").rows[case]
    networks = []
    for fold in folds:
        network, plans_manager, configuration_manager, dataset_json, _ = load_fold_network(
            folder, fold, checkpoint_name, torch_device)
        networks.append(network)

    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    patch_size = configuration_manager.patch_size
    probabilities = np.zeros((len(cases), schema.num_classes))
    for start in range(0, len(cases), batch_size):
        chunk = list(range(start, min(start + batch_size, len(cases))))
        inputs = []
        for i in chunk:
            data, _, _ = preprocessor.run_case(files[i], None, plans_manager, configuration_manager, dataset_json)
            inputs.append(crop_or_pad_to_patch(data, patch_size))
        x = torch.from_numpy(np.stack(inputs)).to(torch_device)
        tab = table.batch([cases[i] for i in chunk]).to(torch_device)
        with torch.no_grad():
            for network in networks:
                probabilities[chunk] += torch.softmax(network.classify(x, tab).float(), 1).cpu().numpy()
    probabilities /= len(networks)
    os.makedirs(os.path.dirname(os.path.abspath(output_csv)), exist_ok=True)
    with open(output_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "prediction", *[f"prob_{c}" for c in schema.classes]])
        for case, probs in zip(cases, probabilities):
            writer.writerow([case, schema.classes[int(probs.argmax())], *[f"{p:.8f}" for p in probs]])
    return output_csv
