"""supcon-export: plain-timm loading gives our features and logits; small-input stem; ONNX; bad input."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from linear_probe.classifier import load_run_classifier
from linear_probe.export import CLASSIFIER_DIR, SMALL_INPUT_RECIPE, WEIGHTS, export_run
from linear_probe.heads import load_head_records
from linear_probe.select import select_best
from linear_probe.use_cli import export_command
from supcon.data import eval_transform
from supcon.models import build_encoder
from supcon.rundir import load_supcon_checkpoint as load_checkpoint
from tests.probe_helpers import copy_run, invoke, one_line_error, probed_run, snapshot
from tests.use_helpers import binary_baseline_run, plain_stem_probed_run


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, train_folder):
    return plain_stem_probed_run(tmp_path_factory, train_folder)


@pytest.fixture(scope="module")
def small_input_run(trained_run, tmp_path_factory):
    return probed_run(trained_run, tmp_path_factory)


def images(size: int = 32, count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def our_pipeline(run, record):
    """Encoder and head rebuilt the way check-accuracies does, independently of the export code."""
    state = load_checkpoint(run / record.checkpoint)
    cfg = state["model_config"]
    encoder = build_encoder(cfg["model"], small_input=cfg["small_input"], zero_init_last=cfg["zero_init_last"])
    encoder.load_state_dict(state["encoder"])
    head = torch.nn.Linear(record.feature_dim, len(record.class_names))
    head.load_state_dict(torch.load(record.path, weights_only=True)["state_dict"])
    return encoder.eval(), head.eval()


def test_plain_timm_loads_features_and_logits(plain_run, train_folder, tmp_path):
    result = invoke(export_command, ["--run", plain_run, "--out", tmp_path / "export"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "export"
    config = json.loads((out / "config.json").read_text())
    best = select_best(load_head_records(plain_run / "probe", plain_run))
    assert config["supcon_export"]["source"]["checkpoint"] == best.checkpoint  # check-accuracies' choice
    assert config["supcon_export"]["class_names"] == ["cat", "dog", "fox"]
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 0

    encoder, head = our_pipeline(plain_run, best)
    x = images()
    with torch.no_grad():
        features, logits = encoder(x), head(encoder(x))
    plain = timm.create_model("test_resnet", num_classes=0, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / WEIGHTS))).eval()
    with torch.no_grad():
        assert (plain(x) - features).abs().max().item() <= 1e-6
    classes = 3
    full = timm.create_model("test_resnet", num_classes=classes, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(out / CLASSIFIER_DIR / WEIGHTS),
                                                         num_classes=classes)).eval()
    with torch.no_grad():
        assert (full(x) - logits).abs().max().item() <= 1e-5
    # timm's own folder loader reads our config.json too (mean/std and class names included)
    local = timm.create_model(f"local-dir:{out / CLASSIFIER_DIR}", pretrained=True).eval()
    assert local.pretrained_cfg["label_names"] == ["cat", "dog", "fox"]
    assert local.pretrained_cfg["mean"] == pytest.approx(load_checkpoint(plain_run / best.checkpoint)["mean"])
    with torch.no_grad():
        assert (local(x) - logits).abs().max().item() <= 1e-5
    assert "pretrained_cfg_overlay=dict(file=" in result.output

    # timm's own eval transform from the exported config is the run's eval transform
    image_path = next((train_folder / "cat").iterdir())
    timm_transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=local))
    state = load_checkpoint(plain_run / best.checkpoint)
    ours = eval_transform(32, state["mean"], state["std"])
    image = Image.open(image_path).convert("RGB").resize((40, 48))  # not square, not the model's size
    assert torch.allclose(timm_transform(image), ours(image), atol=1e-6)


def test_small_input_stem_recipe_gives_the_same_features(small_input_run, tmp_path):
    result = export_run(small_input_run, tmp_path / "export", checkpoint="last")
    config = result.config["supcon_export"]
    assert config["small_input"] and config["small_input_recipe"] == SMALL_INPUT_RECIPE
    # the documented plain-timm recipe, run as the user would (no code of ours)
    scope: dict = {}
    exec(SMALL_INPUT_RECIPE.replace("NAME", "'test_resnet'").replace("NUM_CLASSES", "0")
         .replace("WEIGHTS", repr(str(tmp_path / "export" / WEIGHTS))), scope)
    records = [r for r in load_head_records(small_input_run / "probe", small_input_run) if r.backbone_epoch == 4]
    encoder, head = our_pipeline(small_input_run, select_best(records))
    x = images()
    with torch.no_grad():
        assert (scope["model"](x) - encoder(x)).abs().max().item() <= 1e-6
    scope = {}
    exec(SMALL_INPUT_RECIPE.replace("NAME", "'test_resnet'").replace("NUM_CLASSES", "3")
         .replace("WEIGHTS", repr(str(tmp_path / "export" / CLASSIFIER_DIR / WEIGHTS))), scope)
    with torch.no_grad():
        assert (scope["model"](x) - head(encoder(x))).abs().max().item() <= 1e-5
    # Without the recipe, timm's deep-stem test_resnet (3x3 first conv) takes these weights without a word but
    # strides differently: the features differ. This is why the recipe is documented and written to config.json.
    plain = timm.create_model("test_resnet", num_classes=0, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "export" / WEIGHTS))).eval()
    with torch.no_grad():
        assert plain(x).shape == encoder(x).shape and (plain(x) - encoder(x)).abs().max().item() > 1e-3


def test_checkpoint_epoch_exports_that_checkpoint(small_input_run, tmp_path):
    result = export_run(small_input_run, tmp_path / "export", checkpoint="2")
    assert result.config["supcon_export"]["source"]["checkpoint"] == "ckpt_epoch_2.pth"
    weights = safetensors.torch.load_file(str(tmp_path / "export" / WEIGHTS))
    state = load_checkpoint(small_input_run / "ckpt_epoch_2.pth")["encoder"]
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in state)


def test_baseline_run_exports_its_best_epoch(tmp_path_factory, tmp_path):
    run = binary_baseline_run(tmp_path_factory)
    result = export_run(run, tmp_path / "export")
    state = torch.load(run / "best.pth", weights_only=True)
    assert result.config["supcon_export"]["source"]["backbone_epoch"] == state["best_epoch"]
    scope: dict = {}
    exec(SMALL_INPUT_RECIPE.replace("NAME", "'test_resnet'").replace("NUM_CLASSES", "2")
         .replace("WEIGHTS", repr(str(tmp_path / "export" / CLASSIFIER_DIR / WEIGHTS))), scope)
    classifier = load_run_classifier(run)
    x = images()
    with torch.no_grad():
        assert (scope["model"](x) - classifier.network(x)).abs().max().item() <= 1e-5


def test_onnx_export_matches_onnxruntime(plain_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the optional onnx extra is not installed")
    pytest.importorskip("onnxscript", reason="the optional onnx extra is not installed")
    import onnxruntime

    result = export_run(plain_run, tmp_path / "export", onnx=True)
    assert max(result.onnx_max_abs_diff.values()) <= 1e-4
    classifier = load_run_classifier(plain_run)
    session = onnxruntime.InferenceSession(str(tmp_path / "export" / CLASSIFIER_DIR / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # the batch axis is dynamic
        x = images(count=batch)
        with torch.no_grad():
            expected = classifier.network(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (batch, 3) and abs(got - expected).max() <= 1e-4


def test_bad_inputs_one_line_errors(small_input_run, trained_run, tmp_path):
    out = tmp_path / "export"
    result = invoke(export_command, ["--run", tmp_path / "nowhere", "--out", out])
    assert result.exit_code == 2 and "run directory not found" in one_line_error(result)

    never_probed = copy_run(trained_run, tmp_path / "never_probed")
    result = invoke(export_command, ["--run", never_probed, "--out", out])
    assert result.exit_code == 2 and "never probed" in one_line_error(result)
    assert "probe-all --run" in one_line_error(result)

    result = invoke(export_command, ["--run", small_input_run, "--checkpoint", "99", "--out", out])
    assert result.exit_code == 2 and "no checkpoint of backbone epoch 99" in one_line_error(result)
    result = invoke(export_command, ["--run", small_input_run, "--checkpoint", "best-ever", "--out", out])
    assert result.exit_code == 2 and "--checkpoint must be" in one_line_error(result)
    assert not out.exists()

    # an existing export is not overwritten without --force
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    before = snapshot(out)
    result = invoke(export_command, ["--run", small_input_run, "--out", out])
    assert result.exit_code == 2 and "not empty" in one_line_error(result)
    assert snapshot(out) == before
