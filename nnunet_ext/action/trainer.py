"""The ACTION / ACTION++ training logic on top of nnunet-ext's semi-supervised trainer base.

One ``nnUNetv2_train`` run holds the three stages of ACTION (You et al., IPMI 2023), switched by epoch:

i.   global contrastive distillation with soft negatives (encoder + global heads; unlabeled and labelled images,
     labels unused);
ii.  global + local distillation plus nnU-Net's supervised loss on the labelled rows;
iii. nnU-Net's supervised loss + confidence-weighted pseudo-label CE on mixed unlabeled images + 0.01 anatomical
     contrast on sparsely sampled low-confidence voxels.

``self.network`` is the student, built by nnU-Net's stock builder (``network_weights`` = student, so stock
``nnUNetv2_predict`` works). The EMA teacher, the heads and the queues are extra modules, saved under the
``nnunet_ext`` checkpoint key with the stage. Trainer classes that nnU-Net finds live in
``trainers/action_trainers.py``; this module holds the logic so that it is importable (and picklable) normally.
"""
from __future__ import annotations

import copy
import os
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from nnunet_ext.action.anco import AnatomicalContrastLoss, confidence_weighted_ce
from nnunet_ext.action.distillation import LocalWindowGeometry, similarity_kl
from nnunet_ext.action.features import (
    bottleneck_channels,
    check_unet_like,
    decoder_stage_channels,
    encoder_bottleneck,
    forward_with_features,
    full_resolution,
)
from nnunet_ext.action.heads import GlobalProjector, PointwiseMLP, Predictor, RepresentationMLP
from nnunet_ext.action.queue import RingQueue
from nnunet_ext.action.saacl import AdaptiveCentreAllocator, SupervisedAnatomicalContrastLoss
from nnunet_ext.action.sampling import HardPixelSampler, gather_decoder_features, sample_pixels_per_class
from nnunet_ext.action.schedules import (
    ATS_TARGETS,
    StagePolyLRScheduler,
    cosine_temperature,
    resolve_stage_epochs,
    stage_of_epoch,
    stage_starts,
)
from nnunet_ext.action.settings import validate_action_settings
from nnunet_ext.action.views import (
    StudentPerturbation,
    classmix_keep_mask,
    cutmix_keep_mask,
    mix_with_partner,
)
from nnunet_ext.compat import unwrap
from nnunet_ext.plans import merge_settings
from nnunet_ext.training.distributed import all_gather_concat
from nnunet_ext.training.ema import ema_update
from nnunet_ext.training.semi_supervised import ExtSemiSupervisedTrainerBase
from nnunet_ext.training.step import fp32_context

# settings stored as JSON lists in a plans block, used as tuples
TUPLE_SETTINGS = ("stage_epochs", "ats_targets")

STAGE_NAMES = ("i: global contrastive distillation", "ii: global + local distillation + supervision",
               "iii: anatomical contrast + pseudo-labels")


def _valid_fraction(valid: torch.Tensor, spatial_shape: tuple[int, ...]) -> torch.Tensor:
    """Fraction of valid input voxels per cell of a coarser grid: ``[B, 1, *S] -> [B, 1, *spatial_shape]``."""
    return F.interpolate(valid.float(), size=tuple(spatial_shape), mode="area")


def _labelled_rows(output: torch.Tensor | list[torch.Tensor], n: int) -> torch.Tensor | list[torch.Tensor]:
    """The first ``n`` rows of a network output (deep-supervision list or tensor)."""
    return [o[:n] for o in output] if isinstance(output, (list, tuple)) else output[:n]


