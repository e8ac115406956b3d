"""Frozen-feature linear probing of SupCon checkpoints, checkpoint selection on val, test metrics, reports.

The test metrics themselves (with bootstrap intervals) are ``supcon.metrics``, shared with the baselines.
The same map with more detail: ``linear_probe/README.md``.

Modules, in the order data flows through them:

- ``config``: the typed options of ``probe-all`` and ``check-accuracies`` (defaults < ``--config`` < command line).
- ``runs``: what a run directory tells the later stages (kind, class names, folders) and the folder checks.
- ``checkpoints``: which checkpoints of a run to probe, and whether a checkpoint fits its run.
- ``features``: encoding a folder once per checkpoint, the on-disk feature cache, augmented batches.
- ``probe``: one linear head (SGD) on frozen features, validated after every head epoch.
- ``lbfgs``: ``--head-solver lbfgs``: the logistic regression of ``supcon.logistic`` as a probe head.
- ``heads``: probe results on disk, one head file per (checkpoint, probe settings) under ``RUN/probe/heads/``.
- ``probe_start``: ``--from auto``, where probing starts: the first backbone epoch worth probing, from the run's
  logged curves.
- ``probe_all``: the ``probe-all`` pipeline over a run's checkpoints (table, plot, ``selection.json``).
- ``select``: a run's (checkpoint, head) chosen on val only: ``trend`` (default), ``within-noise`` or
  ``max-val-acc``.
- ``compare``: paired comparison of runs on the same test images (McNemar, paired F1 bootstrap).
- ``operating_point``: a two-class run's decision threshold, chosen on val by an ``--operating-point`` rule and
  recorded as ``RUN/operating_point.json`` for predict and export.
- ``check``: the ``check-accuracies`` pipeline over runs: test once, ``comparison.{csv,md}``.
- ``tables_and_plots``: the CSV / markdown tables and PNG plots that ``probe-all`` and ``check-accuracies``
  write.
- ``cli``: ``probe-all`` and ``check-accuracies``, thin click shells.

Using the selected model:

- ``classifier``: a run's classifier rebuilt from its run directory, shared by export, predict and ``run_report``.
- ``export``: ``supcon-export``, timm safetensors (+ config.json), optionally ONNX checked with onnxruntime.
- ``predict``: ``predict``, one CSV row per image with the class probabilities.
- ``use_cli``: ``supcon-export``, ``predict`` and ``supcon-report``, thin click shells.
- ``run_report`` (``supcon-report``): a self-contained HTML report per run.

  - ``run_report.build``: ``RUN/report/index.html`` for each run given, with its figures also as PNGs.
  - ``run_report.figures``: the report's figures (matplotlib ``Figure`` + Agg, no pyplot state).
  - ``run_report.network_views``: what the network sees: t-SNE / UMAP maps, per-stage feature maps, Grad-CAM.
  - ``run_report.page``: the self-contained HTML page (images as data URIs, inline CSS, no script).
  - ``run_report.__main__``: ``python -m linear_probe.run_report``, the same as ``supcon-report``.
"""
