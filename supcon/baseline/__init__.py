"""Supervised baselines (``baseline-train``): timm/torchvision/custom classifiers trained with
cross-entropy, in the same run-directory format as SupCon runs, so check-accuracies compares them.

Modules: ``nets`` (the custom small nets), ``models`` (factory, heads, ``--freeze``), ``data``
(augmentation presets, stratified val split), ``losses``, ``metrics``, ``train`` (loop, early
stopping, checkpoints), ``evaluate`` (``predict_run`` for check-accuracies), ``grid``, ``cli``.
"""
