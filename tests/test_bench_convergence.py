"""scripts/bench_convergence.py's summary: tables and verdicts from the cell files alone (no run folders), so a later
session can finish the benchmark; the CE configuration is chosen on val only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_bench_scripts import load_script


def cell(dataset, seed, runs):
    return {"dataset": dataset, "seed": seed, "ce_choice": "ce_supcon_cosine", "runs": runs}


def entry(correct, epochs=400, seconds=600.0, val=0.8):
    accuracy = correct.count("1") / len(correct)
    return {"run": "x", "epochs": epochs, "train_seconds": seconds, "val_accuracy": val,
            "test": {"accuracy": accuracy, "interval": [accuracy - 0.05, accuracy + 0.05], "correct": correct}}


def test_the_verdict_pools_the_seeds_test_images_by_mcnemar(tmp_path):
    bench = load_script("bench_convergence")
    cells = tmp_path / "cells"
    cells.mkdir()
    # seed 0: SupCon right on 10 images CE gets wrong; seed 1: the reverse on 2; everything else agrees
    supcon = ["1" * 10 + "1" * 30, "0" * 2 + "1" * 38]
    ce = ["0" * 10 + "1" * 30, "1" * 2 + "1" * 38]
    for seed in (0, 1):
        runs = {"cosine400": entry(supcon[seed]), "ce_best": entry(ce[seed], epochs=200, seconds=120.0)}
        (cells / f"textures_seed{seed}.json").write_text(json.dumps(cell("textures", seed, runs)))
    # a cell of another set with the CE run missing: a row, but no verdict
    (cells / "digits_seed0.json").write_text(json.dumps(cell("digits", 0, {"cosine400": entry("1" * 20)})))
    summary, markdown = bench.summarize(tmp_path, val_only=False)
    verdict = summary["textures"]["verdicts"]["cosine400"]
    assert (verdict["only_this_correct"], verdict["only_rival_correct"], verdict["seeds"]) == (10, 2, [0, 1])
    from scipy.stats import binomtest

    assert verdict["mcnemar_exact_p"] == pytest.approx(binomtest(2, 12).pvalue)
    assert verdict["outcome"] == "beats" and verdict["accuracy"] == pytest.approx(78 / 80)
    assert "SupCon cosine 400 + probe beats CE at its best: 97.50% vs 87.50% over seeds 0, 1" in markdown
    assert "CE from scratch, best of the grid on val (ce_supcon_cosine)" in markdown
    assert summary["digits"]["verdicts"] == {} and "### digits" in markdown
    assert summary["textures"]["table"]["ce_best"]["epochs"] == [200, 200]


def test_the_ce_configuration_is_chosen_by_val_accuracy_of_finished_runs(tmp_path):
    bench = load_script("bench_convergence")
    runs = tmp_path / "runs" / "textures" / "seed0"
    for name, val in zip(bench.CE_GRID, [0.80, 0.86, 0.86, 0.70]):
        (runs / name).mkdir(parents=True)
        torch.save({"best_val_accuracy": val}, runs / name / "best.pth")
        epochs = bench.CE_EPOCHS if name != "ce_supcon_cosine" else 10  # one run unfinished
        (runs / name / "metrics.csv").write_text("epoch\n" + "\n".join(str(e) for e in range(1, epochs + 1)) + "\n")
    assert bench.ce_choice(tmp_path, "textures", 0) is None  # not before the whole grid is done
    rows = "epoch\n" + "\n".join(str(e) for e in range(1, bench.CE_EPOCHS + 1)) + "\n"
    (runs / "ce_supcon_cosine" / "metrics.csv").write_text(rows)
    # a tie on val goes to the grid's first configuration; test accuracy is never read
    assert bench.ce_choice(tmp_path, "textures", 0) == "ce_standard_cosine"
    assert np.isclose(bench.val_accuracy(runs / "ce_standard_cosine"), 0.86)
