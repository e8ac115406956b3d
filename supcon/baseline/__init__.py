"""Supervised baselines (``baseline-train``): timm/torchvision/custom classifiers trained with
cross-entropy, in the same run-directory format as SupCon runs, so check-accuracies compares them.

Modules: ``nets`` (the custom small nets), ``models`` (factory, heads, ``--freeze``), ``data`` (the
checked images, augmentation presets, stratified val split), ``losses``, ``config``, ``epoch`` (one
epoch of steps), ``trainer`` (validation, early stopping, checkpoints), ``train`` (the entry),
``evaluate`` (validation, ``predict_run`` for check-accuracies), ``grid``, ``cli``; the classical
models (``--model svm|logreg|knn``): ``classical`` (the run), ``classical_models`` (the
scikit-learn models as tensors) and ``classical_features`` (their feature sources). The map of
``supcon/`` is ``supcon/README.md``.
"""
