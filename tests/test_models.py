"""The encoder (any timm model, classifier removed), the --small-input stem and the projection head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from supcon.errors import UserError
from supcon.models import SupConModel, build_encoder, build_model, check_model_name, model_config_from
from tests.conftest import tiny_config


def test_small_input_swaps_in_a_3x3_stride_1_stem_without_maxpool():
    standard = build_encoder("resnet18")
    small = build_encoder("resnet18", small_input=True)
    assert standard.conv1.kernel_size == (7, 7) and standard.conv1.stride == (2, 2)
    assert isinstance(standard.maxpool, nn.MaxPool2d)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.padding == (1, 1)
    assert small.conv1.in_channels == 3 and small.conv1.out_channels == 64
    assert isinstance(small.maxpool, nn.Identity)
    # the rest of the network is untouched
    assert [n for n, _ in standard.named_modules() if n != "maxpool"] == [
        n for n, _ in small.named_modules() if n != "maxpool"]
    # 32 px: the standard stem leaves a 1x1 map at the end, the small one 4x4 (stride 32 -> 8)
    with torch.no_grad():
        assert standard.eval().forward_features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (1, 1)
        assert small.eval().forward_features(torch.zeros(1, 3, 32, 32)).shape[-2:] == (4, 4)


def test_small_input_on_a_deep_stem_replaces_its_first_conv():
    encoder = build_encoder("test_resnet", small_input=True)
    first = encoder.conv1[0]
    assert first.kernel_size == (3, 3) and first.stride == (1, 1)
    assert isinstance(encoder.maxpool, nn.Identity)


def test_seresnext50_builds_with_small_input_and_runs_at_32px():
    torch.manual_seed(0)
    model = build_model("seresnext50_32x4d", small_input=True, feat_dim=128)
    assert model.encoder.conv1.kernel_size == (3, 3) and model.encoder.conv1.stride == (1, 1)
    assert isinstance(model.encoder.maxpool, nn.Identity)
    assert model.encoder.num_features == 2048
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out["features"].shape == (2, 2048)
    assert out["projection"].shape == (2, 128)


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'resnet_does_not_exist'"):
        build_encoder("resnet_does_not_exist")


@pytest.mark.parametrize("typed,meant", [
    ("resnet-18", "resnet18"), ("ResNet50", "resnet50"), ("se_resnext50_32x4d", "seresnext50_32x4d"),
    ("seresnext50", "seresnext50_32x4d"), ("efficientnet-b3", "efficientnet_b3"), ("resnet181", "resnet18"),
])
def test_unknown_model_suggests_the_timm_name_meant(typed, meant):
    with pytest.raises(UserError) as error:
        check_model_name(typed)
    message = str(error.value)
    assert message.startswith(f"unknown model {typed!r}")
    suggested = message.split("did you mean ")[1].rstrip("?").split(" or ")
    assert suggested[0] == meant and len(suggested) <= 5


def test_unknown_model_far_from_every_name_gets_no_suggestion():
    with pytest.raises(UserError) as error:
        check_model_name("xyzzy")
    assert "did you mean" not in str(error.value)


def test_encoder_has_no_classifier_and_outputs_pooled_features():
    encoder = build_encoder("test_resnet")
    with torch.no_grad():
        features = encoder.eval()(torch.randn(3, 3, 32, 32))
    assert features.shape == (3, encoder.num_features)
    assert isinstance(encoder.get_classifier(), nn.Identity)


def test_forward_returns_features_and_normalised_projection():
    torch.manual_seed(0)
    model = build_model("test_resnet", small_input=True, feat_dim=24)
    head = model.head.net
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    dim = model.encoder.num_features
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (dim, dim, 24)
    reference = build_model("test_resnet", small_input=True, feat_dim=24, head_bn=False).head.net
    assert [type(m) for m in reference] == [nn.Linear, nn.ReLU, nn.Linear]  # the SupCon reference head
    out = model(torch.randn(4, 3, 16, 16))
    assert set(out) == {"features", "projection"}
    assert out["features"].shape == (4, dim)
    assert out["projection"].shape == (4, 24)
    torch.testing.assert_close(out["projection"].norm(dim=1), torch.ones(4))
    # the projection is the normalised head output of the features
    torch.testing.assert_close(out["projection"], torch.nn.functional.normalize(model.head(out["features"]), dim=1))


def test_model_config_rebuilds_the_same_architecture(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "run", feat_dim=32)
    model_config = model_config_from(config)
    assert model_config == {"model": "test_resnet", "small_input": True, "zero_init_last": False, "feat_dim": 32,
                            "head_bn": True}
    torch.manual_seed(0)
    original = build_model(**model_config)
    rebuilt = build_model(**model_config)
    rebuilt.load_state_dict(original.state_dict())  # strict: same keys and shapes
    assert isinstance(rebuilt, SupConModel)


def test_zero_init_last_is_off_by_default():
    encoder = build_encoder("resnet18")
    assert encoder.layer1[0].bn2.weight.abs().sum() > 0
    zeroed = build_encoder("resnet18", zero_init_last=True)
    assert zeroed.layer1[0].bn2.weight.abs().sum() == 0
