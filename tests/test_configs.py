"""Every recorded-experiment YAML in configs/ loads with --config and builds its model and data pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from supcon.config import TrainConfig, load_yaml, resolve, yaml_values_for

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
SECTIONS = ("train", "probe", "baseline")


def test_there_is_a_config_per_recorded_setup():
    names = {p.stem for p in CONFIGS}
    assert {"supcon_resnet50_bs64", "supcon_resnet50_bs32", "supcon_seresnext50_bs32", "probe_from700",
            "baseline_efficientnet_b3_freeze18"} <= names
    assert {f"baseline_resnet18_transfer_{h}" for h in ("linear", "mlp", "mlp-dropout")} <= names
    assert {f"baseline_{n}_32px" for n in ("simple_cnn", "plain_cnn", "se_net", "inception_net")} <= names


def _section(path: Path) -> tuple[str, dict]:
    data = load_yaml(path)
    sections = [s for s in SECTIONS if s in data]
    assert len(sections) == 1, f"{path.name} must hold exactly one of the sections {SECTIONS}"
    return sections[0], data[sections[0]]


@pytest.fixture(scope="module")
def one_image(tmp_path_factory) -> Image.Image:
    return Image.new("RGB", (250, 250), (120, 60, 30))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_model_and_data_pipeline(path, train_folder, one_image):
    section, values = _section(path)
    torch.manual_seed(0)
    if section == "train":
        from supcon.data import two_view_augmentation
        from supcon.models import build_model, model_config_from

        config = resolve(TrainConfig, yaml_values_for(TrainConfig, values, str(path)),
                         {"data_folder": str(train_folder)})
        config.validate()
        assert config.epochs == 1000 and config.save_freq == 50 and config.temp == 0.07 and config.cosine
        model = build_model(**model_config_from(config)).eval()
        views = two_view_augmentation(config.size, [0.5] * 3, [0.25] * 3)(one_image)
        assert views.shape == (3, config.size, config.size)
        with torch.no_grad():
            out = model(views[None])
        assert out["projection"].shape == (1, config.feat_dim)
    elif section == "probe":
        from linear_probe.config import ProbeConfig

        config = resolve(ProbeConfig, yaml_values_for(ProbeConfig, values, str(path)), {})
        assert (config.batch_size, config.learning_rate, config.epochs) == (256, 0.25, 100)
        assert config.from_epoch == 700
    else:
        from supcon.baseline.config import BaselineConfig, expand_grid
        from supcon.baseline.data import train_transform
        from supcon.baseline.models import build_classifier, freeze_blocks, make_model_config

        config = resolve(BaselineConfig, yaml_values_for(BaselineConfig, values, str(path)),
                         {"data_folder": str(train_folder)})
        cells = expand_grid(config)
        assert cells, "a config must describe at least one run"
        cell = cells[0]
        cell.validate()
        model_config = make_model_config(cell.model, 2, cell.loss, cell.head, cell.head_hidden, cell.small_input)
        # pretrained weights would need the network: build the same architecture without them
        model = build_classifier(model_config, pretrained=False)
        if cell.freeze:
            frozen = freeze_blocks(model, cell.freeze)
            assert len(frozen) == cell.freeze
        image = train_transform(cell.augment, cell.size, [0.5] * 3, [0.25] * 3)(one_image)
        assert image.shape == (3, cell.size, cell.size)
        model.eval()
        with torch.no_grad():
            logits = model(image[None])["logits"]
        assert logits.shape == (1, model_config["num_outputs"])
