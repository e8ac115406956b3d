"""Operating points: the rules against hand-worked examples; check-accuracies choosing the threshold on val only,
testing at it and recording it; predict and supcon-export using it; every bad input refused in one line."""

from __future__ import annotations

import csv
import json
import logging
import shutil

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from linear_probe.cli import check_accuracies_command
from linear_probe.operating_point import (
    OPERATING_POINT_FILE,
    OperatingPoint,
    OperatingRule,
    choose_operating_point,
    choose_threshold,
    load_operating_point,
    parse_rule,
    resolve_decision,
    write_operating_point,
)
from linear_probe.use_cli import export_command, predict_command
from supcon.errors import UserError
from tests.conftest import write_image_folder
from tests.probe_helpers import copy_run, edit_run_config, invoke, one_line_error, snapshot

# --- the rules, by hand ----------------------------------------------------------------------------------------

# Ten val images, highest score first; each distinct score s is a candidate "positive where P >= s"
# (5 positives, 5 negatives):
#   score   0.95 0.90 0.80 0.70 0.60 0.50 0.40 0.30 0.20 0.10
#   label     1    1    0    1    1    0    0    1    0    0
#   TP        1    2    2    3    4    4    4    5    5    5
#   FP        0    0    1    1    1    2    3    3    4    5
#   recall   .2   .4   .4   .6   .8   .8   .8    1    1    1
#   precis.   1    1  .67  .75   .8  .67  .57 .625  .56   .5
#   spec.     1    1   .8   .8   .8   .6   .4   .4   .2    0
#   F1      .33  .57   .5  .67   .8  .73  .67  .77  .71  .67     F1 = 2TP / (TP + FP + 5)
#   Youden   .2   .4   .2   .4   .6   .4   .2   .4   .2    0
# max-f1 and youden: the cut at 0.60 (F1 0.8, J 0.6); recall>=0.8: cuts 0.60..0.10 reach it, 0.60 has the best
# precision (0.8); recall>=0.9: cuts 0.30, 0.20, 0.10, best precision at 0.30 (0.625); precision>=0.9: cuts 0.95
# and 0.90, best recall at 0.90; specificity>=0.75: cuts 0.95..0.60, best recall at 0.60. The recorded threshold is
# the midpoint to the next lower score: 0.60 -> 0.55, 0.30 -> 0.25, 0.90 -> 0.85.
SCORES = np.array([0.95, 0.90, 0.80, 0.70, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10])
IS_POSITIVE = np.array([1, 1, 0, 1, 1, 0, 0, 1, 0, 0], dtype=bool)


@pytest.mark.parametrize("rule,threshold", [
    ("max-f1", 0.55), ("youden", 0.55), ("recall>=0.8", 0.55), ("recall>=0.9", 0.25), ("precision>=0.9", 0.85),
    ("specificity>=0.75", 0.55), ("specificity>=1", 0.85), ("recall>=1", 0.25)])
def test_each_rule_picks_the_hand_worked_threshold(rule, threshold):
    order = np.random.default_rng(0).permutation(10)  # the order of the images does not matter
    assert choose_threshold(IS_POSITIVE[order], SCORES[order], parse_rule(rule)) == pytest.approx(threshold)


def test_the_val_figures_recorded_at_the_chosen_threshold():
    probabilities = np.stack([1 - SCORES, SCORES], axis=1)
    point = choose_operating_point("recall>=0.9", IS_POSITIVE.astype(int), probabilities, ["neg", "pos"], 1)
    # at 0.25: the top 8 images are called positive: TP 5, FP 3, FN 0, TN 2
    assert (point.rule, point.positive_class, point.threshold) == ("recall>=0.9", "pos", pytest.approx(0.25))
    val = point.val
    assert (val["true_positives"], val["false_positives"], val["false_negatives"], val["true_negatives"]) == (
        5, 3, 0, 2)
    assert (val["sensitivity"], val["specificity"], val["precision"], val["f1"]) == pytest.approx(
        (1.0, 0.4, 5 / 8, 10 / 13))
    argmax = choose_operating_point("argmax", IS_POSITIVE.astype(int), probabilities, ["neg", "pos"], 1)
    assert argmax.threshold == 0.5 and argmax.val["true_positives"] == 4 and argmax.val["false_positives"] == 1


