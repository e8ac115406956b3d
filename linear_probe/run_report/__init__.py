"""``supcon-report``: a self-contained HTML report of a run (see :mod:`linear_probe.run_report.build`)."""

from linear_probe.run_report.build import INDEX, REPORT_DIR, ReportConfig, build_reports

__all__ = ["INDEX", "REPORT_DIR", "ReportConfig", "build_reports"]
