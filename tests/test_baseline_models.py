"""Baseline networks: custom nets at 32/128/224 px, heads, ``--freeze``, local pretrained weights, bad names."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from supcon.baseline.losses import ClassifierLoss, logits_to_probabilities
from supcon.baseline.models import (
    build_classifier,
    check_input_size,
    freeze_blocks,
    freeze_units,
    make_model_config,
    model_family,
)
from supcon.baseline.nets import CUSTOM_NETS
from supcon.errors import UserError


def model(name: str, num_classes: int = 3, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build_classifier(make_model_config(name, num_classes, **kwargs))


@pytest.mark.parametrize("name", sorted(CUSTOM_NETS))
@torch.no_grad()
def test_custom_nets_give_logits_at_32_128_and_224_px(name):
    net = model(name, 5)
    for size, batch in ((32, 2), (128, 1), (224, 1)):
        net.train()
        out = net(torch.randn(batch, 3, size, size))
        assert out["logits"].shape == (batch, 5)
        assert out["features"].shape == (batch, net.backbone.num_features)
        if name == "inception_net":  # two auxiliary classifiers in training
            assert [a.shape for a in out["aux_logits"]] == [(batch, 5), (batch, 5)]
        else:
            assert "aux_logits" not in out
    net.eval()
    out = net(torch.randn(2, 3, 32, 32))
    assert out["logits"].shape == (2, 5) and "aux_logits" not in out  # none at evaluation


def test_custom_nets_use_their_documented_heads_and_timm_blocks():
    from timm.layers import DropBlock2d, SEModule

    assert isinstance(model("simple_cnn").head[1], nn.ReLU)  # fully connected stack
    plain = model("plain_cnn")
    assert any(isinstance(m, DropBlock2d) for m in plain.modules()) and isinstance(plain.head[1], nn.ReLU)
    se = model("se_net")
    assert sum(isinstance(m, SEModule) for m in se.modules()) == 3
    assert [type(m) for m in se.head] == [nn.Linear, nn.LeakyReLU, nn.Dropout, nn.Linear]
    assert se.head[2].p == 0.5
    assert isinstance(model("inception_net").head, nn.Linear)


@pytest.mark.parametrize("head, layers", [
    ("linear", [nn.Linear]),
    ("mlp", [nn.Linear, nn.ReLU, nn.Linear]),
    ("mlp-dropout", [nn.Linear, nn.LeakyReLU, nn.Dropout, nn.Linear]),
])
def test_heads(head, layers):
    net = model("test_resnet", head=head, head_hidden=7)
    modules = [net.head] if isinstance(net.head, nn.Linear) else list(net.head)
    assert [type(m) for m in modules] == layers
    assert modules[-1].out_features == 3
    if len(modules) > 1:
        assert modules[0].out_features == 7


def test_bce_uses_one_logit_and_two_probability_columns():
    net = model("test_resnet", 2, loss="bce")
    net.eval()
    logits = net(torch.randn(4, 3, 32, 32))["logits"]
    assert logits.shape == (4, 1)
    probabilities = logits_to_probabilities(logits)
    assert probabilities.shape == (4, 2)
    assert torch.allclose(probabilities[:, 1], torch.sigmoid(logits[:, 0]))
    assert torch.allclose(probabilities.sum(1), torch.ones(4))


def test_auxiliary_losses_are_weighted_0_3_in_training_and_ignored_in_eval():
    net = model("inception_net", 3)
    labels = torch.tensor([0, 2])
    images = torch.randn(2, 3, 32, 32)
    loss_fn = ClassifierLoss("ce", aux_weight=0.3)
    net.train()
    torch.manual_seed(1)
    out = net(images)
    expected = sum(w * nn.functional.cross_entropy(logits, labels) for w, logits in
                   [(1.0, out["logits"]), (0.3, out["aux_logits"][0]), (0.3, out["aux_logits"][1])])
    assert loss_fn(out, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    net.eval()
    out = net(images)
    assert loss_fn(out, labels).item() == pytest.approx(nn.functional.cross_entropy(out["logits"], labels).item())


def test_balanced_class_weights_are_scikit_learns():
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    from supcon.baseline.losses import class_weights_for

    labels = [0] * 6 + [1] * 2 + [2] * 12  # 20 images: 20 / (3 x count)
    weights = class_weights_for("balanced", labels, ["a", "b", "c"])
    assert weights == pytest.approx([20 / 18, 20 / 6, 20 / 36])
    assert weights == pytest.approx(compute_class_weight("balanced", classes=np.arange(3), y=np.array(labels)))
    assert class_weights_for("none", labels, ["a", "b", "c"]) is None
    with pytest.raises(UserError, match="class 'd' has no training images left"):
        class_weights_for("balanced", labels, ["a", "b", "c", "d"])


@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_class_weights_weight_the_training_loss_and_leave_validation_unweighted(kind):
    labels = torch.tensor([0] * 6 + [1] * 2)
    weights = [8 / 12, 8 / 4]
    logits = torch.randn(8, 2 if kind == "ce" else 1, generator=torch.Generator().manual_seed(0))
    if kind == "ce":
        per_image = nn.functional.cross_entropy(logits, labels, reduction="none")
    else:
        per_image = nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), reduction="none")
    per_image_weight = torch.tensor(weights)[labels]
    weighted = ClassifierLoss(kind, class_weights=weights)
    expected = (per_image * per_image_weight).sum() / per_image_weight.sum()  # the weighted mean
    assert weighted({"logits": logits}, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() != pytest.approx(per_image.mean().item(), rel=1e-3)
    assert weighted.single(logits, labels).item() == pytest.approx(per_image.mean().item(), rel=1e-6)
    assert ClassifierLoss(kind)({"logits": logits}, labels).item() == pytest.approx(per_image.mean().item(), rel=1e-6)


def test_torchvision_googlenet_keeps_two_auxiliary_classifiers_for_our_classes():
    net = model("googlenet", 4)
    net.train()
    out = net(torch.randn(2, 3, 64, 64))
    assert out["logits"].shape == (2, 4) and [a.shape for a in out["aux_logits"]] == [(2, 4), (2, 4)]
    assert [label for label, _ in freeze_units(net)][:2] == ["conv1-3+inception3a", "inception3b"]


# --- freezing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, count, frozen_prefixes", [
    ("test_resnet", 2, ("backbone.conv1.", "backbone.bn1.", "backbone.layer1.", "backbone.layer2.")),
    ("plain_cnn", 2, ("backbone.blocks.0.", "backbone.blocks.1.")),
    ("inception_net", 1, ("backbone.stem.", "backbone.inception3a.")),
    ("squeezenet1_0", 1, ("backbone.features.0.", "backbone.features.3.")),
])
def test_freeze_leaves_exactly_the_intended_parameters_trainable_and_bn_statistics_moving(name, count,
                                                                                          frozen_prefixes):
    net = model(name, 3)
    assert freeze_blocks(net, count) == [label for label, _ in freeze_units(net)[:count]]
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in net.named_parameters() if n.startswith(frozen_prefixes)}
    assert all(p.requires_grad for n, p in net.named_parameters() if n.startswith("head."))

    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    buffers_before = {n: b.clone() for n, b in net.named_buffers() if n.endswith("running_mean")}
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    net.train()
    out = net(torch.randn(4, 3, 64, 64))
    ClassifierLoss()(out, torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    for n, p in net.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, before[n]), n
        else:
            assert p.grad is not None, n
    assert not torch.equal(net.head.weight if isinstance(net.head, nn.Linear) else net.head[0].weight,
                           before["head.weight" if isinstance(net.head, nn.Linear) else "head.0.weight"])
    frozen_bn = [n for n in buffers_before if n.startswith(frozen_prefixes)]
    assert frozen_bn or name == "squeezenet1_0"  # squeezenet has no BatchNorm
    for n in frozen_bn:  # BatchNorm running statistics of frozen blocks still update
        assert not torch.equal(dict(net.named_buffers())[n], buffers_before[n]), n


def test_timm_blocks_follow_timm_groups_with_the_stem_in_block_1():
    net = model("resnet18")
    labels = [label for label, _ in freeze_units(net)]
    assert labels == ["conv1+bn1+layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
                      "layer4.1"]
    units = freeze_units(net)
    assert sum(len(names) for _, names in units) == len(list(net.backbone.parameters()))


def test_freeze_more_blocks_than_the_model_has_is_refused():
    net = model("plain_cnn")
    with pytest.raises(UserError, match="has 4 blocks"):
        freeze_blocks(net, 5)
    assert all(p.requires_grad for p in net.parameters())


# --- weights and names ------------------------------------------------------------------------------------------


def test_pretrained_file_loads_the_backbone_and_leaves_the_new_head(tmp_path):
    torch.manual_seed(42)
    source = timm.create_model("test_resnet", num_classes=1000)  # an "ImageNet" model with its classifier
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(0)
    net = build_classifier(make_model_config("test_resnet", 3), pretrained_file=str(path))
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert net.backbone.state_dict().keys() == expected.keys()
    for key, value in net.backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert net.head.weight.shape == (3, source.num_features)


def test_pretrained_file_that_matches_nothing_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"unrelated.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="no tensors matching"):
        build_classifier(make_model_config("simple_cnn", 3), pretrained_file=str(path))


def test_pretrained_is_refused_for_custom_nets():
    with pytest.raises(UserError, match="no ImageNet weights"):
        build_classifier(make_model_config("se_net", 3), pretrained=True)


def test_unknown_model_names_the_families():
    with pytest.raises(UserError, match="unknown model 'resnet_18'.*alexnet.*simple_cnn"):
        model_family("resnet_18")
    with pytest.raises(UserError, match="did you mean alexnet\\?"):
        model_family("alex-net")


def test_too_small_input_is_a_clear_error():
    net = model("simple_cnn")
    net.backbone.blocks.append(nn.Conv2d(128, 128, 9))  # needs at least 9 px after three poolings
    with pytest.raises(UserError, match="cannot take 32 px images.*choose a --size"):
        check_input_size(net, 32)
    check_input_size(net, 96)
