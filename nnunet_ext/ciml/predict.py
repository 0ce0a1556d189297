"""Prediction without some input modalities (nnU-Net issue #513), for CIML models and, as a baseline, any model.

Built on nnU-Net's ``nnUNetPredictor``: the model is loaded from the training output folder exactly as
``nnUNetv2_predict`` does. nnU-Net expects one file per channel, so a missing channel is filled with an all-zero
image on the geometry of the case's first present channel, written to a temporary folder. A missing channel file
may be absent from the input folder; if present it is ignored. Two modes (:data:`MISSING_MODES`):

- ``"messages-off"`` (CIML models only): the network's messages from the missing senders are switched off
  (:meth:`~nnunet_ext.ciml.network.CIMLNet.set_missing_modalities`) and their encoders do not run, so the zero
  image never reaches the network. A missing *primary* modality is an error.
- ``"zero-fill"`` (any model): the network sees the all-zero channel (after nnU-Net's normalisation). This is what
  a user of stock nnU-Net can do without a modality, and the baseline the CIML benchmark compares against.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nnunet_ext.errors import InputError

#: How a missing modality is handled, see the module docstring.
MISSING_MODES = ("messages-off", "zero-fill")


class MissingCaseFileError(InputError, FileNotFoundError):
    """An input folder without case files, or a case without a required channel file (bad input, not a bug)."""


def ensure_trainer_lookup() -> None:
    """Make nnU-Net's trainer lookup see our trainers folder (keeps folders already set)."""
    from nnunet_ext.discovery import ENV_VAR, ext_trainer_path

    os.environ[ENV_VAR] = ext_trainer_path(os.environ.get(ENV_VAR))


def group_case_files(input_folder: str | os.PathLike, file_ending: str, num_channels: int,
                     optional_channels: Sequence[int] = ()) -> dict[str, dict[int, str]]:
    """``{case: {channel: file}}`` for files named ``<case>_<XXXX><file_ending>`` (nnU-Net's naming).

    Raises:
        MissingCaseFileError: no case files, or a case lacks a required channel (named in the message).
        InputError: a channel index beyond the dataset's channels.
    """
    pattern = re.compile(r"^(.*)_(\d{4})" + re.escape(file_ending) + r"$")
    cases: dict[str, dict[int, str]] = {}
    for name in sorted(os.listdir(input_folder)):
        match = pattern.match(name)
        if match:
            channel = int(match.group(2))
            if channel >= num_channels:
                raise InputError(f"{name}: channel {channel:04d} does not exist; the model has {num_channels} "
                                 f"channels (_0000.._{num_channels - 1:04d})")
            cases.setdefault(match.group(1), {})[channel] = os.path.join(input_folder, name)
    if not cases:
        raise MissingCaseFileError(f"no files named <case>_<XXXX>{file_ending} in {input_folder}")
    for case, channels in cases.items():
        absent = [c for c in range(num_channels) if c not in channels and c not in optional_channels]
        if absent:
            raise MissingCaseFileError(f"case {case!r} lacks channel file(s) "
                                       f"{[f'{case}_{c:04d}{file_ending}' for c in absent]} in {input_folder}")
    return cases


def resolve_modalities(refs: Sequence[str | int], channel_names: dict[str, str]) -> list[int]:
    """Channel indices for names (``channel_names`` values, case-insensitive) or indices.

    Raises:
        InputError: naming the unknown modality and the known ones.
    """
    names = [channel_names[k] for k in sorted(channel_names, key=int)]
    out = []
    for ref in refs:
        text = str(ref)
        if text.isdigit() and int(text) < len(names):
            out.append(int(text))
            continue
        matches = [i for i, n in enumerate(names) if n.lower() == text.lower()]
        if len(matches) != 1:
            raise InputError(f"unknown or ambiguous modality {ref!r}; the model's channels are {names} "
                             f"(names or indices 0..{len(names) - 1})")
        out.append(matches[0])
    return sorted(set(out))


