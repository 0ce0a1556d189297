"""CIML: complementary information mutual learning for multimodal segmentation inside nnU-Net.

Shen et al., "Complementary information mutual learning for multimodality medical image segmentation",
Neural Networks 180:106670 (2024), arXiv 2401.02717. No official code exists; the layer layout, message placement,
attention form and hyper-parameters here are this package's design decisions (see ``docs/ciml.md``), not a
reproduction of the paper.

Modules:
    decomposition: task decomposition (subtasks, primary/auxiliary modalities) and settings validation.
    vib: Gaussian KL of the variational messages and the beta warm-up schedule.
    network: ``CIMLNet`` (one encoder per modality, one decoder per subtask, gated variational messages).
    configure: ``nnunet-ext configure ciml`` (derived plans carrying the resolved decomposition).
    trainer: ``CIMLTrainerBase``, the logic behind the thin trainers in ``trainers/ciml_trainers.py``.
    explain / predict / commands: ``nnunet-ext explain`` and ``nnunet-ext predict --missing``.
"""
