"""CAML trainer logic (Gao et al., MICCAI 2023, arXiv:2307.06312). The classes users name with ``-tr`` are thin
subclasses in ``trainers/caml_trainers.py``; everything they do is implemented here."""
import os

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_ext.caml.losses import ForegroundDiceLoss, caml_total_loss, mutual_consistency_loss
from nnunet_ext.caml.networks import (
    CAMLHeads,
    build_auxiliary_unet,
    check_supported_unet,
    forward_with_embedding,
    full_resolution,
    labeled_part,
)
from nnunet_ext.caml.occ import OmniCorrelationConsistency
from nnunet_ext.caml.ramps import caml_rampup
from nnunet_ext.caml.settings import CAML_SETTING_NAMES, resolve_caml_settings
from nnunet_ext.compat import unwrap
from nnunet_ext.training.distributed import average_batchnorm_statistics_, broadcast_seed, world_size
from nnunet_ext.training.semi_supervised import ExtSemiSupervisedTrainerBase
from nnunet_ext.training.step import fp32_context


class CAMLTrainerBase(ExtSemiSupervisedTrainerBase):
    """Two planned U-Nets trained by mutual learning on batches of labeled + unlabeled patches.

    * ``self.network`` is the vanilla model v: exactly nnU-Net's planned network, the only model used at inference
      (``network_weights`` is a stock checkpoint; ``nnUNetv2_predict -tr CAMLTrainer`` needs nothing extra).
    * ``extra_modules['net_a']``: the auxiliary model a, a second independently initialised build from the same
      plans with interpolation upsampling in its decoder and Cross-sample Mutual Attention after one encoder stage;
      ``extra_modules['heads']``: projection/prediction MLPs. Both saved under the ``nnunet_ext`` checkpoint key.
    * The memory bank of labeled features is explicit extra checkpoint state; ``--c`` restores it, the ramp
      position is recomputed from the epoch.

    Each step: labeled batch (nnU-Net's loader) and unlabeled batch (``imagesUnlabeled``, preprocessed with
    ``nnunet-ext preprocess-unlabeled``) concatenated labeled-first; both models see the same tensor. Loss
    ``w_sup (L_sup_v + L_sup_a) + lambda_c r L_c + lambda_o r L_o`` with nnU-Net's DC+CE (deep supervision) on the
    labeled part, L_c the sharpened cross MSE and L_o the omni-correlation consistency (both fp32, padded unlabeled
    voxels excluded).

    Settings (class attributes; a ``caml`` block in plans written by ``nnunet-ext configure caml`` overrides them;
    "official" = the LA code):
        cma_stage: encoder stage of the CMA; None = the shallowest stage at cumulative stride 8 with at most
            ``cma_max_tokens`` tokens (official: stride-8 stage).
        cma_max_tokens: token budget of the automatic CMA placement (4096).
        cma_heads, cma_ffn_mult, cma_dropout: CMA Transformer layers (official 4, 4, 0.5).
        cma_mode: ``"intra+inter"`` (official) or ``"inter"``.
        aux_upsampling: ``"interp"`` (official: trilinear + conv) or ``"transpconv"``.
        feat_dim: head feature dimension (official 32).
        memory_per_class: N_m memory rows per class (official 256).
        memory_cap: stored rows per (case, class) (official unbounded; capped here, count-weighted sampling).
        memory_slots: None = one memory slot per labeled case (official); an integer S = the last S labeled
            samples, one slot each (2D: a sample is one slice; see ``OmniCorrelationConsistency``).
        num_filtered: N_f unlabeled rows per class (official 12,800).
        occ_temperature: tau of the correlation softmax (official 0.1).
        occ_normalize: cosine instead of raw dot-product similarity (official False).
        occ_log_form: ``"eps"`` (official log(C + 1e-8)) or ``"log_softmax"``.
        heads_before_filter: heads on all agreeing voxels before the top-N_f filter (official True; default False,
            cheaper, BatchNorm statistics over the selected rows).
        sharpen_temperature: T of the sharpening (official 0.1).
        detach_targets: stop gradients through sharpened targets and C_a (official False).
        w_sup, lambda_c, lambda_o: loss weights (official 0.5, 1.0, 0.05). w_sup = 1.0 here: each network's
            supervised loss weighted as in stock nnU-Net, whose learning rate and schedule CAML trains with (0.5
            halves the vanilla network's supervised step; measured worse, docs/caml.md).
        rampup_fraction: ramp length as a fraction of all training steps (official 40 % with 4 labels).
        rampup_iterations: ramp length in steps; overrides the fraction (official 6000 / 3000 / 2250).
        rampup_quantum: ramp advances every this many steps (official 150; 1 = every step).
        split_planned_batch: labeled + unlabeled patches together make the planned batch, as the official 2 + 2
            (default False: the planned labeled batch plus as many unlabeled patches; see
            ``ExtSemiSupervisedTrainerBase``).
    """

    method_family = "caml"
    # DDP (docs/ddp.md 4.1): net_a and heads start as rank 0's (base-class broadcast); the forwards bypass the DDP
    # wrapper, so the shared step averages every optimised gradient; the memory bank receives every rank's entries;
    # the memory sample uses a generator seeded identically on all ranks; the heads' BatchNorm statistics are
    # averaged after every step. The OCC loss and the CMA see the rank's own batch (CMA attends within it).
    supports_ddp = True
    extra_log_keys = ("caml_l_sup", "caml_l_c", "caml_l_o", "caml_ramp", "caml_occ_rows", "caml_mem_classes")

    cma_stage = None
    cma_max_tokens = 4096
    cma_heads = 4
    cma_ffn_mult = 4
    cma_dropout = 0.5
    cma_mode = "intra+inter"
    aux_upsampling = "interp"
    feat_dim = 32
    memory_per_class = 256
    memory_cap = 4096
    memory_slots = None
    num_filtered = 12800
    occ_temperature = 0.1
    occ_normalize = False
    occ_log_form = "eps"
    heads_before_filter = False
    sharpen_temperature = 0.1
    detach_targets = False
    w_sup = 1.0
    lambda_c = 1.0
    lambda_o = 0.05
    rampup_fraction = 0.4
    rampup_iterations = None
    rampup_quantum = 1

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.caml_step = 0  # 0-based global step t of the ramp; recomputed from current_epoch at each epoch start
        self.occ = None
        # DDP only: the memory sample must be the same draw on every rank (one process uses torch's global RNG)
        self.memory_generator: torch.Generator | None = None

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        if self.label_manager.has_regions:
            raise NotImplementedError(
                f"{type(self).__name__} supports label-based datasets only; dataset.json defines regions "
                f"({self.label_manager.foreground_regions}). CAML's agreement masks, pseudo-labels and memory "
                f"classes need mutually exclusive classes (softmax outputs).")
        settings = resolve_caml_settings(type(self), self.method_settings(self.plans_manager),
                                         where=f"plans '{self.plans_manager.plans_name}' (nnunet_ext.caml)")
        for name in CAML_SETTING_NAMES:
            setattr(self, name, settings[name])
        super().initialize()
        if self.unlabeled_batch_size is not None and self.unlabeled_batch_size < 1:
            raise ValueError(f"unlabeled_batch_size must be >= 1 (CAML needs unlabeled samples), "
                             f"got {self.unlabeled_batch_size}")
        n_unlabeled = self.unlabeled_batch_size_per_rank()
        if self.batch_size + n_unlabeled < 4:
            self.print_to_log_file(
                f"WARNING: CAML batch = {self.batch_size} labeled + {n_unlabeled} unlabeled samples; inter-sample "
                f"attention over fewer than 4 samples is weak (official: 2 + 2)")
        self.occ = OmniCorrelationConsistency(
            self.label_manager.num_segmentation_heads, self.feat_dim, self.memory_per_class, self.memory_cap,
            self.num_filtered, self.occ_temperature, self.occ_normalize, self.occ_log_form, self.detach_targets,
            self.heads_before_filter, self.memory_slots, device=self.device)
        if world_size() > 1:
            self.memory_generator = torch.Generator(device=self.device).manual_seed(broadcast_seed())

    def _do_i_compile(self):
        # CAML's training forward replays the unwrapped networks (embeddings), so compiling would only speed up
        # validation; compile only when the user asks for it explicitly
        return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t") and super()._do_i_compile()

    def build_extra_modules(self):
        network = unwrap(self.network)
        check_supported_unet(network)
        unet_a = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                                 self.num_input_channels, self.label_manager.num_segmentation_heads,
                                                 self.enable_deep_supervision)
        net_a = build_auxiliary_unet(unet_a, self.configuration_manager.patch_size, self.aux_upsampling,
                                     self.cma_stage, self.cma_max_tokens, self.cma_heads, self.cma_ffn_mult,
                                     self.cma_dropout, self.cma_mode)
        self.print_to_log_file(f"CAML: CMA after encoder stage {net_a.cma_stage} "
                               f"({network.encoder.output_channels[net_a.cma_stage]} channels), auxiliary upsampling "
                               f"{self.aux_upsampling}")
        return {"net_a": net_a, "heads": CAMLHeads(network.encoder.output_channels[0], self.feat_dim)}

    def set_deep_supervision_enabled(self, enabled):
        super().set_deep_supervision_enabled(enabled)
        if "net_a" in self.extra_modules:
            self.extra_modules["net_a"].set_deep_supervision(enabled)

    def rampup_length(self) -> float:
        """Ramp length in steps: ``rampup_iterations`` or ``rampup_fraction`` of all training steps."""
        if self.rampup_iterations is not None:
            return float(self.rampup_iterations)
        return self.rampup_fraction * self.num_epochs * self.num_iterations_per_epoch

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.extra_modules.train()
        self.caml_step = self.current_epoch * self.num_iterations_per_epoch

    # ------------------------------------------------------------------ training step
    def compute_loss(self, batch):
        unlabeled = self.next_unlabeled_batch()
        n_labeled = batch["data"].shape[0]
        data = torch.cat((batch["data"], unlabeled["data"]))  # labeled first
        out_v = forward_with_embedding(unwrap(self.network), data)
        out_a = self.extra_modules["net_a"](data)

        target = batch["target"]
        supervised = (self.loss(labeled_part(out_v.seg, n_labeled), target)
                      + self.loss(labeled_part(out_a.seg, n_labeled), target))

        heads = self.extra_modules["heads"]
        with fp32_context(self.device):
            logits_v, logits_a = full_resolution(out_v.seg).float(), full_resolution(out_a.seg).float()
            # every labeled voxel counts; padded unlabeled voxels do not
            valid = torch.cat((unlabeled["valid"].new_ones((n_labeled, *unlabeled["valid"].shape[1:])),
                               unlabeled["valid"]))
            consistency = mutual_consistency_loss(logits_v, logits_a, self.sharpen_temperature, valid,
                                                  self.detach_targets)
            with torch.no_grad():
                probs_v, probs_a = torch.softmax(logits_v, 1), torch.softmax(logits_a, 1)
            labels = full_resolution(target)[:, 0]
            self.occ.update_memory(heads, out_v.embedding[:n_labeled], out_a.embedding[:n_labeled],
                                   probs_v[:n_labeled].argmax(1), probs_a[:n_labeled].argmax(1), labels,
                                   [str(k) for k in batch["keys"]], self.label_manager.ignore_label)
            occ = self.occ.loss(heads, out_v.embedding[n_labeled:], out_a.embedding[n_labeled:],
                                probs_v[n_labeled:], probs_a[n_labeled:], unlabeled["valid"],
                                generator=self.memory_generator)
            ramp = caml_rampup(self.caml_step, self.rampup_length(), self.rampup_quantum)
            total = caml_total_loss(supervised, consistency, occ.loss, ramp, self.w_sup, self.lambda_c,
                                    self.lambda_o)
        self.caml_step += 1
        return total, {
            "caml_l_sup": supervised.detach(), "caml_l_c": consistency.detach(), "caml_l_o": occ.loss.detach(),
            "caml_ramp": torch.tensor(ramp), "caml_occ_rows": torch.tensor(float(occ.num_rows)),
            "caml_mem_classes": torch.tensor(float(occ.num_memory_classes)),
        }

    def after_optimizer_step(self):
        super().after_optimizer_step()
        if world_size() > 1:
            average_batchnorm_statistics_(self.extra_modules["heads"])

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self):
        state = super().extra_checkpoint_state()
        state["occ"] = self.occ.state_dict()
        if self.memory_generator is not None:
            state["memory_generator"] = self.memory_generator.get_state()
        return state

    def restore_extra_checkpoint_state(self, state):
        super().restore_extra_checkpoint_state(state)
        self.occ.load_state_dict(state["occ"])
        if self.memory_generator is not None and state.get("memory_generator") is not None:
            self.memory_generator.set_state(state["memory_generator"])
        self.caml_step = self.current_epoch * self.num_iterations_per_epoch


class CAMLPaperOptimTrainerBase(CAMLTrainerBase):
    """CAMLTrainer with the official LA training recipe where nnU-Net allows it: SGD (momentum 0.9, no Nesterov,
    weight decay 1e-4) at a constant learning rate 0.01, 15,000 iterations (60 epochs x 250), foreground soft Dice
    without cross entropy and without deep supervision, the official supervised weight 0.5, ramp length 6,000
    iterations advanced every 150 (R = 40, the 4-label setting). Patch size, augmentation and networks stay
    nnU-Net's."""

    w_sup = 0.5
    rampup_iterations = 6000
    rampup_quantum = 150

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 60
        self.weight_decay = 1e-4
        self.enable_deep_supervision = False

    def configure_optimizers(self):
        optimizer, _ = super().configure_optimizers()  # builds the extra modules; keep every parameter
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer = torch.optim.SGD(params, lr=self.initial_lr, momentum=0.9, weight_decay=self.weight_decay,
                                    nesterov=False)
        # exponent 0: (1 - epoch / num_epochs) ** 0 == 1, i.e. nnU-Net's scheduler interface with a constant rate
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=0.0)

    def _build_loss(self):
        return ForegroundDiceLoss(self.label_manager.ignore_label)
