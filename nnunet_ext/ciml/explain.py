"""``nnunet-ext explain``: where and how much each auxiliary modality's messages changed each subtask.

For every case and every message (sender a -> subtask k) this writes, aligned with the input image:

* ``<case>__<a>-to-<k>__attention.nii.gz``: alpha, the cross-modal spatial attention (where the receiver accepted
  information), averaged over the message stages after upsampling to the patch grid;
* ``<case>__<a>-to-<k>__magnitude.nii.gz``: ||m||_2 over channels of the accepted message alpha * P(z) (how much
  was added to the primary features), averaged over stages;
* ``<case>__<a>-to-<k>.png``: a representative slice (largest message magnitude) of the sender's image with both
  maps overlaid;

plus ``contributions.csv``: per case and pair, the mean attention, mean magnitude, mean KL density (nats) and the
sender's share of the message magnitude received by the subtask, over the whole image and inside the subtask's
predicted segmentation; rows with case ``ALL`` average over cases (the sender x subtask relation matrix).

nnU-Net's preprocessing (``preprocessor.run_case``), sliding-window tiling and Gaussian (accumulated in fp32; no
mirroring; maps of the first fold) and its resampling back to the original geometry (``resampling_fn_probabilities``,
un-cropping, un-transposing) are reused. Design decision: magnitudes/attention instead of the spec's optional Grad-CAM.
"""
from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from nnunet_ext.ciml.network import CIMLNet, upsample_to
from nnunet_ext.ciml.predict import group_case_files, load_predictor
from nnunet_ext.errors import InputError

MAP_KINDS = ("attention", "magnitude", "kl")


