"""L-BFGS logistic regression (supcon/logistic.py) and ``probe-all --head-solver lbfgs``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from linear_probe.cli import probe_all_command
from linear_probe.config import ProbeConfig
from linear_probe.heads import load_head_records, load_head_state
from linear_probe.probe import HeadSettings, make_head
from linear_probe.probe_all import probe_all
from supcon.logistic import C_GRID, fit_logistic_regression, linear_scores
from tests.probe_helpers import copy_run, snapshot


def blobs(num_classes: int, per_class: int, dim: int, seed: int, spread: float = 1.5):
    """Overlapping Gaussian blobs with dimensions on very different scales (as raw features are)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 1, (num_classes, dim))
    x = np.concatenate([rng.normal(c, spread, (per_class, dim)) for c in centres])
    x *= np.logspace(-2, 2, dim)  # dimension scales from 0.01 to 100
    y = np.repeat(np.arange(num_classes), per_class)
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_folded_head_equals_scaler_plus_scikit_learn_and_c_is_the_val_best(num_classes):
    train_x, train_y = blobs(num_classes, 40, 12, seed=0)
    val_x, val_y = blobs(num_classes, 25, 12, seed=1)
    fit = fit_logistic_regression(train_x, train_y, val_x, val_y, num_classes)

    # Each C fit independently (no warm start) by a scikit-learn pipeline.
    accuracies = {}
    for c in C_GRID:
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, tol=1e-10))
        pipe.fit(train_x.numpy(), train_y.numpy())
        accuracies[c] = (pipe.predict(val_x.numpy()) == val_y.numpy()).mean()
    assert fit.val_accuracy == pytest.approx(max(accuracies.values()), abs=1 / len(val_y) + 1e-6)
    assert fit.val_accuracy_per_c == pytest.approx([accuracies[c] for c in C_GRID], abs=1 / len(val_y) + 1e-6)
    assert fit.c in C_GRID

    reference = make_pipeline(StandardScaler(), LogisticRegression(C=fit.c, max_iter=5000, tol=1e-10))
    reference.fit(train_x.numpy(), train_y.numpy())
    ours = torch.softmax(linear_scores(val_x, fit.weight.double(), fit.bias.double()), dim=1).numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(val_x.numpy()), atol=2e-3)
    assert fit.weight.shape == (num_classes, 12) and fit.bias.shape == (num_classes,)


def test_accuracy_ties_go_to_the_lower_val_loss():
    # Perfectly separable: every C reaches val accuracy 1, and the val loss falls as C grows.
    train_x, train_y = blobs(3, 30, 5, seed=0, spread=0.05)
    val_x, val_y = blobs(3, 10, 5, seed=1, spread=0.05)
    fit = fit_logistic_regression(train_x, train_y, val_x, val_y, 3, c_grid=(0.01, 1.0, 100.0))
    assert fit.val_accuracy_per_c == [1.0, 1.0, 1.0]
    assert fit.val_loss_per_c[0] > fit.val_loss_per_c[1] > fit.val_loss_per_c[2]
    assert fit.c == 100.0


def test_sgd_settings_keep_their_keys_and_lbfgs_records_only_what_it_uses():
    # The SGD dict is what it was before --head-solver existed, so old heads keep matching.
    assert set(HeadSettings().to_dict()) == {"batch_size", "learning_rate", "momentum", "weight_decay", "epochs",
                                             "cosine", "augment", "seed"}
    lbfgs = HeadSettings(head_solver="lbfgs", learning_rate=0.1).to_dict()
    assert lbfgs == HeadSettings(head_solver="lbfgs", learning_rate=0.9, epochs=3).to_dict()
    assert lbfgs["head_solver"] == "lbfgs" and lbfgs["c_grid"] == list(C_GRID)


def test_probe_all_lbfgs_heads_beside_sgd_heads(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    probe_all(ProbeConfig(run=str(run), num_workers=0, epochs=3, head_solver="sgd"))
    result = probe_all(ProbeConfig(run=str(run), num_workers=0, head_solver="lbfgs"))
    assert sorted(result.probed) == ["ckpt_epoch_2.pth", "ckpt_epoch_4.pth"]
    records = load_head_records(run / "probe", run)
    lbfgs = [r for r in records if r.settings.get("head_solver") == "lbfgs"]
    sgd = [r for r in records if "head_solver" not in r.settings]
    assert len(lbfgs) == 2 and len(sgd) == 2
    for record in lbfgs:
        assert record.regularization_c in C_GRID
        assert record.best_head_epoch == 1 and len(record.val_accuracy_per_epoch) == len(C_GRID)
        assert record.best_val_accuracy == max(record.val_accuracy_per_epoch)
        head = make_head(record.feature_dim, 3, seed=0)
        head.load_state_dict(load_head_state(record.path)["state_dict"])  # an nn.Linear, like an SGD head
    assert "L-BFGS" in result.table_markdown
    again = probe_all(ProbeConfig(run=str(run), num_workers=0, head_solver="lbfgs"))
    assert again.probed == [] and len(again.skipped) == 2


def test_lbfgs_with_augment_is_refused(trained_run):
    result = CliRunner().invoke(probe_all_command, ["--run", str(trained_run), "--head-solver", "lbfgs", "--augment"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Error: --head-solver lbfgs" in result.output and "--augment" in result.output


@pytest.mark.parametrize(("options", "solver"), [({}, "lbfgs"), ({"augment": True}, "sgd"),
                                                 ({"head_solver": "sgd", "learning_rate": 0.1}, "sgd"),
                                                 ({"head_solver": "lbfgs", "epochs": 100}, "lbfgs")])
def test_the_head_solver_a_config_resolves_to(options, solver):
    config = ProbeConfig(run="r", **options)
    config.validate()
    assert config.head_solver == solver


@pytest.mark.parametrize("argv", [["--lr", "0.1"], ["--epochs", "3"], ["--head-solver", "lbfgs", "--no-cosine"]])
def test_an_sgd_option_with_the_lbfgs_head_is_refused_in_one_line(trained_run, tmp_path, argv):
    """The default head is L-BFGS: an SGD-only option would be silently ignored, so it is refused instead."""
    run = copy_run(trained_run, tmp_path / "run")
    before = snapshot(run)
    result = CliRunner().invoke(probe_all_command, ["--run", str(run), *argv])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Error: --" in result.output and "add --head-solver sgd" in result.output
    assert snapshot(run) == before


def test_equal_val_counts_give_equal_accuracies_for_both_heads():
    # 358 of 359 right, as the SGD head's evaluate_head and the L-BFGS fit compute it: exactly the same number,
    # so the choice on val between the two kinds of head goes by the tie rule, not by float rounding.
    from linear_probe.probe import evaluate_head

    train_x, train_y = blobs(2, 40, 3, seed=0, spread=0.05)
    val_x, val_y = blobs(2, 180, 3, seed=1, spread=0.05)
    val_x, val_y = val_x[:359], val_y[:359].clone()
    val_y[0] = 1 - val_y[0]  # one wrong label: 358 / 359 at best
    fit = fit_logistic_regression(train_x, train_y, val_x, val_y, 2, c_grid=(1.0,))
    head = make_head(3, 2, seed=0)
    head.load_state_dict({"weight": fit.weight, "bias": fit.bias})
    assert fit.val_accuracy == evaluate_head(head, val_x.float(), val_y)[0]
