"""``python -m linear_probe.run_report``: the same as ``supcon-report``."""

from linear_probe.use_cli import report_main

report_main()
