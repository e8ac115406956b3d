"""supcon-report: the page renders in headless Chromium (no console errors, every image drawn), its numbers
agree with check-accuracies, PNGs are kept, bad input gets one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from linear_probe.check import check_accuracies
from linear_probe.config import CheckConfig
from linear_probe.use_cli import report_command
from tests.probe_helpers import copy_run, invoke, one_line_error, probed_run, snapshot
from tests.use_helpers import binary_baseline_run

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def reported(trained_run, tmp_path_factory):
    """A probed SupCon run and a two-class baseline run, checked, then reported together."""
    root = tmp_path_factory.mktemp("reported")
    supcon = copy_run(probed_run(trained_run, tmp_path_factory), root / "supcon_run")
    baseline = binary_baseline_run(tmp_path_factory)
    check_accuracies(CheckConfig(runs=[str(supcon)], num_workers=0, output=str(root), device="cpu"))
    result = invoke(report_command, ["--run", supcon, "--run", baseline, "--device", "cpu", "--cam-images", "4",
                                     "--feature-map-images", "2"])
    assert result.exit_code == 0, result.output
    return supcon, baseline, result.output


def test_report_files_and_numbers(reported):
    supcon, baseline, output = reported
    page = supcon / "report" / "index.html"
    assert f"report: {page}" in output and f"report: {baseline / 'report' / 'index.html'}" in output
    for name in ("curves.png", "probe_accuracy.png", "confusion_matrix.png", "embeddings.png", "feature_maps_1.png",
                 "feature_maps_2.png", "grad_cam.png"):
        assert (supcon / "report" / name).stat().st_size > 1000, name
    assert (baseline / "report" / "roc_curve.png").is_file()  # two classes
    assert not (baseline / "report" / "probe_accuracy.png").exists()  # a baseline has no probes
    html = page.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    expected = json.loads((supcon / "test_metrics.json").read_text())
    accuracy = f"{100 * expected['metrics']['accuracy']:.2f}%"
    assert f"test accuracy {accuracy}" in html or accuracy in html
    assert expected["selection"]["checkpoint"] in html
    # both runs in the comparison table of each page
    for run_page in (page, baseline / "report" / "index.html"):
        text = run_page.read_text()
        assert "supcon_run" in text and baseline.name in text


def render_in_chromium(chromium: str, page_file: Path, screenshot: Path) -> tuple[list[str], list[dict]]:
    """Load a page in headless Chromium: ``(console errors / page errors / failed requests, image sizes)``."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"request failed {r.url}"))
        page.goto(page_file.as_uri(), wait_until="load")
        sizes = page.evaluate("""() => Array.from(document.images).map(i => ({
            alt: i.alt, natural: i.naturalWidth * i.naturalHeight, complete: i.complete,
            shown: i.getBoundingClientRect().width * i.getBoundingClientRect().height}))""")
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return problems, sizes


def test_report_renders_in_headless_chromium(reported, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    supcon, baseline, _ = reported
    for run in (supcon, baseline):
        problems, sizes = render_in_chromium(chromium, run / "report" / "index.html", tmp_path / f"{run.name}.png")
        assert problems == []
        assert len(sizes) >= 6
        assert all(s["complete"] and s["natural"] > 0 and s["shown"] > 0 for s in sizes), sizes
        assert (tmp_path / f"{run.name}.png").stat().st_size > 10_000


def test_bad_inputs_one_line_errors(trained_run, reported, tmp_path):
    result = invoke(report_command, ["--run", tmp_path / "nowhere"])
    assert result.exit_code == 2 and "run directory not found" in one_line_error(result)

    never = copy_run(trained_run, tmp_path / "never")
    result = invoke(report_command, ["--run", never])
    assert result.exit_code == 2 and "never probed" in one_line_error(result)
    assert not (never / "report").exists()

    supcon = reported[0]
    empty = tmp_path / "empty_test"
    for name in ("cat", "dog", "fox"):
        (empty / name).mkdir(parents=True)
    before = snapshot(supcon / "report")
    result = invoke(report_command, ["--run", supcon, "--test-folder", empty])
    assert result.exit_code == 2 and re.search(r"no images|has no", one_line_error(result))
    assert snapshot(supcon / "report") == before  # nothing rewritten


def test_console_scripts_and_module_entry_points_run(tmp_path):
    """setup.cfg's three scripts point at click commands that run; ``python -m`` runs the same commands."""
    import configparser
    import importlib
    import os
    import subprocess
    import sys

    from click.testing import CliRunner

    root = Path(__file__).parents[1]
    parser = configparser.ConfigParser()
    parser.read(root / "setup.cfg")
    scripts = dict(line.split(" = ") for line in parser["options.entry_points"]["console_scripts"].strip().splitlines())
    for name, usage in (("supcon-export", "--onnx"), ("predict", "--threshold"), ("supcon-report", "--cam-images")):
        module, attribute = scripts[name].split(":")
        result = CliRunner().invoke(getattr(importlib.import_module(module), attribute), ["--help"])
        assert result.exit_code == 0 and usage in result.output, name
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    nowhere, out = str(tmp_path / "nowhere"), str(tmp_path / "out")
    for module, args in (("linear_probe.use_cli", ["supcon-export", "--run", nowhere, "--out", out]),
                         ("linear_probe.use_cli", ["predict", "--run", nowhere, str(tmp_path), "--out", out]),
                         ("linear_probe.run_report", ["--run", nowhere])):
        done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 2 and done.stderr.strip().startswith("Error: run directory not found"), done.stderr
