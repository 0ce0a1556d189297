"""``CFCMLTrainerCore``: the hooks behind ``CFCMLTrainer`` (the classes in ``trainers/cfcml_trainers.py`` only
name variants).

Per step: one encoder pass per image group feeds nnU-Net's decoder (segmentation loss, weight ``w_seg``; 0 for
mask-free datasets) and the CFCML classification path (CE + HRM terms in fp32). Batches are class-balanced.
After every ``cls_val_every`` epochs all validation cases are classified (one centred patch per case) and
``checkpoint_best_cls.pth`` follows the validation AUC; after training ``validation_cls.csv`` and
``validation_cls_summary.json`` are written into the fold folder.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_ext.cfcml.configure import (
    DEFAULT_SETTINGS,
    apply_block,
    raw_dataset_folder,
    resolve_cfcml_block,
    write_stratified_splits,
)
from nnunet_ext.cfcml.configured_table import TABLE_RECORD_KEY, configured_csv, require_unchanged_source
from nnunet_ext.cfcml.data import crop_or_pad_to_patch, foreground_centre
from nnunet_ext.cfcml.losses import HierarchicalAnchorLoss
from nnunet_ext.cfcml.metrics import classification_metrics
from nnunet_ext.cfcml.network import CFCMLNet, encoder_kwargs_from_plans
from nnunet_ext.cfcml.sampler import BalancedClassDataLoader, check_balanced_batch_size
from nnunet_ext.cfcml.schedule import CFCMLLRScheduler
from nnunet_ext.cfcml.tabular import TABULAR_CSV, TabularDataError, TabularSchema, TabularTable, fit_numeric_stats
from nnunet_ext.compat import unwrap
from nnunet_ext.plans import merge_settings
from nnunet_ext.training.base_trainer import ExtTrainerBase
from nnunet_ext.training.distributed import (
    all_gather_concat,
    all_gather_objects,
    all_gather_with_grad,
    rank,
    world_size,
)
from nnunet_ext.training.logging import log_epoch_values, register_log_keys
from nnunet_ext.training.step import autocast_context, fp32_context

CLS_LOG_KEYS = ("cfcml_val_auc", "cfcml_val_bacc", "cfcml_val_acc", "cfcml_val_f1_macro")


def effective_settings(block: dict, overrides: dict) -> dict[str, Any]:
    """The plans' resolved settings with a variant's ``cfcml_overrides`` applied (unknown keys are errors)."""
    return merge_settings(block["settings"], overrides, "cfcml_overrides")


def build_cfcml_network(block: dict, overrides: dict, configuration_manager, num_output_channels: int,
                        enable_deep_supervision: bool) -> CFCMLNet:
    """``CFCMLNet`` from the plans' CFCML block and configuration (what training and both predictors build)."""
    settings = effective_settings(block, overrides)
    schema = TabularSchema.from_dict(block["schema"])
    patch_size = list(configuration_manager.patch_size)
    is_3d = len(patch_size) == 3
    encoder_kwargs, decoder_convs = encoder_kwargs_from_plans(configuration_manager, settings["width_factor"])
    return CFCMLNet(
        encoder_kwargs, decoder_convs, num_output_channels, patch_size, settings["image_groups"], schema.num_classes,
        vocabulary_sizes=schema.vocabulary_sizes, num_numeric=len(schema.numeric_fields), d=settings["d"],
        heads=settings["heads"],
        num_latents_image=settings["num_latents_image"] or (48 if is_3d else 32),
        num_latents_tabular=settings["num_latents_tabular"] or (16 if is_3d else 24),
        max_tokens=settings["max_tokens"], token_conv_kernel=settings["token_conv_kernel"],
        tabular_embed_dim=settings["tabular_embed_dim"], dropout=settings["dropout"],
        num_granularities=settings["num_granularities"], share_encoders=settings["share_branch_encoders"],
        modalities=settings["modalities"], fusion=settings["fusion"], deep_supervision=enable_deep_supervision)


