"""CFCML trainers: case-level classification from image channel groups plus a table, next to nnU-Net's
segmentation (T. Liu et al., "CFCML: A Coarse-to-Fine Crossmodal Learning Framework for Disease Diagnosis Using
Multimodal Images and Tabular Data", arXiv 2603.20016; follows the official implementation IsDling/CFCML).

Prepare with ``nnunet-ext configure cfcml -d D -p PLANS -o PLANS_CFCML``, train with
``nnUNetv2_train D CONFIG FOLD -tr CFCMLTrainer -p PLANS_CFCML``, predict class probabilities with
``nnunet-ext predict-cls``. The variants below form the honest comparison set: same encoders, data, sampler,
schedule and budget; each changes one thing through ``cfcml_overrides``.
"""
from nnunet_ext.cfcml.trainer import CFCMLTrainerCore


class CFCMLTrainer(CFCMLTrainerCore):
    """Full CFCML: MG-CIE coarse stage (4 granularities, cross-attention between modalities) + HRM fine stage."""


class CFCMLTrainer_noHRM(CFCMLTrainerCore):
    """Ablation: cross-entropy only (w_sam = w_up = w_cp = 0; HRM terms are not computed and logged as NaN)."""

    cfcml_overrides = {"w_sam": 0.0, "w_up": 0.0, "w_cp": 0.0}


class CFCMLTrainer_noMGCIE(CFCMLTrainerCore):
    """Ablation of the coarse stage: last encoder stage only, no cross-attention; HRM kept."""

    cfcml_overrides = {"num_granularities": 1, "fusion": "concat"}


class CFCMLTrainer_concat(CFCMLTrainerCore):
    """Baseline: plain concatenation (late) fusion of the pooled per-modality features, no cross-attention, no
    HRM."""

    cfcml_overrides = {"fusion": "concat", "w_sam": 0.0, "w_up": 0.0, "w_cp": 0.0}


class CFCMLTrainer_imageOnly(CFCMLTrainerCore):
    """Baseline: image groups only (no tabular branch), same encoders, token compression and head."""

    cfcml_overrides = {"modalities": "image", "w_sam": 0.0, "w_up": 0.0, "w_cp": 0.0}


class CFCMLTrainer_tabularOnly(CFCMLTrainerCore):
    """Baseline: tabular tokenizer + head only; the image encoders serve the segmentation decoder alone."""

    cfcml_overrides = {"modalities": "tabular", "w_sam": 0.0, "w_up": 0.0, "w_cp": 0.0}