def fill_missing_channels(cases: dict[str, dict[int, str]], missing: Sequence[int], num_channels: int,
                          reader_writer, file_ending: str, folder: str) -> list[list[str]]:
    """One file list per case (nnU-Net's ``list_of_lists``); missing channels become zero images in ``folder``."""
    lists = []
    for case, files in cases.items():
        present = [c for c in range(num_channels) if c not in missing]
        reference = files[present[0]]
        row = []
        for channel in range(num_channels):
            if channel in missing:
                image, properties = reader_writer.read_images([reference])
                path = os.path.join(folder, f"{case}_{channel:04d}{file_ending}")
                # write_seg writes an array on the reference geometry; zeros are a valid image for the reader
                reader_writer.write_seg(np.zeros(image.shape[1:], dtype=np.uint8), path, properties)
                row.append(path)
            else:
                row.append(files[channel])
        lists.append(row)
    return lists


def load_predictor(folder: str, folds: Sequence[int | str] | None, checkpoint_name: str, device: str,
                   use_mirroring: bool, tile_step_size: float = 0.5):
    """nnU-Net's predictor initialised from a training output folder (trainer looked up by name)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    ensure_trainer_lookup()
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                device=torch.device(device), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, folds, checkpoint_name)
    return predictor


def predict_folder(input_folder: str, output_folder: str, folder: str, folds: Sequence[int | str] | None = None,
                   missing: Sequence[str | int] = (), checkpoint_name: str = "checkpoint_final.pth",
                   device: str = "cuda", use_mirroring: bool = True, tile_step_size: float = 0.5,
                   num_processes_preprocessing: int = 1, num_processes_export: int = 1,
                   missing_mode: str = "messages-off") -> list[str]:
    """Predict every case in ``input_folder`` into ``output_folder``; returns the case identifiers.

    Args:
        missing: modalities (channel names or indices) that are not available.
        missing_mode: one of :data:`MISSING_MODES` (module docstring).

    Raises:
        InputError: an unknown mode or modality, or every channel missing; with ``"messages-off"``, a primary
            modality or a model that is not a CIML model. Raised before anything is written.
        MissingCaseFileError: a case lacks a channel that is not declared missing.
    """
    from nnunet_ext.inputs import load_json_file

    if missing_mode not in MISSING_MODES:
        raise InputError(f"missing_mode must be one of {MISSING_MODES}, got {missing_mode!r}")
    # the model's dataset.json (what the predictor will load) decides channels and file names: checked first
    dataset_json = load_json_file(os.path.join(folder, "dataset.json"), "model dataset file")
    num_channels = len(dataset_json["channel_names"])
    missing_idx = resolve_modalities(missing, dataset_json["channel_names"]) if missing else []
    if len(missing_idx) == num_channels:
        raise InputError(f"every input channel is declared missing ({missing}); at least one must be present")
    file_ending = dataset_json["file_ending"]
    cases = group_case_files(input_folder, file_ending, num_channels, optional_channels=missing_idx)
    predictor = load_predictor(folder, folds, checkpoint_name, device, use_mirroring, tile_step_size)
    if missing_idx and missing_mode == "messages-off":
        network = predictor.network
        if not hasattr(network, "set_missing_modalities"):
            raise InputError(f"switching messages off needs a CIML model; {predictor.trainer_name or 'this model'} "
                             f"builds {type(network).__name__}. Use --missing-mode zero-fill to feed all-zero "
                             f"images for the missing channels instead")
        network.set_missing_modalities(missing_idx)
    os.makedirs(output_folder, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ciml_missing_") as tmp:
        lists = fill_missing_channels(cases, missing_idx, num_channels,
                                      predictor.plans_manager.image_reader_writer_class(), file_ending, tmp)
        outputs = [str(Path(output_folder) / case) for case in cases]
        predictor.predict_from_files(lists, outputs, save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=num_processes_preprocessing,
                                     num_processes_segmentation_export=num_processes_export)
    return list(cases)