class ActionTrainerBase(ExtSemiSupervisedTrainerBase):
    """ACTION (spec ``action.md``). Hyper-parameters are class attributes; the names listed in ``setting_names``
    can also be set per dataset in a derived plans file (``nnunet-ext configure action``).

    Schedule:
        stage_epochs: epochs of stages (i, ii, iii); default (100, 100, 800) = nnU-Net's 1000-epoch budget. When
            they do not sum to ``num_epochs`` (e.g. a shorter budget subclass) they are scaled proportionally.
        ema_momentum: EMA teacher (and key-head) momentum m (0.99).
    Stages i/ii:
        tau_student, tau_teacher: similarity temperatures (0.1, 0.01; official-code issue Q5 resolved).
        queue_entries: queue length K in images; the effective length is max(K, 4 x images per step) so the anchors
            are not only the previous batch (spec 11.17).
        global_dim: global embedding size (None: 512 in 2D, 128 in 3D).
        local_cells: pooled cells per window axis (None: 8 in 2D, 4 in 3D).
        weight_global, weight_local: k1, k2 (1, 1).
    Stage iii:
        lambda_unsup, lambda_anco: weights of the pseudo-label CE and of L_anco (1, 0.01; issue Q2).
        strong_threshold, weak_threshold: delta_s (0.97) and delta_w (0.7).
        tau_anco: anatomical-contrast temperature (0.5).
        num_queries, num_negatives: per class, N_q = 256 and N_k = 512.
        max_prototype_pixels: prototype subset per class (8192).
        rep_dim: representation size (None: 256 in 2D, 128 in 3D).
        rep_feature_stages: decoder stages (highest resolutions) feeding the representation head (4).
        mixing: "cutmix", "classmix" or "none" (None: CutMix in 2D, ClassMix in 3D).
        cutmix_depth_span: slices of a 3D CutMix box (20).
        perturbation_probability: probability of each student perturbation (0.5).
    Optimiser:
        sgd_momentum: nnU-Net's 0.99 (ACTION used 0.9 with weight decay 1e-4). Fresh SGD per stage, poly lr
            restarted at every stage.
    """

    method_family: ClassVar[str] = "action"
    # DDP (docs/ddp.md 4.2): teacher, key heads and queues start as rank 0's (base-class broadcast), the teachers
    # follow the synchronised student, the queues receive every rank's embeddings in rank order; the forwards
    # bypass the DDP wrapper, so the shared step averages every optimised gradient (skipped heads count as zero).
    # Stage iii's AnCo prototypes, queries and negatives are per rank (ReCo's per-batch sampling, per GPU).
    supports_ddp: ClassVar[bool] = True
    extra_log_keys: ClassVar[tuple[str, ...]] = (
        "action_stage", "action_l_sup", "action_l_glob", "action_l_loc", "action_l_unsup", "action_l_anco",
        "action_conf_frac", "action_tau",
    )
    setting_names: ClassVar[tuple[str, ...]] = (
        "stage_epochs", "ema_momentum", "tau_student", "tau_teacher", "queue_entries", "global_dim", "local_cells",
        "weight_global", "weight_local", "lambda_unsup", "lambda_anco", "strong_threshold", "weak_threshold",
        "tau_anco", "num_queries", "num_negatives", "max_prototype_pixels", "rep_dim", "rep_feature_stages",
        "mixing", "cutmix_depth_span", "perturbation_probability", "sgd_momentum",
    )

    #: whether stage iii's teacher pass also covers the labelled images (for ACTION++'s SAACL targets)
    teacher_features_of_labelled: ClassVar[bool] = False

    stage_epochs: ClassVar[tuple[int, int, int]] = (100, 100, 800)
    ema_momentum: ClassVar[float] = 0.99
    tau_student: ClassVar[float] = 0.1
    tau_teacher: ClassVar[float] = 0.01
    queue_entries: ClassVar[int] = 36
    global_dim: ClassVar[int | None] = None
    local_cells: ClassVar[int | None] = None
    weight_global: ClassVar[float] = 1.0
    weight_local: ClassVar[float] = 1.0
    lambda_unsup: ClassVar[float] = 1.0
    lambda_anco: ClassVar[float] = 0.01
    strong_threshold: ClassVar[float] = 0.97
    weak_threshold: ClassVar[float] = 0.7
    tau_anco: ClassVar[float] = 0.5
    num_queries: ClassVar[int] = 256
    num_negatives: ClassVar[int] = 512
    max_prototype_pixels: ClassVar[int] = 8192
    rep_dim: ClassVar[int | None] = None
    rep_feature_stages: ClassVar[int] = 4
    mixing: ClassVar[str | None] = None
    cutmix_depth_span: ClassVar[int] = 20
    perturbation_probability: ClassVar[float] = 0.5
    sgd_momentum: ClassVar[float] = 0.99

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        defaults = {name: getattr(self, name) for name in self.setting_names}
        settings = merge_settings(defaults, self.method_settings(self.plans_manager),
                                  f"the 'nnunet_ext.action' block of plans {self.plans_manager.plans_name}")
        for name, value in settings.items():
            setattr(self, name, tuple(value) if name in TUPLE_SETTINGS else value)
        self.action_stage = 0
        self.resolved_stage_epochs: tuple[int, int, int] | None = None
        self._iteration_in_epoch = 0

    # ------------------------------------------------------------------ set-up
    def _do_i_compile(self) -> bool:
        # feature taps via hooks and data-dependent sampling: compile only on explicit request
        if os.environ.get("nnUNet_compile", "").lower() not in ("true", "1", "t"):
            return False
        return super()._do_i_compile()

    def check_supported_setup(self) -> None:
        super().check_supported_setup()
        if self.label_manager.has_regions:
            raise NotImplementedError(
                f"{type(self).__name__} needs mutually exclusive labels (softmax classes), but dataset.json defines "
                f"regions. Train a region dataset with nnUNetTrainer or convert it to labels."
            )
        validate_action_settings({name: getattr(self, name) for name in self.setting_names},
                                 f"{type(self).__name__} (class attributes and plans {self.plans_manager.plans_name})")

    @property
    def spatial_dims(self) -> int:
        return len(self.configuration_manager.patch_size)

    def initialize(self) -> None:
        # num_epochs is final here (budget subclasses set it after __init__)
        self.resolved_stage_epochs = resolve_stage_epochs(self.stage_epochs, self.num_epochs)
        self.action_stage = stage_of_epoch(self.current_epoch, self.resolved_stage_epochs)
        self.perturb = StudentPerturbation(p=self.perturbation_probability)
        self.pixel_sampler = HardPixelSampler(self.num_queries, self.max_prototype_pixels, self.strong_threshold)
        self.anco_loss = AnatomicalContrastLoss(self.num_negatives, self.tau_anco)
        super().initialize()
        self.print_to_log_file(f"ACTION stage epochs (i, ii, iii): {self.resolved_stage_epochs}")

    def _resolved(self, value: int | None, two_d: int, three_d: int) -> int:
        return value if value is not None else (two_d if self.spatial_dims == 2 else three_d)

    @property
    def images_per_step(self) -> int:
        """Labelled + unlabeled images per step over all ranks: the plans' batch twice when 1:1, once with
        ``split_planned_batch``."""
        planned = self.configuration_manager.batch_size
        if self.split_planned_batch:
            return planned
        return planned + (self.unlabeled_batch_size or planned)

    def build_extra_modules(self) -> dict[str, nn.Module]:
        net = check_unet_like(self.network)
        teacher = copy.deepcopy(net).requires_grad_(False)
        # set_deep_supervision_enabled only touches self.network; the teacher always returns one tensor
        teacher.decoder.deep_supervision = False
        teacher.eval()
        num_classes = self.label_manager.num_segmentation_heads
        global_dim = self._resolved(self.global_dim, 512, 128)
        rep_dim = self._resolved(self.rep_dim, 256, 128)
        # from the plans' global batch (= self.batch_size in one process): the queues receive every rank's rows,
        # and their shapes must not depend on the number of ranks so that checkpoints resume on any number
        entries = max(self.queue_entries, 4 * self.images_per_step)
        self.local_geometry = LocalWindowGeometry.from_patch(self.configuration_manager.patch_size,
                                                             self._resolved(self.local_cells, 8, 4))
        global_q = GlobalProjector(bottleneck_channels(net), global_dim)
        local_q = PointwiseMLP(num_classes, 2 * num_classes, num_classes)
        rep_channels = sum(decoder_stage_channels(net)[: self.rep_feature_stages])
        return {
            "teacher": teacher,
            "global_q": global_q,
            "global_pred": Predictor(global_dim),
            # key heads are EMAs of the query heads, never optimised (fix of official-code issue Q4)
            "global_k": copy.deepcopy(global_q).requires_grad_(False),
            "global_queue": RingQueue(entries, global_dim),
            "local_q": local_q,
            "local_pred": PointwiseMLP(num_classes, num_classes, num_classes),
            "local_k": copy.deepcopy(local_q).requires_grad_(False),
            "local_queue": RingQueue(entries * self.local_geometry.num_windows,
                                     self.local_geometry.vector_dim(num_classes)),
            "rep_head": RepresentationMLP(rep_channels, rep_dim),
        }

    def stage_parameters(self, stage: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(network parameters, head parameters) optimised in ``stage``."""
        net, heads = unwrap(self.network), self.extra_modules
        if stage == 0:
            # stage i runs no decoder: only the encoder and the global student heads learn
            return list(net.encoder.parameters()), [*heads["global_q"].parameters(), *heads["global_pred"].parameters()]
        if stage == 1:
            return list(net.parameters()), [*heads["global_q"].parameters(), *heads["global_pred"].parameters(),
                                             *heads["local_q"].parameters(), *heads["local_pred"].parameters()]
        return list(net.parameters()), self.stage_iii_head_parameters()

    def stage_iii_head_parameters(self) -> list[nn.Parameter]:
        return list(self.extra_modules["rep_head"].parameters())

    def configure_optimizers(self):
        if not self.extra_modules:
            self.extra_modules = nn.ModuleDict(self.build_extra_modules()).to(self.device)
        network_params, head_params = self.stage_parameters(self.action_stage)
        optimizer = torch.optim.SGD([{"params": network_params}, {"params": head_params}], lr=self.initial_lr,
                                    weight_decay=self.weight_decay, momentum=self.sgd_momentum, nesterov=True)
        return optimizer, StagePolyLRScheduler(optimizer, self.initial_lr, self.resolved_stage_epochs)

    # ------------------------------------------------------------------ stages
    def enter_stage(self, stage: int) -> None:
        """Switch to ``stage``: fresh optimiser for its parameters (fresh momentum, restarted poly lr); entering
        stage iii copies the student into the teacher and resets the best-checkpoint EMA (the pseudo Dice of the
        distillation stages does not reflect segmentation quality)."""
        self.print_to_log_file(f"ACTION: entering stage {STAGE_NAMES[stage]} at epoch {self.current_epoch}")
        if stage == 2 and self.action_stage < 2:
            self.extra_modules["teacher"].load_state_dict(unwrap(self.network).state_dict())
            self._best_ema = None
        self.action_stage = stage
        self.optimizer, self.lr_scheduler = self.configure_optimizers()

    def on_train_epoch_start(self) -> None:
        stage = stage_of_epoch(self.current_epoch, self.resolved_stage_epochs)
        if stage != self.action_stage:
            self.enter_stage(stage)
        self._iteration_in_epoch = 0
        super().on_train_epoch_start()

    def stage_progress(self) -> tuple[float, float]:
        """(iterations done in the current stage, iterations of the stage)."""
        start = stage_starts(self.resolved_stage_epochs)[self.action_stage]
        done = (self.current_epoch - start) * self.num_iterations_per_epoch + self._iteration_in_epoch
        return float(done), float(self.resolved_stage_epochs[self.action_stage] * self.num_iterations_per_epoch)

    def distillation_temperatures(self) -> tuple[float, float]:
        """(tau_s, tau_t) of stages i/ii; ACTION++ schedules them."""
        return self.tau_student, self.tau_teacher

    def anco_temperature(self) -> float:
        return self.tau_anco

    # ------------------------------------------------------------------ losses
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.action_stage == 2:
            return self.anatomical_contrast_step(batch)
        return self.distillation_step(batch, with_local=self.action_stage == 1)

    def _both_batches(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Labelled and unlabeled images ``[B_l + B_u, C, *patch]`` and their validity ``[B_l + B_u, 1, *patch]``."""
        unlabeled = self.next_unlabeled_batch()
        images = torch.cat([batch["data"], unlabeled["data"]])
        labelled_valid = torch.ones_like(batch["data"][:, :1], dtype=torch.bool)
        return images, torch.cat([labelled_valid, unlabeled["valid"].bool()])

    def distillation_step(self, batch: dict, with_local: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage i (global distillation only) and stage ii (+ local distillation + supervision)."""
        heads, teacher = self.extra_modules, self.extra_modules["teacher"]
        teacher.eval()
        images, valid = self._both_batches(batch)
        student_view = self.perturb(images)
        tau_s, tau_t = self.distillation_temperatures()
        components: dict[str, torch.Tensor] = {"action_stage": torch.tensor(float(self.action_stage)),
                                               "action_tau": torch.tensor(tau_s)}
        with torch.no_grad():
            if with_local:
                teacher_logits, teacher_bottleneck, _ = forward_with_features(teacher, images)
            else:
                teacher_bottleneck = encoder_bottleneck(teacher, images)
            cell_weights = _valid_fraction(valid, teacher_bottleneck.shape[2:])
            global_t = heads["global_k"](teacher_bottleneck, cell_weights)
        if with_local:
            student_logits, student_bottleneck, _ = forward_with_features(self.network, student_view)
        else:
            student_bottleneck = encoder_bottleneck(self.network, student_view)
        global_s = heads["global_pred"](heads["global_q"](student_bottleneck, cell_weights))
        with fp32_context(self.device):
            l_glob = similarity_kl(global_s, global_t, heads["global_queue"].get(), tau_s, tau_t)
        heads["global_queue"].push(all_gather_concat(global_t))  # all ranks' rows, rank order (DDP)
        total = self.weight_global * l_glob
        components["action_l_glob"] = l_glob.detach()
        if with_local:
            n_labelled = batch["data"].shape[0]
            l_sup = self.loss(_labelled_rows(student_logits, n_labelled), batch["target"])
            geometry = self.local_geometry
            pooled_s, fraction = geometry.pool(full_resolution(student_logits), valid)
            with torch.no_grad():
                pooled_t, _ = geometry.pool(teacher_logits, valid)
                local_t = geometry.windows(heads["local_k"](pooled_t)).flatten(0, 1)
                window_valid = (geometry.windows(fraction).amax(-1) > 0).flatten()
            local_s = geometry.windows(heads["local_pred"](heads["local_q"](pooled_s))).flatten(0, 1)
            with fp32_context(self.device):
                l_loc = similarity_kl(local_s, local_t, heads["local_queue"].get(), tau_s, tau_t,
                                      weights=window_valid.float())
            heads["local_queue"].push(all_gather_concat(local_t[window_valid]))
            total = total + l_sup + self.weight_local * l_loc
            components.update({"action_l_sup": l_sup.detach(), "action_l_loc": l_loc.detach()})
        return total, components

    def mixing_mode(self) -> str:
        return self.mixing if self.mixing is not None else ("cutmix" if self.spatial_dims == 2 else "classmix")

    @torch.no_grad()
    def teacher_stage_iii_pass(self, labelled_images: torch.Tensor, unlabeled_images: torch.Tensor
                               ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The teacher's one forward of a stage-iii step, in fp32.

        Returns ``(logits on the unlabeled images [B_u, K, *S], decoder features of the labelled images or None)``.
        Only where ``teacher_features_of_labelled`` is set (ACTION++'s SAACL targets) does the pass also run over the
        labelled images, as one forward of the concatenated batch: the teacher is in eval mode and nnU-Net's
        networks normalise per sample, so each row's output is the same as from two separate passes.
        """
        teacher = self.extra_modules["teacher"]
        teacher.eval()
        with fp32_context(self.device):
            if not self.teacher_features_of_labelled:
                return teacher(unlabeled_images).float(), None
            n_labelled = labelled_images.shape[0]
            logits, _, features = forward_with_features(teacher, torch.cat([labelled_images, unlabeled_images]))
        return logits[n_labelled:].float(), [f[:n_labelled] for f in features[: self.rep_feature_stages]]

    @torch.no_grad()
    def pseudo_labelled_view(self, unlabeled: dict, teacher_logits: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher pseudo-labels on the unlabeled batch, mixed jointly with the image; then the student perturbation.

        Args:
            unlabeled: the unlabeled batch (``data``, ``valid``).
            teacher_logits: the teacher's fp32 logits on ``unlabeled['data']`` (:meth:`teacher_stage_iii_pass`).

        Returns ``(student images [B_u, C, *S], pseudo-labels [B_u, *S] (-1 outside the image), confidence [B_u, *S])``.
        """
        images, valid = unlabeled["data"], unlabeled["valid"].bool()[:, 0]
        with fp32_context(self.device):
            probabilities = torch.softmax(teacher_logits, 1)
        confidence, pseudo = probabilities.max(1)
        pseudo = torch.where(valid, pseudo, torch.full_like(pseudo, -1))
        confidence = torch.where(valid, confidence, torch.zeros_like(confidence))
        mode = self.mixing_mode()
        if mode == "classmix":
            keep = classmix_keep_mask(pseudo)
        elif mode == "cutmix":
            keep = cutmix_keep_mask(tuple(pseudo.shape), self.cutmix_depth_span, device=pseudo.device)
        else:
            keep = torch.ones_like(pseudo, dtype=torch.bool)
        images, pseudo, confidence = mix_with_partner(keep, images, pseudo, confidence)
        return self.perturb(images), pseudo, confidence

    def labelled_class_map(self, target: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Full-resolution labels ``[B_l, *S]`` (long) with the ignore label set to -1."""
        labels = full_resolution(target)[:, 0].long()
        ignore = self.label_manager.ignore_label
        if ignore is not None:
            labels = torch.where(labels == ignore, torch.full_like(labels, -1), labels)
        return labels

    def anatomical_contrast_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage iii: L_sup + lambda_u L_unsup + lambda_a L_anco (spec 11.9)."""
        unlabeled = self.next_unlabeled_batch()
        teacher_logits, teacher_labelled_features = self.teacher_stage_iii_pass(batch["data"], unlabeled["data"])
        student_unlabeled, pseudo, confidence = self.pseudo_labelled_view(unlabeled, teacher_logits)
        n_labelled = batch["data"].shape[0]
        logits, _, features = forward_with_features(self.network, torch.cat([batch["data"], student_unlabeled]))
        l_sup = self.loss(_labelled_rows(logits, n_labelled), batch["target"])
        full = full_resolution(logits)
        labelled_map = self.labelled_class_map(batch["target"])
        rep_features = features[: self.rep_feature_stages]
        with fp32_context(self.device):
            l_unsup, omega = confidence_weighted_ce(full[n_labelled:], pseudo, confidence, self.strong_threshold)
            unlabeled_map = torch.where(confidence >= self.weak_threshold, pseudo, torch.full_like(pseudo, -1))
            class_map = torch.cat([labelled_map, unlabeled_map])
            with torch.no_grad():
                probabilities = torch.softmax(full.detach().float(), 1)
                own_probability = probabilities.gather(1, class_map.clamp_min(0).unsqueeze(1)).squeeze(1)
            samples = self.pixel_sampler(class_map, own_probability, self.label_manager.num_segmentation_heads)
            tau = self.anco_temperature()
            prototypes, queries = self.sampled_representations(samples, rep_features, class_map.shape)
            l_anco = self.anco_loss(prototypes, queries, temperature=tau)
        total = l_sup + self.lambda_unsup * l_unsup + self.lambda_anco * l_anco
        components = {"action_stage": torch.tensor(2.0), "action_l_sup": l_sup.detach(),
                      "action_l_unsup": l_unsup.detach(), "action_l_anco": l_anco.detach(),
                      "action_conf_frac": omega.mean().detach(), "action_tau": torch.tensor(tau)}
        extra_loss, extra_components = self.stage_iii_extra_loss(labelled_map, rep_features, teacher_labelled_features)
        if extra_loss is not None:
            total = total + extra_loss
        components.update(extra_components)
        return total, components

    def sampled_representations(self, samples, rep_features: list[torch.Tensor], full_shape: tuple[int, ...]
                                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Representation-head outputs at the sampled voxels: per class (prototype subset, queries).

        The prototype side is detached in the loss, so it is computed without a graph (memory)."""
        head = self.extra_modules["rep_head"]
        with torch.no_grad():
            prototypes = [head(gather_decoder_features(rep_features, s.prototype_index, full_shape).float())
                          for s in samples]
        query_index = [s.query_index for s in samples]
        if samples and sum(q.numel() for q in query_index):
            gathered = head(gather_decoder_features(rep_features, torch.cat(query_index), full_shape).float())
            queries = list(torch.split(gathered, [q.numel() for q in query_index]))
        else:
            queries = [torch.zeros(0, head[-1].out_features, device=self.device) for _ in samples]
        return prototypes, queries

    def stage_iii_extra_loss(self, labelled_map: torch.Tensor, rep_features: list[torch.Tensor],
                             teacher_labelled_features: list[torch.Tensor] | None
                             ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Hook for ACTION++ (SAACL). Default: nothing.

        Args:
            labelled_map: full-resolution labels of the labelled rows ``[B_l, *S]`` (-1 = ignore).
            rep_features: the student's decoder features of the whole batch (labelled rows first).
            teacher_labelled_features: the teacher's decoder features of the labelled rows where
                ``teacher_features_of_labelled`` is set, else None.
        """
        return None, {}

    # ------------------------------------------------------------------ after the step
    def after_optimizer_step(self) -> None:
        heads, m = self.extra_modules, self.ema_momentum
        ema_update(heads["teacher"], self.network, m)
        if self.action_stage < 2:
            ema_update(heads["global_k"], heads["global_q"], m)
        if self.action_stage == 1:
            ema_update(heads["local_k"], heads["local_q"], m)
        self._iteration_in_epoch += 1

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict[str, Any]:
        state = super().extra_checkpoint_state()
        state["stage"] = self.action_stage
        state["stage_epochs"] = list(self.resolved_stage_epochs)
        return state

    def prepare_for_extra_state(self, state: dict[str, Any]) -> None:
        # the saved optimiser belongs to the saved stage: rebuild ours with that stage's parameter groups first
        saved = tuple(state.get("stage_epochs", self.resolved_stage_epochs))
        if saved != tuple(self.resolved_stage_epochs):
            self.print_to_log_file(f"WARNING: the checkpoint was trained with stage epochs {saved}, this run uses "
                                   f"{self.resolved_stage_epochs} (num_epochs changed?)")
        self.action_stage = int(state["stage"])
        self.optimizer, self.lr_scheduler = self.configure_optimizers()


class ActionPlusPlusTrainerBase(ActionTrainerBase):
    """ACTION++ (MICCAI 2023; spec 8): ACTION plus the anatomical-aware temperature scheduler (ATS) and supervised
    adaptive anatomical contrast (SAACL) to fixed, evenly spread class centres in stage iii.

    Class attributes (besides ACTION's):
        ats_targets: the temperatures the cosine schedule (ATS) drives, any of ``ATS_TARGETS``:
            ``"distillation_i"`` / ``"distillation_ii"`` (tau_student and tau_teacher of stage i / ii, each from its
            ACTION value up to ``ats_high``), ``"anco"`` (stage iii anatomical contrast, ``ats_low_anco`` ..
            ``ats_high``) and ``"saacl"`` (``saacl_tau_low`` .. ``ats_high``). Default: all four. A temperature
            left out is constant: tau_student / tau_teacher, ACTION's ``tau_anco`` (0.5), ``saacl_tau_low``. The
            official 3D code schedules only stage ii and AnCo (SAACL fixed at 0.07), its 2D code stage ii, AnCo
            and SAACL (docs/action.md).
        ats_high: upper temperature of every cosine schedule (1.0).
        ats_low_anco: lower AnCo temperature (0.1).
        ats_period_fraction: schedule period as a fraction of the stage's iterations (1.0: one cosine cycle per
            stage; the official 2D code uses 0.1 of its run, ten cycles).
        saacl_weight: weight of L_saacl (0.01, official code).
        saacl_anchor_weight: lambda_a of the centre term (0.2).
        saacl_tau_low: lower (or, unscheduled, constant) SAACL temperature (0.07).
        saacl_pixels_per_class: sampled labelled voxels per present class (256).
        saacl_queue_size: teacher feature/label queue length (12288).
        saacl_count_centre: the assigned centre counts in SAACL's #positives normaliser (True, official code;
            False: 1 + same-class queue entries, this package before issue 20).
        saacl_mask_empty_slots: queue slots not filled yet are left out of SAACL's softmax (True; False: the
            official code's random placeholder rows stay in it as negatives until the queue has filled once).
        saacl_centroid_init: ``"zeros"`` (a class's first batch mean becomes its centroid) or ``"random"`` (random
            unit vectors, official code).
        centroid_momentum: EMA momentum of the class centroids used for the Hungarian assignment (0.9).
    """

    extra_log_keys: ClassVar[tuple[str, ...]] = ActionTrainerBase.extra_log_keys + ("action_l_saacl",)
    setting_names: ClassVar[tuple[str, ...]] = ActionTrainerBase.setting_names + (
        "ats_targets", "ats_high", "ats_low_anco", "ats_period_fraction", "saacl_weight", "saacl_anchor_weight",
        "saacl_tau_low", "saacl_pixels_per_class", "saacl_queue_size", "saacl_count_centre", "saacl_mask_empty_slots",
        "saacl_centroid_init", "centroid_momentum",
    )

    # SAACL's targets are teacher features of the labelled images: the stage-iii teacher pass covers them too
    teacher_features_of_labelled: ClassVar[bool] = True

    ats_targets: ClassVar[tuple[str, ...]] = ATS_TARGETS
    ats_high: ClassVar[float] = 1.0
    ats_low_anco: ClassVar[float] = 0.1
    ats_period_fraction: ClassVar[float] = 1.0
    saacl_weight: ClassVar[float] = 0.01
    saacl_anchor_weight: ClassVar[float] = 0.2
    saacl_tau_low: ClassVar[float] = 0.07
    saacl_pixels_per_class: ClassVar[int] = 256
    saacl_queue_size: ClassVar[int] = 12288
    saacl_count_centre: ClassVar[bool] = True
    saacl_mask_empty_slots: ClassVar[bool] = True
    saacl_centroid_init: ClassVar[str] = "zeros"
    centroid_momentum: ClassVar[float] = 0.9

    def build_extra_modules(self) -> dict[str, nn.Module]:
        modules = super().build_extra_modules()
        rep_dim = self._resolved(self.rep_dim, 256, 128)
        modules.update({
            # teacher features for SAACL: an EMA copy of the representation head on the teacher's decoder maps
            "rep_head_ema": copy.deepcopy(modules["rep_head"]).requires_grad_(False),
            "saacl_features": RingQueue(self.saacl_queue_size, rep_dim),
            "saacl_labels": RingQueue(self.saacl_queue_size, (), init="fill", dtype=torch.long, fill_value=-1),
            "centres": AdaptiveCentreAllocator(self.label_manager.num_segmentation_heads, rep_dim,
                                               self.centroid_momentum, centroid_init=self.saacl_centroid_init),
        })
        return modules

    def initialize(self) -> None:
        super().initialize()  # validates the settings first (messages name the setting)
        # built once like ACTION's AnCo loss (not per step); the temperature is passed per call (schedule)
        self.saacl_loss = SupervisedAnatomicalContrastLoss(self.saacl_anchor_weight, self.saacl_tau_low,
                                                           count_centre=self.saacl_count_centre,
                                                           mask_empty_slots=self.saacl_mask_empty_slots)

    def _ats(self, low: float) -> float:
        done, total = self.stage_progress()
        return cosine_temperature(done, max(1.0, total * self.ats_period_fraction), low, self.ats_high)

    def distillation_temperatures(self) -> tuple[float, float]:
        if ("distillation_i", "distillation_ii")[min(self.action_stage, 1)] not in self.ats_targets:
            return super().distillation_temperatures()
        return self._ats(self.tau_student), self._ats(self.tau_teacher)

    def anco_temperature(self) -> float:
        return self._ats(self.ats_low_anco) if "anco" in self.ats_targets else super().anco_temperature()

    def saacl_temperature(self) -> float:
        return self._ats(self.saacl_tau_low) if "saacl" in self.ats_targets else self.saacl_tau_low

    def stage_iii_extra_loss(self, labelled_map: torch.Tensor, rep_features: list[torch.Tensor],
                             teacher_labelled_features: list[torch.Tensor] | None
                             ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        heads = self.extra_modules
        index, labels = sample_pixels_per_class(labelled_map, self.saacl_pixels_per_class,
                                                self.label_manager.num_segmentation_heads)
        n_labelled = labelled_map.shape[0]
        labelled_features = [f[:n_labelled] for f in rep_features]
        student = heads["rep_head"](gather_decoder_features(labelled_features, index, labelled_map.shape).float())
        with torch.no_grad():
            teacher = heads["rep_head_ema"](gather_decoder_features(teacher_labelled_features, index,
                                                                    labelled_map.shape).float())
        allocator = heads["centres"]
        allocator.update(student, labels)
        tau = self.saacl_temperature()
        with fp32_context(self.device):
            l_saacl = self.saacl_loss(student, teacher, labels, heads["saacl_features"].get(),
                                      heads["saacl_labels"].get(), allocator.centres, allocator.assignment(),
                                      temperature=tau)
        heads["saacl_features"].push(all_gather_concat(teacher))  # all ranks' rows, rank order (DDP)
        heads["saacl_labels"].push(all_gather_concat(labels))
        return self.saacl_weight * l_saacl, {"action_l_saacl": l_saacl.detach()}

    def after_optimizer_step(self) -> None:
        if self.action_stage == 2:
            ema_update(self.extra_modules["rep_head_ema"], self.extra_modules["rep_head"], self.ema_momentum)
        super().after_optimizer_step()
