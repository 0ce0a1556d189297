"""CIML trainers (Shen et al., Neural Networks 2024): per-modality encoders, per-subtask decoders, gated
variational messages from auxiliary to primary branches. Logic: ``nnunet_ext.ciml``; docs: ``docs/ciml.md``.

Train: ``nnUNetv2_train D CONFIG FOLD -tr CIMLTrainer [-p nnUNetPlans_CIML]``; the decomposition comes from plans
written by ``nnunet-ext configure ciml`` or, without one, the automatic default (one subtask, channel 0 primary).
"""
from nnunet_ext.ciml.trainer import CIMLTrainerBase


class CIMLTrainer(CIMLTrainerBase):
    """CIML with the plans' (or the automatic) decomposition and the default hyper-parameters."""


class CIMLTrainer_noVIB(CIMLTrainerBase):
    """Attention-gated additive messages without the bottleneck (deterministic messages, beta 0)."""

    ciml_overrides = {"variational": False, "beta": 0.0}


class CIMLTrainer_noMessages(CIMLTrainerBase):
    """Ablation: the decomposition only, i.e. independent unimodal subtask networks (no messages)."""

    ciml_overrides = {"messages": False}


class CIMLTrainer_sharedMsg(CIMLTrainerBase):
    """One variational message per sender and stage, shared by all receiving subtasks (memory saver)."""

    ciml_overrides = {"message_mode": "shared"}
