"""Frozen-feature linear probing of SupCon checkpoints, checkpoint selection on val, test metrics, reports.

The test metrics themselves (with bootstrap intervals) are ``supcon.metrics``, shared with the baselines.

Modules, in the order data flows through them:

- ``config``: the typed options of ``probe-all`` and ``check-accuracies``.
- ``runs``: what a run directory tells (folders, class names, kind) and the folder checks.
- ``checkpoints``: which checkpoints to probe, their content hashes, the frozen encoder.
- ``features``: encoding folders once per checkpoint, the on-disk feature cache, augmented batches.
- ``probe``: training one linear head on frozen features, validating every head epoch.
- ``plateau``: ``--from auto``, the first epoch where the loss curve has plateaued.
- ``probe_all``: the ``probe-all`` pipeline over a run's checkpoints.
- ``select``: a run's (checkpoint, head) chosen on validation: ``trend`` (default), ``within-noise`` or
  ``max-val-acc``.
- ``compare``: paired comparison of runs on the same test images (McNemar, paired F1 bootstrap).
- ``check``: the ``check-accuracies`` pipeline over runs.
- ``report``: CSV / markdown tables and PNG plots.
- ``cli``: the two click commands.
"""