def test_tied_scores_are_one_candidate_and_the_lowest_score_is_its_own_threshold():
    # scores 0.9 (neg), 0.5 (pos), 0.5 (neg), 0.2 (pos): recall>=1 is reached only at the lowest score, which
    # has no lower neighbour, so the threshold is 0.2 itself; the tie at 0.5 is called positive or not as one
    assert choose_threshold(np.array([0, 1, 0, 1], bool), np.array([0.9, 0.5, 0.5, 0.2]),
                            OperatingRule("recall", 1.0)) == 0.2
    # max-f1: cuts 0.9 (F1 0), 0.5 (TP 1 FP 2: 2/5), 0.2 (TP 2 FP 2: 4/6) -> 0.2
    assert choose_threshold(np.array([0, 1, 0, 1], bool), np.array([0.9, 0.5, 0.5, 0.2]),
                            OperatingRule("max-f1")) == 0.2


def test_ties_on_the_objective_go_to_the_higher_recall():
    # Youden's J: cut 0.8 (TP 1, FP 0): 1/2 + 1 - 1 = 0.5; cut 0.6 (TP 2, FP 1): 1 + 1/2 - 1 = 0.5 -> the higher
    # recall, threshold (0.6 + 0.4) / 2
    assert choose_threshold(np.array([1, 0, 1, 0], bool), np.array([0.8, 0.7, 0.6, 0.4]),
                            OperatingRule("youden")) == pytest.approx(0.5)


def test_an_unreachable_target_names_the_best_reachable_value():
    # the top score is a negative: precision is at most 1/2 (cut 0.8)
    with pytest.raises(UserError, match=r"no threshold reaches val precision 0.9 .*best reachable val precision is "
                                        r"0.5000"):
        choose_threshold(np.array([0, 1, 0], bool), np.array([0.9, 0.8, 0.3]), OperatingRule("precision", 0.9))
    with pytest.raises(UserError, match="best reachable val specificity is 0.6667"):
        choose_threshold(np.array([0, 1, 0, 0], bool), np.array([0.9, 0.8, 0.3, 0.1]),
                         OperatingRule("specificity", 1.0))
    with pytest.raises(UserError, match="no image of the positive class"):
        choose_threshold(np.array([0, 0], bool), np.array([0.9, 0.1]), OperatingRule("max-f1"))


@pytest.mark.parametrize("text,parsed", [("argmax", "argmax"), ("max-f1", "max-f1"), (" Youden ", "youden"),
                                         ("recall>=0.9", "recall>=0.9"), ("precision>=.95", "precision>=0.95"),
                                         ("specificity>=1", "specificity>=1"), ("recall >= 0.5", "recall>=0.5")])
def test_rules_parse(text, parsed):
    assert str(parse_rule(text)) == parsed


@pytest.mark.parametrize("text,message", [("recall>=1.5", "must be in (0, 1]"), ("recall>=0", "must be in (0, 1]"),
                                          ("recall>0.9", "must be one of"), ("foo", "must be one of"),
                                          ("f1>=0.5", "must be one of"), ("recall>=", "must be one of")])