class ExplanationMaps(nn.Module):
    """Wraps an eval-mode :class:`CIMLNet`: ``x [B, M, *patch]`` -> ``[B, 3 * n_pairs, *patch]`` maps, channel
    ``3 * i + j`` = kind ``MAP_KINDS[j]`` of pair ``pair_names[i]`` (stage-averaged, upsampled to the patch)."""

    def __init__(self, network: CIMLNet) -> None:
        super().__init__()
        self.network = network

    @property
    def num_maps(self) -> int:
        return len(MAP_KINDS) * len(self.network.pair_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self.network.message_tensors(x)
        maps = []
        for name in self.network.pair_names:
            pair = tensors.get(name, {})
            for kind in MAP_KINDS:
                stages = [upsample_to(v, x.shape[2:]) for k, v in pair.items() if k.startswith(kind + "@")]
                maps.append(torch.stack(stages).mean(0) if stages else x.new_zeros((x.shape[0], 1, *x.shape[2:])))
        return torch.cat(maps, 1)


@torch.no_grad()
def sliding_window_maps(predictor, wrapper: ExplanationMaps, data: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted sliding window of ``wrapper`` over preprocessed ``data [M, *shape]`` -> maps
    ``[C, *shape]``, with nnU-Net's padding, tile positions and Gaussian but an fp32 accumulator (nnU-Net's
    predictor accumulates in fp16, which message magnitudes and KL densities of an untrained model can overflow)."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    patch = tuple(predictor.configuration_manager.patch_size)
    padded, revert = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    slicers = predictor._internal_get_sliding_window_slicers(padded.shape[1:])
    gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=1, dtype=torch.float32,
                                device=torch.device("cpu"))
    maps = torch.zeros((wrapper.num_maps, *padded.shape[1:]), dtype=torch.float32)
    weights = torch.zeros(padded.shape[1:], dtype=torch.float32)
    for slicer in slicers:
        tile = padded[slicer][None].to(predictor.device)
        maps[slicer] += wrapper(tile)[0].float().cpu() * gaussian
        weights[slicer[1:]] += gaussian
    maps /= weights
    return maps[(slice(None), *revert[1:])]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def maps_to_original_geometry(maps: np.ndarray, properties: dict, plans_manager, configuration_manager
                              ) -> np.ndarray:
    """Preprocessed-grid maps ``[C, *shape]`` -> original image grid, as nnU-Net exports probabilities."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    shape_after_crop = properties["shape_after_cropping_and_before_resampling"]
    current_spacing = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape_after_crop) \
        else [spacing_transposed[0], *configuration_manager.spacing]
    resampled = configuration_manager.resampling_fn_probabilities(maps, shape_after_crop, current_spacing,
                                                                  spacing_transposed)
    resampled = resampled.cpu().numpy() if isinstance(resampled, torch.Tensor) else np.asarray(resampled)
    full = np.zeros((maps.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
    for c in range(maps.shape[0]):
        full[c] = insert_crop_into_image(full[c], resampled[c].astype(np.float32),
                                         properties["bbox_used_for_cropping"])
    return full.transpose([0] + [i + 1 for i in plans_manager.transpose_backward])


def write_float_image(array: np.ndarray, path: str, properties: dict) -> None:
    """Write a float map on the geometry nnU-Net's SimpleITK reader recorded (``sitk_stuff``); other readers get
    the voxel spacing only."""
    import SimpleITK as sitk

    stuff = properties.get("sitk_stuff")
    if stuff is not None and len(stuff["spacing"]) == 2:
        array = array[0]
    image = sitk.GetImageFromArray(array.astype(np.float32))
    if stuff is not None:
        image.SetSpacing(stuff["spacing"])
        image.SetOrigin(stuff["origin"])
        image.SetDirection(stuff["direction"])
    else:
        image.SetSpacing([float(s) for s in properties["spacing"]][::-1][: image.GetDimension()])
    sitk.WriteImage(image, path, True)


def _subtask_masks(segmentation: np.ndarray, probabilities: np.ndarray, network: CIMLNet,
                   label_manager) -> list[np.ndarray]:
    """Predicted voxels of each subtask on the original grid: any owned region above 0.5 (regions), an owned label
    (labels), any foreground (the automatic default's single subtask)."""
    masks = []
    for subtask in network.subtasks:
        if network.output_mode == "direct":
            masks.append(segmentation > 0)
        elif label_manager.has_regions:
            masks.append(np.any(probabilities[list(subtask.out_channels)] > 0.5, axis=0))
        else:
            masks.append(np.isin(segmentation, [label_manager.all_labels[c] for c in subtask.out_channels]))
    return masks


def _overlay_png(background: np.ndarray, attention: np.ndarray, magnitude: np.ndarray, title: str,
                 path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=80)
    for ax, overlay, label, cmap in ((axes[0], attention, "attention", "viridis"),
                                     (axes[1], magnitude, "message magnitude", "magma")):
        ax.imshow(background, cmap="gray")
        shown = ax.imshow(overlay, cmap=cmap, alpha=0.5)
        fig.colorbar(shown, ax=ax, fraction=0.046)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    plt.close(fig)


def explain_folder(input_folder: str, output_folder: str, folder: str, folds: Sequence[int | str] | None = None,
                   checkpoint_name: str = "checkpoint_final.pth", device: str = "cuda",
                   tile_step_size: float = 0.5) -> str:
    """Write maps, overlays and ``contributions.csv`` for every case in ``input_folder``; returns the CSV path.

    Raises:
        InputError: the model is not a CIML model, or it has no messages (e.g. ``CIMLTrainer_noMessages``).
    """
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    predictor = load_predictor(folder, folds, checkpoint_name, device, use_mirroring=False,
                               tile_step_size=tile_step_size)
    network = predictor.network
    if not isinstance(getattr(network, "pair_names", None), list):
        raise InputError(f"explain needs a CIML model; this one builds {type(network).__name__}")
    if not network.pair_names:
        raise InputError("this CIML model has no messages (noMessages variant or no auxiliary modalities); "
                         "there is nothing to explain")
    network.load_state_dict(predictor.list_of_parameters[0])
    network.eval()
    plans_manager, configuration_manager = predictor.plans_manager, predictor.configuration_manager
    dataset_json, label_manager = predictor.dataset_json, predictor.label_manager
    # plans without a CIML block (automatic default) know channels by index only; name them for the outputs
    network.modality_names = [dataset_json["channel_names"][k] for k in sorted(dataset_json["channel_names"], key=int)]
    num_channels = len(dataset_json["channel_names"])
    cases = group_case_files(input_folder, dataset_json["file_ending"], num_channels)
    reader = plans_manager.image_reader_writer_class()
    wrapper = ExplanationMaps(network)
    os.makedirs(output_folder, exist_ok=True)
    rows = []
    for case, files in cases.items():
        file_list = [files[c] for c in range(num_channels)]
        preprocessor = configuration_manager.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case(file_list, None, plans_manager, configuration_manager,
                                                    dataset_json)
        data = torch.from_numpy(data).float()
        logits = predictor.predict_logits_from_preprocessed_data(data)
        segmentation, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, plans_manager, configuration_manager, label_manager, properties, return_probabilities=True)
        maps = sliding_window_maps(predictor, wrapper, data).numpy()
        maps = maps_to_original_geometry(maps, properties, plans_manager, configuration_manager)
        masks = _subtask_masks(segmentation, probabilities, network, label_manager)
        images = {c: reader.read_images([files[c]])[0][0] for c in range(num_channels)}
        received: dict[int, float] = {}
        case_rows = []
        for i, ((sender, k), name) in enumerate(zip(network.pairs, network.pair_names)):
            attention, magnitude, kl = maps[3 * i], maps[3 * i + 1], maps[3 * i + 2]
            subtask = network.subtasks[k].name
            stem = f"{_safe(case)}__{_safe(network.modality_names[sender])}-to-{_safe(subtask)}"
            write_float_image(attention, os.path.join(output_folder, stem + "__attention.nii.gz"), properties)
            write_float_image(magnitude, os.path.join(output_folder, stem + "__magnitude.nii.gz"), properties)
            axis0 = magnitude.reshape(magnitude.shape[0], -1).sum(1)
            index = int(np.argmax(axis0)) if magnitude.ndim == 3 else 0
            pick = (lambda a: a[index]) if magnitude.ndim == 3 else (lambda a: a)
            _overlay_png(pick(images[sender]), pick(attention), pick(magnitude),
                         f"{case}: {name} (slice {index})", os.path.join(output_folder, stem + ".png"))
            mask = masks[k]
            received[k] = received.get(k, 0.0) + float(magnitude.mean())
            case_rows.append({
                "case": case, "subtask": subtask, "sender": network.modality_names[sender],
                "mean_attention": float(attention.mean()), "mean_magnitude": float(magnitude.mean()),
                "mean_kl": float(kl.mean()),
                "mean_magnitude_in_prediction": float(magnitude[mask].mean()) if mask.any() else float("nan"),
                "_k": k})
        for row in case_rows:
            total = received[row["_k"]]
            row["magnitude_share"] = row["mean_magnitude"] / total if total > 0 else float("nan")
        rows.extend(case_rows)
    fields = ["case", "subtask", "sender", "mean_attention", "mean_magnitude", "magnitude_share", "mean_kl",
              "mean_magnitude_in_prediction"]
    summary = []
    for name, (sender, k) in zip(network.pair_names, network.pairs):
        pair_rows = [r for r in rows if r["sender"] == network.modality_names[sender] and r["_k"] == k]
        summary.append({"case": "ALL", "subtask": network.subtasks[k].name, "sender": network.modality_names[sender],
                        **{f: float(np.nanmean([r[f] for r in pair_rows])) for f in fields[3:]}})
    path = os.path.join(output_folder, "contributions.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows + summary)
    return path
