"""CFCML: coarse-to-fine crossmodal image + tabular classification on nnU-Net (issue 7).

Modules: ``tabular`` (sidecar schema and encoding), ``network`` (CFCMLNet), ``losses`` (HRM), ``sampler``
(class-balanced batches), ``schedule`` (lr), ``data`` (whole-case crops), ``configure`` (plans block),
``trainer`` (hooks of ``CFCMLTrainer``), ``metrics``, ``predict`` and ``commands`` (``predict-cls``).
Nothing heavy is imported here.
"""
