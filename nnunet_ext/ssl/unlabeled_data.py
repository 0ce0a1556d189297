"""Dataset, loader and augmenter for preprocessed unlabeled images (semi-supervised trainers).

The loader reuses nnU-Net's patch sampling and training augmentation unchanged. Since there is no label, the
segmentation slot carries an in-memory *validity map* through the transforms so that the consumer knows which
output voxels show real image content:

- ``VALID`` (1): inside the image.
- ``PADDED`` (-1): padding added by the loader (``crop_and_pad_nd``), i.e. nnU-Net's seg padding value.
  ``SpatialTransform`` pads rotated-in areas with the same -1, ``MaskImageTransform`` zeroes the image there and
  ``RemoveLabelTansform(-1, 0)`` turns it into 0: exactly the treatment padding gets in labelled batches.
- ``OUTSIDE_NONZERO`` (-2): inside the image but outside the non-zero mask, only for configurations with
  ``use_mask_for_norm``. Negative, so ``MaskImageTransform`` zeroes the image there as it does for labelled cases
  (whose stored seg is -1 there); not -1, so it stays valid.

``valid = (map == VALID) | (map == OUTSIDE_NONZERO)``; after nnU-Net's transforms padded voxels are 0, before
them -1, so both are invalid. Nothing is written to disk and the map is not a label.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import blosc2
import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.utilities.file_and_folder_operations import join, load_pickle
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from threadpoolctl import threadpool_limits

from nnunet_ext.ssl.unlabeled_preprocessing import (
    load_unlabeled_manifest,
    preprocessing_signature,
    save_unlabeled_case,
    unlabeled_folder,
)

VALID = 1
PADDED = -1
OUTSIDE_NONZERO = -2


def validity_from_map(validity_map: torch.Tensor) -> torch.Tensor:
    """Boolean validity from a (transformed or raw) validity map; same shape."""
    return (validity_map == VALID) | (validity_map == OUTSIDE_NONZERO)


class UnlabeledDataset(nnUNetBaseDataset):
    """Preprocessed unlabeled cases: ``<case>.b2nd`` (data ``[C, *spatial]``) + ``<case>.pkl``, no segmentation.

    Args:
        folder: a ``<data_identifier>__unlabeled`` folder.
        identifiers: cases to use (default: every ``.b2nd`` in the folder).
    """

    def __init__(self, folder: str, identifiers: list[str] | None = None):
        super().__init__(folder, identifiers, None)
        # as nnUNetDatasetBlosc2: decompression threads would compete with the augmentation workers
        blosc2.set_nthreads(1)
        # mmap does not work on Windows (nnU-Net issue #2723)
        self.mmap_kwargs = {} if os.name == "nt" else {"mmap_mode": "r"}

    def load_case(self, identifier: str) -> tuple[Any, None, None, dict]:
        """Returns ``(data, None, None, properties)``; data is a read-only blosc2 array ``[C, *spatial]``."""
        data = blosc2.open(urlpath=join(self.source_folder, identifier + ".b2nd"), mode="r",
                           dparams={"nthreads": 1}, **self.mmap_kwargs)
        properties = load_pickle(join(self.source_folder, identifier + ".pkl"))
        return data, None, None, properties

    @staticmethod
    def save_case(data: np.ndarray, seg: np.ndarray | None, properties: dict, output_filename_truncated: str,
                  patch_size: Sequence[int] | None = None) -> None:
        """Write one case (see :func:`save_unlabeled_case`); ``seg`` must be None."""
        if seg is not None:
            raise ValueError("Unlabeled cases are stored without segmentation; pass seg=None.")
        save_unlabeled_case(data, properties, output_filename_truncated, patch_size)

    @staticmethod
    def get_identifiers(folder: str) -> list[str]:
        """Every ``<case>.b2nd`` of the folder, sorted."""
        return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))


class UnlabeledDataLoader(nnUNetDataLoader):
    """nnU-Net's patch loader for unlabeled cases: random crops only, validity map instead of a segmentation.

    Batches are ``{'data': float32 [B, C, *final_patch], 'valid': bool [B, 1, *final_patch], 'keys': list[str]}``
    (no ``target``). 2D patch sizes are handled like the base class (pseudo-3D ``(1, h, w)`` crops of one slice).

    Args:
        data: the unlabeled dataset.
        batch_size: samples per batch (drawn with replacement, like nnU-Net).
        patch_size: crop size before augmentation (nnU-Net's ``initial_patch_size`` when transforms are used).
        final_patch_size: the configuration's patch size (what the transforms output).
        label_manager: only needed by the base constructor; a background-only one is made if None.
        pad_sides: extra padding, as in the base class.
        transforms: nnU-Net training transforms built with ``regions=None``, ``deep_supervision_scales=None``,
            ``is_cascaded=False``, or None/identity.
        nonzero_mask_channels: channels normalised with ``use_mask_for_norm``; their voxels outside the non-zero
            mask are exactly 0 after normalisation, which is how the mask is recovered (see module doc). Exact
            unless the data was resampled (then a thin rim outside the mask may count as inside).
    """

    def __init__(self, data: UnlabeledDataset, batch_size: int, patch_size: Sequence[int],
                 final_patch_size: Sequence[int], label_manager: LabelManager | None = None,
                 pad_sides: Sequence[int] | None = None, transforms: Any = None,
                 nonzero_mask_channels: Sequence[int] | None = None):
        if len(data.identifiers) == 0:
            raise ValueError(f"No unlabeled cases in {data.source_folder}.")
        if label_manager is None:
            label_manager = LabelManager({"background": 0}, regions_class_order=None)
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=pad_sides,
                         probabilistic_oversampling=False, transforms=transforms)
        # no annotations exist: with an ignore label the base get_bbox would draw even random patches from
        # properties['class_locations'], which are empty here
        self.has_ignore = False
        self.nonzero_mask_channels = list(nonzero_mask_channels or [])

    def generate_train_batch(self) -> dict:
        # The base method cannot be reused: it reads properties['class_locations'] and crops a stored seg array.
        # This loop mirrors it with a validity map in the seg slot.
        selected_keys = [str(k) for k in self.get_indices()]
        data_all = valid_all = None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(selected_keys):
                data, _, _, _ = self._data.load_case(key)
                shape = data.shape[1:]
                bbox_lbs, bbox_ubs = self.get_bbox(shape, False, None)
                bbox = [[lb, ub] for lb, ub in zip(bbox_lbs, bbox_ubs)]
                data_cropped = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                # a zero-stride view of ones stands in for the image-sized map: only the crop is materialised
                ones = np.broadcast_to(np.int16(VALID), (1, *shape))
                validity = torch.from_numpy(np.array(crop_and_pad_nd(ones, bbox, PADDED), dtype=np.int16))
                if self.nonzero_mask_channels:
                    outside = (data_cropped[self.nonzero_mask_channels] == 0).all(0, keepdim=True)
                    validity[outside & (validity == VALID)] = OUTSIDE_NONZERO
                if self.patch_size_was_2d:
                    data_cropped, validity = data_cropped[:, 0], validity[:, 0]

                if self.transforms is not None:
                    transformed = self.transforms(image=data_cropped, segmentation=validity)
                    data_sample, validity = transformed["image"], transformed["segmentation"]
                    if isinstance(validity, (list, tuple)):
                        raise ValueError("Unlabeled transforms must be built with deep_supervision_scales=None.")
                else:
                    data_sample = data_cropped

                if data_all is None:
                    data_all = torch.empty((self.batch_size, *data_sample.shape), dtype=torch.float32)
                    valid_all = torch.empty((self.batch_size, *validity.shape), dtype=torch.bool)
                data_all[j] = data_sample
                valid_all[j] = validity_from_map(validity)
        return {"data": data_all, "valid": valid_all, "keys": selected_keys}


def build_unlabeled_augmenter(trainer: Any, batch_size: int | None = None, num_processes: int | None = None):
    """Unlabeled loader wrapped in an augmenter, configured like the trainer's own training loader.

    Uses the trainer's configuration (patch size, ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``,
    ``get_training_transforms``) exactly as ``nnUNetTrainer.get_dataloaders`` does, except ``regions=None``,
    ``deep_supervision_scales=None`` and ``is_cascaded=False`` (there is no target to convert or downsample).
    The folder is ``<preprocessed_dataset_folder_base>/<data_identifier>__unlabeled``; its manifest must match
    the data identifier and preprocessing settings (a derived plans file with the same data identifier is
    accepted).

    Args:
        trainer: an ``nnUNetTrainer`` (its ``__init__`` has run; ``initialize()`` sets ``batch_size``).
        batch_size: default ``trainer.batch_size`` (1:1 with labelled batches).
        num_processes: augmentation workers; default ``max(1, nnUNet_n_proc_DA // 2)``, and a
            ``SingleThreadedAugmenter`` when ``nnUNet_n_proc_DA`` is 0. 0 forces single-threaded.

    Returns:
        ``SingleThreadedAugmenter`` or ``NonDetMultiThreadedAugmenter`` yielding :class:`UnlabeledDataLoader`
        batches. Multi-threaded ones must be finished with ``_finish()`` (e.g. in ``on_train_end``).

    Raises:
        RuntimeError: missing/empty/mismatching unlabeled folder (names ``nnunet-ext preprocess-unlabeled``).
    """
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    plans_manager, configuration_manager = trainer.plans_manager, trainer.configuration_manager
    if trainer.preprocessed_dataset_folder_base is None:
        raise RuntimeError("nnUNet_preprocessed is not set; cannot locate the unlabeled folder.")
    folder = unlabeled_folder(trainer.preprocessed_dataset_folder_base, configuration_manager.data_identifier)
    manifest = load_unlabeled_manifest(
        folder, plans_manager.plans_name, trainer.configuration_name, configuration_manager.data_identifier,
        expected_preprocessing=preprocessing_signature(plans_manager, configuration_manager))
    dataset = UnlabeledDataset(folder, list(manifest["cases"]))

    rotation_for_da, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    patch_size = configuration_manager.patch_size
    transforms = trainer.get_training_transforms(
        patch_size, rotation_for_da, None, mirror_axes, do_dummy_2d_data_aug,
        use_mask_for_norm=configuration_manager.use_mask_for_norm,
        is_cascaded=False, foreground_labels=trainer.label_manager.foreground_labels,
        regions=None, ignore_label=trainer.label_manager.ignore_label)
    if batch_size is None:
        batch_size = getattr(trainer, "batch_size", None) or configuration_manager.batch_size
    loader = UnlabeledDataLoader(
        dataset, batch_size, initial_patch_size, patch_size, trainer.label_manager, transforms=transforms,
        nonzero_mask_channels=[c for c, m in enumerate(configuration_manager.use_mask_for_norm) if m])

    if num_processes is None:
        allowed = get_allowed_n_proc_DA()
        # half the labelled loader's workers: two augmenters share the CPU and memory
        num_processes = 0 if allowed == 0 else max(1, allowed // 2)
    if num_processes == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=num_processes,
                                        num_cached=max(3, num_processes // 2), seeds=None,
                                        pin_memory=trainer.device.type == "cuda", wait_time=0.002)