def test_malformed_rules_are_refused(text, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_rule(text)


def recorded(tmp_path, model) -> OperatingPoint:
    point = OperatingPoint("recall>=0.9", "pos", 1, ["neg", "pos"], 0.25, {"sensitivity": 1.0}, model)
    write_operating_point(tmp_path, point)
    return point


def test_predicts_decision_comes_from_the_record_for_the_same_model_only(tmp_path, caplog):
    model = {"kind": "baseline", "checkpoint": "best.pth", "backbone_epoch": 3, "head_epoch": None}
    recorded(tmp_path, model)
    assert load_operating_point(tmp_path).threshold == 0.25
    same = resolve_decision(tmp_path, ["neg", "pos"], {**model, "run": "/elsewhere"})
    assert (same.positive, same.threshold) == (1, 0.25) and OPERATING_POINT_FILE in same.source
    given = resolve_decision(tmp_path, ["neg", "pos"], model, threshold=0.7)
    assert given.threshold == 0.7 and "overrides the recorded operating point recall>=0.9" in given.source
    with caplog.at_level(logging.WARNING):
        other = resolve_decision(tmp_path, ["neg", "pos"], {**model, "checkpoint": "last.pth", "backbone_epoch": 5})
    assert other.threshold == 0.5 and "not for this model (last.pth epoch 5)" in caplog.text
    assert resolve_decision(tmp_path / "none", ["a", "b"], model).threshold == 0.5
    with pytest.raises(UserError, match="is for the classes"):
        resolve_decision(tmp_path, ["cat", "dog"], model)
    (tmp_path / OPERATING_POINT_FILE).write_text("{not json")
    with pytest.raises(UserError, match="malformed"):
        load_operating_point(tmp_path)


# --- end to end on a tiny imbalanced two-class folder ---------------------------------------------------------

BENIGN = {"benign": (150, 100, 100)}
MALIGNANT = {"malignant": (120, 100, 135)}  # close colours: the classes overlap, so the threshold matters


@pytest.fixture(scope="module")
def imbalanced_root(tmp_path_factory):
    """``root/{train,val,test}/{benign,malignant}``: 18:6, 12:4 and 12:4 images, 32x32."""
    root = tmp_path_factory.mktemp("imbalanced")
    for split, (benign, malignant), seed in (("train", (18, 6), 21), ("val", (12, 4), 22), ("test", (12, 4), 23)):
        write_image_folder(root / split, benign, classes=BENIGN, seed=seed)
        write_image_folder(root / split, malignant, classes=MALIGNANT, seed=seed + 10)
    return root


@pytest.fixture(scope="module")
def baseline_run(imbalanced_root, tmp_path_factory):
    """A 2-epoch simple_cnn baseline on the imbalanced folder (seconds; treat as read-only)."""
    from supcon.baseline.config import BaselineConfig
    from supcon.baseline.train import train

    run_dir = tmp_path_factory.mktemp("op_baseline") / "run"
    train(BaselineConfig(data_folder=str(imbalanced_root / "train"), run_dir=str(run_dir), model="simple_cnn",
                         size=32, batch_size=12, epochs=2, num_workers=0, augment="none", seed=0), progress=False)
    return run_dir


@pytest.fixture
def run(baseline_run, tmp_path):
    return copy_run(baseline_run, tmp_path / "runs" / "baseline")


def check(*args):
    return invoke(check_accuracies_command, [*args, "--num-workers", "0", "--quiet", "--bootstrap", "200"])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def best_by_hand(is_positive, scores, target):
    """The cut with the best precision among those with recall >= target (ties: recall, then specificity)."""
    best = None
    for cut in np.unique(scores):
        called = scores >= cut
        tp, fp = np.sum(called & is_positive), np.sum(called & ~is_positive)
        recall, precision, specificity = tp / is_positive.sum(), tp / (tp + fp), 1 - fp / (~is_positive).sum()
        if recall >= target and (best is None or (precision, recall, specificity) > best[0]):
            best = ((precision, recall, specificity), cut)
    return best[1]


def test_recall_target_is_chosen_on_val_tested_on_test_and_recorded(run, tmp_path):
    from supcon.baseline.evaluate import predict_run, predict_val

    result = check("--run", run, "--output", tmp_path / "out", "--operating-point", "recall>=0.9")
    assert result.exit_code == 0, result.stderr
    point = json.loads((run / OPERATING_POINT_FILE).read_text())
    assert (point["rule"], point["positive_class"], point["positive_index"]) == ("recall>=0.9", "malignant", 1)
    threshold = point["threshold"]

    val = predict_val(run)
    is_positive, scores = val["labels"] == 1, val["probabilities"][:, 1]
    cut = best_by_hand(is_positive, scores, 0.9)
    assert np.array_equal(scores >= threshold, scores >= cut)  # the same val decisions as the rule by hand
    assert point["val"]["sensitivity"] >= 0.9 and point["val"]["num_images"] == 16
    assert point["val"]["true_positives"] == np.sum((scores >= threshold) & is_positive)
    assert point["model"]["checkpoint"] == "best.pth" and point["model"]["backbone_epoch"] == val["selected_epoch"]

    test = predict_run(run)
    labels, positive = test["labels"], test["probabilities"][:, 1]
    called = positive >= threshold
    report = json.loads((run / "test_metrics.json").read_text())
    metrics = report["metrics"]
    assert report["operating_point"]["threshold"] == threshold and metrics["threshold"] == threshold
    assert metrics["confusion_matrix"] == [[int(np.sum(~called[labels == c])), int(np.sum(called[labels == c]))]
                                           for c in (0, 1)]
    assert metrics["sensitivity"] == pytest.approx(np.mean(called[labels == 1]))
    assert metrics["specificity"] == pytest.approx(np.mean(~called[labels == 0]))
    assert metrics["balanced_accuracy"] == pytest.approx((metrics["sensitivity"] + metrics["specificity"]) / 2)
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, positive))
    assert metrics["auprc"] == pytest.approx(average_precision_score(labels, positive))
    for name in ("sensitivity", "specificity", "balanced_accuracy", "roc_auc", "auprc"):
        low, high = metrics["intervals"][name]
        assert low <= metrics[name] <= high

    row = read_csv(tmp_path / "out" / "comparison.csv")[0]
    assert (row["operating_point"], row["positive_class"], float(row["threshold"])) == (
        "recall>=0.9", "malignant", threshold)
    for name in ("sensitivity", "specificity", "balanced_accuracy", "auprc"):
        assert float(row[name]) == pytest.approx(metrics[name])
        assert float(row[f"{name}_low"]) <= float(row[name]) <= float(row[f"{name}_high"])
    markdown = (tmp_path / "out" / "comparison.md").read_text()
    line = next(line for line in markdown.splitlines() if line.startswith("| baseline | recall>=0.9 |"))
    assert f"| malignant | {threshold:.4g} |" in line and line.count(" [") == 5  # 5 metrics with intervals


