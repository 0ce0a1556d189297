"""CAML (Gao et al., "Correlation-Aware Mutual Learning for Semi-supervised Medical Image Segmentation", MICCAI 2023)
for nnU-Net: auxiliary network and CMA (``networks``, ``attention``), memory bank and Omni-Correlation Consistency
(``memory_bank``, ``occ``), losses and ramp-up. The trainer is ``CAMLTrainer`` in the installed trainers folder."""
