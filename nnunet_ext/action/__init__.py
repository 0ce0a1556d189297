"""ACTION and ACTION++ (You et al., IPMI 2023 / MICCAI 2023) inside nnU-Net.

Building blocks of the staged semi-supervised method: decoder-feature taps (:mod:`.features`), projection and
representation heads (:mod:`.heads`), FIFO memory queues (:mod:`.queue`), the similarity-distillation losses of
stages i/ii (:mod:`.distillation`), student-view perturbations and CutMix/ClassMix (:mod:`.views`), the sparse
pixel sampler and the anatomical contrast of stage iii (:mod:`.sampling`, :mod:`.anco`), ACTION++'s supervised
adaptive anatomical contrast (:mod:`.saacl`), and stage/temperature schedules (:mod:`.schedules`). The trainer
logic is in :mod:`.trainer`; ``trainers/action_trainers.py`` holds the thin classes nnU-Net finds.
"""