def load_table(block: dict, preprocessed_folder: str, raw_folder: str | None) -> TabularTable:
    """The dataset's table encoded with the plans' frozen schema: the copy these plans were configured with
    (for plans configured before per-plans copies: the shared copy, else the raw table)."""
    schema = TabularSchema.from_dict(block["schema"])
    candidates = [configured_csv(block, preprocessed_folder)]
    if TABLE_RECORD_KEY not in block and raw_folder:
        candidates.append(os.path.join(raw_folder, TABULAR_CSV))
    for path in candidates:
        if os.path.isfile(path):
            return TabularTable.from_csv(schema, path)
    raise TabularDataError(f"{candidates[0]} not found (the table these plans were configured with); run nnunet-ext "
                           f"configure cfcml again for these plans with --overwrite")


class CFCMLTrainerCore(ExtTrainerBase):
    """CFCML (coarse-to-fine crossmodal learning) image + tabular classification on nnU-Net.

    Hyper-parameters come from the plans block written by ``nnunet-ext configure cfcml`` (see
    :data:`nnunet_ext.cfcml.configure.DEFAULT_SETTINGS`); without it, the same resolution runs with defaults
    when the trainer is created and the block is stored in the plans copied to the results folder. Variants
    change settings through ``cfcml_overrides``.

    ``num_iterations_per_epoch`` defaults to ⌈majority-class training cases / (B/K)⌉ and
    ``num_val_iterations_per_epoch`` to 1 for mask-free datasets (the pseudo Dice is meaningless there), else
    ⌈validation cases / B⌉; a subclass may set either in ``__init__``.
    """

    method_family: ClassVar[str] = "cfcml"
    # DDP (docs/ddp.md 4.3): class-balanced batches per rank (the global batch is balanced too); the HRM prototypes
    # come from every rank's features (differentiable gather, every rank computes the same HRM loss); CE stays per
    # rank; the forward bypasses the DDP wrapper (it has no forward_all), so the shared step averages the
    # gradients; validation cases are split over the ranks and the predictions gathered.
    supports_ddp: ClassVar[bool] = True
    task_kind: ClassVar[str] = "classification"
    extra_log_keys: ClassVar[tuple[str, ...]] = ("cfcml_ce", "cfcml_l_sam", "cfcml_l_up", "cfcml_l_cp",
                                                 "cfcml_l_seg")
    cfcml_overrides: ClassVar[dict[str, Any]] = {}
    #: False skips nnU-Net's segmentation validation after training (classification validation always runs);
    #: ``nnunet-ext benchmark-cls`` sets it in its generated budget trainers.
    segmentation_validation: ClassVar[bool] = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.raw_folder = raw_dataset_folder(self.plans_manager.plans)
        block = self.method_settings(self.plans_manager)
        if not block:
            # no configure run: resolve with defaults now and store the block in the plans, which nnU-Net copies
            # to the results folder, so that prediction rebuilds exactly this network
            block, batch_sizes = resolve_cfcml_block(self.plans_manager.plans, {},
                                                     self.preprocessed_dataset_folder_base, self.raw_folder)
            apply_block(self.plans_manager.plans, block, batch_sizes)
            self.print_to_log_file("No CFCML block in the plans: resolved the tabular schema and settings with "
                                   "defaults (run nnunet-ext configure cfcml to choose them)")
        # before any work: a raw table edited after configure would otherwise be ignored without a word
        require_unchanged_source(block, self.preprocessed_dataset_folder_base, self.raw_folder,
                                 self.plans_manager.dataset_name, self.plans_manager.plans_name)
        batch_size = self.plans_manager.plans["configurations"][configuration].get("batch_size")
        if batch_size is not None:
            self.configuration_manager.configuration["batch_size"] = batch_size
        self.cfcml_block = block
        self.settings = effective_settings(block, self.cfcml_overrides)
        self.schema = TabularSchema.from_dict(block["schema"])
        self.num_classes = self.schema.num_classes
        self.num_epochs = int(self.settings["num_epochs"])
        self.initial_lr = float(self.settings["initial_lr"])
        self.weight_decay = float(self.settings["weight_decay"])
        # with real lesion masks every patch is centred on the lesion (it must cover the ROI to classify)
        self.oversample_foreground_percent = 0.0 if self.settings["mask_free"] else 1.0
        self.num_iterations_per_epoch = None  # resolved in initialize() unless a subclass sets it
        self.num_val_iterations_per_epoch = None
        self.hrm = HierarchicalAnchorLoss(self.settings["tau"], self.settings["cross_modal_negatives"])
        self.best_val_auc: float | None = None
        self.table: TabularTable | None = None

    # ------------------------------------------------------------------ set-up
    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> CFCMLNet:
        block = cls.method_settings(plans_manager)
        if not block:
            raise RuntimeError(f"{cls.__name__} needs the CFCML block in the plans (plans "
                               f"{plans_manager.plans_name}); run: nnunet-ext configure cfcml -d DATASET -p "
                               f"{plans_manager.plans_name}, then train with the derived plans")
        return build_cfcml_network(block, cls.cfcml_overrides, configuration_manager, num_output_channels,
                                   enable_deep_supervision)

    def _do_i_compile(self) -> bool:
        # per-class masks are compile-friendly, but the classification path is untested with inductor: opt in only
        return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t") and super()._do_i_compile()

    def initialize(self) -> None:
        check_balanced_batch_size(self.configuration_manager.batch_size, self.num_classes)
        self.check_ddp_batch_size()
        unknown = set(self.cfcml_overrides) - set(DEFAULT_SETTINGS)
        if unknown:
            raise KeyError(f"{type(self).__name__}.cfcml_overrides has unknown keys {sorted(unknown)}")
        super().initialize()
        self.table = load_table(self.cfcml_block, self.preprocessed_dataset_folder_base, self.raw_folder)
        tr_keys, val_keys = self.do_split()
        self.table.require(list(tr_keys) + list(val_keys), labelled=True)
        counts = np.bincount(self.table.labels(tr_keys).numpy(), minlength=self.num_classes)
        if (counts == 0).any():
            absent = [self.schema.classes[c] for c in np.flatnonzero(counts == 0)]
            raise TabularDataError(f"fold {self.fold}: class(es) {absent} have no training case; use a stratified "
                                   f"split (nnunet-ext configure cfcml writes one)")
        if self.schema.numeric_fields:
            mean, std = fit_numeric_stats(self.table, tr_keys)  # training fold only: no leakage
            unwrap(self.network).set_numeric_stats(mean, std)
        per_class = self.configuration_manager.batch_size // self.num_classes
        if self.num_iterations_per_epoch is None:
            self.num_iterations_per_epoch = int(math.ceil(counts.max() / per_class))
        if self.num_val_iterations_per_epoch is None:
            self.num_val_iterations_per_epoch = 1 if self.settings["mask_free"] else max(
                1, int(math.ceil(len(val_keys) / self.configuration_manager.batch_size)))
        self.val_keys = list(val_keys)
        register_log_keys(self, CLS_LOG_KEYS)
        self.logger.local_logger.extra_keys = [*self.extra_log_keys, *CLS_LOG_KEYS]

    def check_ddp_batch_size(self) -> None:
        """Under DDP every rank draws its own class-balanced share: the global batch must split into balanced
        shares of at least two cases per class."""
        ranks, classes = world_size(), self.num_classes
        batch = self.configuration_manager.batch_size
        if ranks > 1 and (batch % (ranks * classes) or batch // ranks < 2 * classes):
            raise ValueError(
                f"CFCML under DDP draws class-balanced batches on every rank: the batch size {batch} must be a "
                f"multiple of {ranks} ranks x {classes} classes with at least {2 * classes} cases per rank (e.g. "
                f"{ranks * 2 * classes}); set the CFCML setting batch_size with nnunet-ext configure cfcml --config")

    def do_split(self):
        if self.fold != "all" and not os.path.isfile(
                os.path.join(self.preprocessed_dataset_folder_base, "splits_final.json")):
            table = self.table or load_table(self.cfcml_block, self.preprocessed_dataset_folder_base, self.raw_folder)
            if self.dataset_class is None:
                self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
            identifiers = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
            write_stratified_splits(self.preprocessed_dataset_folder_base, table, identifiers,
                                    seed=self.settings["split_seed"])
        return super().do_split()

    def configure_optimizers(self):
        # Adam with coupled L2 weight decay, as the official code (not AdamW)
        optimizer = torch.optim.Adam(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, CFCMLLRScheduler(optimizer, self.initial_lr, self.settings["faithful_warmup"])

    def get_dataloaders(self):
        """nnU-Net's loaders and transforms, with a class-balanced training loader (spec §7.4)."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        deep_supervision_scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        tr_transforms = self.get_training_transforms(
            patch_size, rotation, deep_supervision_scales, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        val_transforms = self.get_validation_transforms(
            deep_supervision_scales, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        class_of = {k: int(self.table.rows[k].label) for k in dataset_tr.identifiers}
        dl_tr = BalancedClassDataLoader(
            dataset_tr, self.batch_size, initial_patch_size, patch_size, self.label_manager,
            oversample_foreground_percent=self.oversample_foreground_percent, transforms=tr_transforms,
            probabilistic_oversampling=self.probabilistic_oversampling, class_of=class_of,
            num_classes=self.num_classes)
        dl_val = nnUNetDataLoader(
            dataset_val, self.batch_size, patch_size, patch_size, self.label_manager,
            oversample_foreground_percent=self.oversample_foreground_percent, transforms=val_transforms,
            probabilistic_oversampling=self.probabilistic_oversampling)
        workers = get_allowed_n_proc_DA()
        if workers == 0:
            gen_tr, gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            gen_tr = NonDetMultiThreadedAugmenter(dl_tr, None, workers, max(6, workers // 2), None, pin_memory=pin,
                                                  wait_time=0.002)
            gen_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, workers // 2), max(3, workers // 4), None,
                                                   pin_memory=pin, wait_time=0.002)
        next(gen_tr)
        next(gen_val)
        return gen_tr, gen_val

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        unwrap(self.network).deep_supervision = enabled

    # ------------------------------------------------------------------ training step
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        keys = list(batch["keys"])
        tab = self.table.batch(keys).to(self.device)
        labels = self.table.labels(keys).to(self.device)
        s = self.settings
        use_seg = s["w_seg"] > 0
        # unwrapped: the DDP wrapper has no forward_all (the shared step averages the gradients instead)
        segmentation, logits, features = unwrap(self.network).forward_all(batch["data"], tab,
                                                                           with_segmentation=use_seg)
        nan = torch.tensor(math.nan, device=self.device)
        with fp32_context(self.device):
            ce = F.cross_entropy(logits.float(), labels)
            total = ce
            if any(s[k] > 0 for k in ("w_sam", "w_up", "w_cp")):
                hrm_features, hrm_labels = features.float(), labels
                if world_size() > 1:
                    # prototypes of the global batch: [M, B_r, d] -> [sum B_r, M, d] (rank order) -> [M, B, d];
                    # every rank computes the same HRM loss, so the averaged gradient is one process's
                    hrm_features = all_gather_with_grad(hrm_features.transpose(0, 1).contiguous()).transpose(0, 1)
                    hrm_labels = all_gather_concat(labels)
                l_sam, l_up, l_cp = self.hrm(hrm_features, hrm_labels, self.num_classes)
                total = total + s["w_sam"] * l_sam + s["w_up"] * l_up + s["w_cp"] * l_cp
            else:
                l_sam = l_up = l_cp = nan
        if use_seg:
            l_seg = self.loss(segmentation, batch["target"])
            total = total + s["w_seg"] * l_seg
        else:
            l_seg = nan
        components = {"cfcml_ce": ce, "cfcml_l_sam": l_sam, "cfcml_l_up": l_up, "cfcml_l_cp": l_cp,
                      "cfcml_l_seg": l_seg}
        return total, {k: v.detach() for k, v in components.items()}

    # ------------------------------------------------------------------ classification validation
    def _classification_input(self, dataset, key: str) -> np.ndarray:
        data, seg, _, _ = dataset.load_case(key)
        centre = None
        if self.settings["crop"] == "lesion":
            centre = foreground_centre(np.asarray(seg))
        return crop_or_pad_to_patch(np.asarray(data), self.configuration_manager.patch_size, centre)

    @torch.no_grad()
    def predict_validation_cases(self, keys: list[str]) -> np.ndarray:
        """Softmax probabilities ``[N, K]`` of whole validation cases (one centred patch each), eval mode."""
        network = unwrap(self.network)
        was_training = network.training
        network.eval()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, keys)
        probabilities = []
        for start in range(0, len(keys), self.batch_size):
            chunk = keys[start:start + self.batch_size]
            x = torch.from_numpy(np.stack([self._classification_input(dataset, k) for k in chunk])).to(self.device)
            with autocast_context(self.device):
                logits = network.classify(x, self.table.batch(chunk).to(self.device))
            probabilities.append(torch.softmax(logits.float(), 1).cpu().numpy())
        network.train(was_training)
        return np.concatenate(probabilities) if probabilities else np.zeros((0, self.num_classes))

    def predict_validation_cases_on_all_ranks(self, keys: list[str]) -> np.ndarray:
        """:meth:`predict_validation_cases` with the cases split over the ranks (``keys[rank::N]``) and the
        predictions gathered: every rank returns the same ``[N, K]`` array in ``keys`` order (a collective)."""
        if world_size() == 1:
            return self.predict_validation_cases(keys)
        mine = keys[rank()::world_size()]
        by_key = dict(all_gather_objects(list(zip(mine, self.predict_validation_cases(mine)))))
        return np.stack([by_key[k] for k in keys]) if keys else np.zeros((0, self.num_classes))

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        values: dict[str, float] = {}
        if self.current_epoch % int(self.settings["cls_val_every"]) == 0 or self.current_epoch == self.num_epochs - 1:
            probabilities = self.predict_validation_cases_on_all_ranks(self.val_keys)
            metrics = classification_metrics(self.table.labels(self.val_keys).numpy(), probabilities,
                                             self.schema.classes)
            values = {"cfcml_val_auc": metrics["auc"], "cfcml_val_bacc": metrics["balanced_accuracy"],
                      "cfcml_val_acc": metrics["accuracy"], "cfcml_val_f1_macro": metrics["f1_macro"]}
        log_epoch_values(self, values, CLS_LOG_KEYS)
        for key in CLS_LOG_KEYS:
            self.print_to_log_file(key, np.round(self.logger.get_value(key, step=-1), decimals=4))
        auc = values.get("cfcml_val_auc", math.nan)
        if values and (self.best_val_auc is None or (math.isfinite(auc) and
                                                    (not math.isfinite(self.best_val_auc) or auc > self.best_val_auc))):
            self.best_val_auc = auc
            self.print_to_log_file(f"New best validation AUC: {np.round(auc, 4)}")
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_best_cls.pth"))

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        if self.settings["w_seg"] > 0 and self.segmentation_validation:
            super().perform_actual_validation(save_probabilities)  # segmentation export and Dice
        else:
            self.print_to_log_file("no segmentation validation (w_seg = 0, mask-free dataset)" if
                                   self.settings["w_seg"] <= 0 else "segmentation validation disabled")
        if self.local_rank != 0:
            return
        self.set_deep_supervision_enabled(False)
        keys = list(self.val_keys)
        probabilities = self.predict_validation_cases(keys)
        labels = self.table.labels(keys).numpy()
        classes = self.schema.classes
        metrics = classification_metrics(labels, probabilities, classes)
        os.makedirs(self.output_folder, exist_ok=True)
        with open(os.path.join(self.output_folder, "validation_cls.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case_id", "label", "prediction", *[f"prob_{c}" for c in classes]])
            for key, label, probs in zip(keys, labels, probabilities):
                writer.writerow([key, classes[label], classes[int(probs.argmax())], *[f"{p:.6f}" for p in probs]])
        with open(os.path.join(self.output_folder, "validation_cls_summary.json"), "w") as f:
            json.dump({"trainer": type(self).__name__, "fold": self.fold, "classes": classes, "metrics": metrics,
                       "best_val_auc_during_training": self.best_val_auc}, f, indent=2, default=float)
        self.print_to_log_file(f"Classification validation: AUC {metrics['auc']:.4f}, balanced accuracy "
                               f"{metrics['balanced_accuracy']:.4f}, accuracy {metrics['accuracy']:.4f}")
        self.set_deep_supervision_enabled(True)

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict[str, Any]:
        state = super().extra_checkpoint_state()
        network = unwrap(self.network)
        stats = None
        if network.tabular is not None:
            stats = {"mean": network.tabular.numeric_mean.cpu().clone(),
                     "std": network.tabular.numeric_std.cpu().clone()}
        state.update({"best_val_auc": self.best_val_auc, "schema": self.cfcml_block["schema"],
                      "settings": self.settings, "numeric_stats": stats})
        return state

    def restore_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().restore_extra_checkpoint_state(state)
        if state.get("schema") != self.cfcml_block["schema"]:
            raise ValueError("the checkpoint was trained with another tabular schema than these plans' CFCML block")
        self.best_val_auc = state.get("best_val_auc")

    def load_checkpoint(self, filename_or_checkpoint: str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        register_log_keys(self, CLS_LOG_KEYS)
