"""Print the one summary table of a scripts/gpu_check.sh folder: stages, training, loading, the pipeline.

    python scripts/gpu_check_summary.py benchmarks/gpu_check_<date>_<time>
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import markdown_table  # noqa: E402

TRAIN_FILES = ("train.json", "train_batches.json", "train_seresnext.json")


def stage_rows(folder: Path) -> list[list]:
    path = folder / "stages.tsv"
    if not path.is_file():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def train_rows(folder: Path) -> tuple[list[list], str | None]:
    rows, device = [], None
    for name in TRAIN_FILES:
        path = folder / name
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        facts = report["device"]
        device = device or f"{facts['name']} ({facts['type']}), torch {report['versions']['torch']}"
        for r in report["results"]:
            data = r["data"] + (f" ({r['num_workers']} workers)" if "num_workers" in r else "")
            rows.append([r["model"], r["batch_size"], r["size"], data, r["setting"],
                         r.get("images_per_s", r.get("error")), r.get("ratio_vs_plain"), r.get("ratio_vs_reference"),
                         r.get("peak_memory_gb")])
    return rows, device


def loader_rows(folder: Path) -> list[list]:
    path = folder / "loader.json"
    if not path.is_file():
        return []
    return [[r["pipeline"], r["num_workers"], r["images_per_s"], r.get("loader_over_training")]
            for r in json.loads(path.read_text())["results"]]


def profile_rows(folder: Path) -> tuple[list[list], str]:
    path = folder / "profile_step.json"
    if not path.is_file():
        return [], ""
    report = json.loads(path.read_text())
    results, settings = report["results"], report["settings"]
    reference = results["reference loop"].get("cpu_seconds_per_step")
    rows = [[name, r["ops_per_step"], r["syncs_per_step"], r.get("cpu_seconds_per_step"),
             round(r["cpu_seconds_per_step"] / reference, 3) if reference and r.get("cpu_seconds_per_step") else None]
            for name, r in results.items()]
    augment = results["DeviceAugment alone"].get("device_ops_per_batch")
    layout = "channels-last" if settings["channels_last"] else "NCHW"
    title = (f"{settings['model']} @{settings['size']} px, batch {settings['batch_size']}, {settings['precision']}, "
             f"{layout}; DeviceAugment: {augment} device ops per batch")
    return rows, title


#: The columns of check-accuracies' comparison.csv worth a line of the summary (the CSV has them all).
PIPELINE_COLUMNS = ("kind", "batch_size", "backbone_epoch", "head_epoch", "val_accuracy", "accuracy", "f1",
                    "num_test", "network")


def pipeline_rows(folder: Path) -> tuple[list[str], list[list]]:
    path = folder / "pipeline" / "comparison.csv"
    if not path.is_file():
        return [], []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = [c for c in PIPELINE_COLUMNS if rows and c in rows[0]]
    return columns, [[row[c] for c in columns] for row in rows]


def summary(folder: Path) -> str:
    parts = [f"# gpu_check summary: {folder}"]
    stages = stage_rows(folder)
    parts += ["", "## Stages", "", markdown_table(["stage", "status", "seconds", "budget s"], stages)]
    rows, device = train_rows(folder)
    if rows:
        parts += ["", f"## Training, source images/s (2 views each): {device}", "",
                  markdown_table(["model", "batch", "px", "data", "setting", "img/s", "x plain", "x reference",
                                  "peak GB"], rows)]
    loader = loader_rows(folder)
    if loader:
        parts += ["", "## Loading alone, source images/s", "",
                  markdown_table(["pipeline", "workers", "img/s", "x training"], loader)]
    profile, title = profile_rows(folder)
    if profile:
        parts += ["", f"## Per step: ops (kernel launches), host syncs, host CPU time: {title}", "",
                  markdown_table(["step", "ops/step", "host syncs/step", "host CPU s/step", "x reference"], profile)]
    columns, pipeline = pipeline_rows(folder)
    if pipeline:
        parts += ["", "## supcon-train -> probe-all -> check-accuracies (generated JPEGs: chance-level data)", "",
                  markdown_table(columns, pipeline)]
    failed = [s[0] for s in stages if s[1] != "ok" and not s[1].startswith("skipped")]
    parts += ["", "failed stages: " + (", ".join(failed) if failed else "none")]
    return "\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: gpu_check_summary.py FOLDER (written by scripts/gpu_check.sh)")
    print(summary(Path(sys.argv[1])))