def test_the_threshold_never_reads_the_test_folder(run, imbalanced_root, tmp_path):
    """Every test label flipped: the chosen threshold and its val figures stay; the test metrics do not."""
    flipped = tmp_path / "flipped"
    shutil.copytree(imbalanced_root / "test" / "benign", flipped / "malignant")
    shutil.copytree(imbalanced_root / "test" / "malignant", flipped / "benign")
    points, matrices = [], []
    for test_folder in (imbalanced_root / "test", flipped):
        result = check("--run", run, "--output", tmp_path, "--test-folder", test_folder, "--operating-point",
                       "max-f1")
        assert result.exit_code == 0, result.stderr
        points.append(json.loads((run / OPERATING_POINT_FILE).read_text()))
        matrices.append(json.loads((run / "test_metrics.json").read_text())["metrics"]["confusion_matrix"])
    assert points[0] == points[1]
    assert matrices[1] == [matrices[0][1], matrices[0][0]] != matrices[0]  # the same decisions, other labels


def test_predict_uses_the_recorded_threshold_and_an_explicit_one_overrides_it(run, imbalanced_root, tmp_path):
    result = check("--run", run, "--output", tmp_path, "--operating-point", "youden", "--positive-class", "benign")
    assert result.exit_code == 0, result.stderr
    point = load_operating_point(run)
    assert (point.positive_class, point.positive_index) == ("benign", 0)

    out = tmp_path / "p.csv"
    result = invoke(predict_command, ["--run", run, imbalanced_root / "test", "--out", out, "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert OPERATING_POINT_FILE in result.stderr and "youden" in result.stderr
    rows = read_csv(out)
    assert {r["positive_class"] for r in rows} == {"benign"}
    assert {float(r["threshold"]) for r in rows} == {point.threshold}
    assert [r["predicted_class"] for r in rows] == [
        "benign" if float(r["probability_benign"]) >= point.threshold else "malignant" for r in rows]
    assert all(r["positive_probability"] == r["probability_benign"] for r in rows)
    # the test folder's predictions are exactly what check-accuracies tested
    truth = [r["path"].split("/")[-2] for r in rows]
    matrix = json.loads((run / "test_metrics.json").read_text())["metrics"]["confusion_matrix"]
    assert [[sum(t == a and r["predicted_class"] == b for t, r in zip(truth, rows, strict=True))
             for b in ("benign", "malignant")] for a in ("benign", "malignant")] == matrix

    result = invoke(predict_command, ["--run", run, imbalanced_root / "test", "--out", out, "--quiet",
                                      "--threshold", "0.3"])
    assert result.exit_code == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "--threshold 0.3" in line]
    assert len(said) == 1 and "overrides the recorded operating point youden" in said[0]
    rows = read_csv(out)
    assert {float(r["threshold"]) for r in rows} == {0.3}
    assert [r["predicted_class"] for r in rows] == [
        "benign" if float(r["probability_benign"]) >= 0.3 else "malignant" for r in rows]


def test_predict_val_gives_the_val_accuracy_baseline_train_recorded(baseline_run, imbalanced_root, tmp_path):
    """The val images check-accuracies chooses on are the ones baseline-train validated on: a val folder, or a
    --val-split of the data folder drawn again from the recorded fraction and seed."""
    from supcon.baseline.config import BaselineConfig
    from supcon.baseline.evaluate import predict_val
    from supcon.baseline.train import train
    from supcon.rundir import load_baseline_checkpoint

    split_run = tmp_path / "split_run"
    alone = shutil.copytree(imbalanced_root / "train", tmp_path / "alone" / "train")  # no sibling val folder
    train(BaselineConfig(data_folder=str(alone), run_dir=str(split_run), model="simple_cnn", size=32, batch_size=12,
                         epochs=2, num_workers=0, augment="none", seed=0, val_split=0.25), progress=False)
    for run_dir, where in ((baseline_run, str(imbalanced_root / "val")), (split_run, "(val split 0.25, seed 0)")):
        val = predict_val(run_dir)
        recorded = load_baseline_checkpoint(run_dir / "best.pth")["val_accuracy"]
        assert np.mean(val["probabilities"].argmax(1) == val["labels"]) == pytest.approx(recorded)
        assert where in val["val_folder"]
    assert len(predict_val(split_run)["labels"]) == 6  # a quarter of 18 and of 6, rounded

    shutil.copy(alone / "benign" / "benign_000.png", alone / "benign" / "benign_extra.png")  # the split would move
    with pytest.raises(UserError, match="cannot be drawn again"):
        predict_val(split_run)


# --- bad input: one line, exit 2, nothing written ---------------------------------------------------------


@pytest.fixture(scope="module")
def three_class_run(image_root, tmp_path_factory):
    from supcon.baseline.config import BaselineConfig
    from supcon.baseline.train import train

    run_dir = tmp_path_factory.mktemp("op_three") / "run"
    train(BaselineConfig(data_folder=str(image_root / "train"), run_dir=str(run_dir), model="simple_cnn", size=32,
                         batch_size=12, epochs=1, num_workers=0, augment="none", seed=0), progress=False)
    return run_dir


def assert_refused(args, expected, *folders):
    before = snapshot(*folders)
    result = check(*args)
    assert result.exit_code == 2, result.stderr
    message = one_line_error(result)
    assert expected in message, message
    assert snapshot(*folders) == before
    return message


def test_a_three_class_run_refuses_an_operating_point(three_class_run, tmp_path):
    run = copy_run(three_class_run, tmp_path / "three")
    message = assert_refused(["--run", run, "--output", tmp_path / "out", "--operating-point", "recall>=0.9"],
                             "needs a two-class run", tmp_path)
    assert "has 3 classes (cat, dog, fox)" in message
    assert_refused(["--run", run, "--output", tmp_path / "out", "--positive-class", "cat"],
                   "--positive-class needs a two-class run", tmp_path)


@pytest.mark.parametrize("rule", ["recall>=1.5", "recall>0.9", "foo"])
def test_a_malformed_rule_is_refused_by_the_parser(run, tmp_path, rule):
    message = assert_refused(["--run", run, "--output", tmp_path / "out", "--operating-point", rule],
                             "Invalid value for '--operating-point'", tmp_path)
    assert rule in message


def test_an_unknown_positive_class_is_refused(run, tmp_path):
    message = assert_refused(["--run", run, "--output", tmp_path / "out", "--positive-class", "tumour"],
                             "--positive-class 'tumour' is not a class of the run", tmp_path)
    assert "benign, malignant" in message


def test_an_unreachable_target_is_refused_with_the_best_reachable_value(run, imbalanced_root, tmp_path):
    """Every positive val image also among the negatives: no threshold has a val precision above 1/2."""
    twins = shutil.copytree(imbalanced_root / "val", tmp_path / "twins" / "val")
    for path in (twins / "malignant").iterdir():
        shutil.copy(path, twins / "benign" / f"twin_{path.name}")
    edit_run_config(run, lambda data: data["run_info"].update(val_folder=str(twins)))
    message = assert_refused(["--run", run, "--output", tmp_path / "out", "--operating-point", "precision>=0.9"],
                             "no threshold reaches val precision 0.9", tmp_path / "runs", tmp_path / "out")
    best = float(message.rsplit(" ", 1)[-1])
    assert 0 < best <= 0.5


# --- a SupCon run: val features from probe-all's cache; predict and export use the record ---------------------


@pytest.fixture(scope="module")
def supcon_run(imbalanced_root, tmp_path_factory):
    from linear_probe.config import ProbeConfig
    from linear_probe.probe_all import probe_all
    from supcon.train import train
    from tests.conftest import tiny_config

    run_dir = tmp_path_factory.mktemp("op_supcon") / "run"
    train(tiny_config(imbalanced_root / "train", run_dir, epochs=2, save_freq=1), progress=False)
    probe_all(ProbeConfig(run=str(run_dir), num_workers=0, device="cpu"))
    return run_dir


def test_a_supcon_runs_operating_point_reaches_predict_and_export(supcon_run, imbalanced_root, tmp_path):
    run = copy_run(supcon_run, tmp_path / "supcon")
    result = check("--run", run, "--output", tmp_path, "--operating-point", "recall>=0.75", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    point = load_operating_point(run)
    selection = json.loads((run / "test_metrics.json").read_text())["selection"]
    assert point.model["checkpoint"] == selection["checkpoint"]
    assert point.model["checkpoint_sha256"] == selection["checkpoint_sha256"]
    assert point.val["num_images"] == 16 and point.val["true_positives"] + point.val["false_negatives"] == 4
    assert point.val["sensitivity"] >= 0.75

    out = tmp_path / "p.csv"
    result = invoke(predict_command, ["--run", run, imbalanced_root / "test", "--out", out, "--quiet",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert "not for this model" not in result.stderr
    assert {float(r["threshold"]) for r in read_csv(out)} == {point.threshold}

    result = invoke(export_command, ["--run", run, "--out", tmp_path / "export"])
    assert result.exit_code == 0, result.stderr
    assert f"decision: malignant when P(malignant) >= {point.threshold:.4g} (operating point recall>=0.75" in (
        result.stdout)
    for config in (tmp_path / "export" / "config.json", tmp_path / "export" / "classifier" / "config.json"):
        exported = json.loads(config.read_text())["supcon_export"]
        assert (exported["positive_class"], exported["decision_threshold"]) == ("malignant", point.threshold)
        assert exported["operating_point"]["rule"] == "recall>=0.75"
        assert exported["operating_point"]["val"] == point.val
