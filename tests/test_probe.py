"""The building blocks of probing: head training, batches, feature cache, frozen encoder, checkpoint discovery."""

import pytest
import torch

from linear_probe.checkpoints import assert_encoder_unchanged, check_checkpoint, find_checkpoints
from linear_probe.features import (
    FeatureCache,
    ShuffledBatchSampler,
    cached_batches,
    cached_features,
    folder_fingerprint,
)
from linear_probe.probe import HeadSettings, evaluate_head, make_head, settings_key, train_linear_head
from supcon.checkpoint import file_sha256
from supcon.data import eval_transform, scan_image_folder
from supcon.errors import UserError
from supcon.frozen import build_frozen_encoder, encode_samples
from supcon.rundir import load_supcon_checkpoint as load_checkpoint


def blobs(n_per_class, num_classes=3, dim=8, spread=1.5, seed=0):
    """Overlapping Gaussian blobs: a linear head reaches a high but not perfect accuracy."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(num_classes, dim) * 2
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def train_on_blobs(**settings):
    train_x, train_y = blobs(60, seed=1)
    val_x, val_y = blobs(40, seed=2)
    settings = HeadSettings(**{"batch_size": 32, "epochs": 15, **settings})
    steps = -(-len(train_y) // settings.batch_size)
    return train_linear_head(cached_batches(train_x, train_y, settings.batch_size, settings.seed), steps, val_x, val_y,
                             3, settings), (val_x, val_y)


def test_head_keeps_the_first_best_val_epoch_and_its_weights():
    result, (val_x, val_y) = train_on_blobs()
    curve = result.val_accuracy_per_epoch
    assert len(curve) == 15 and len(result.train_loss_per_epoch) == 15
    assert result.best_val_accuracy == max(curve) > 0.6
    assert result.best_head_epoch == curve.index(max(curve)) + 1
    assert result.best_val_loss == pytest.approx(result.val_loss_per_epoch[result.best_head_epoch - 1])
    # the stored weights are those of the best epoch, not the last
    head = make_head(8, 3, seed=0)
    head.load_state_dict(result.state_dict)
    accuracy, loss = evaluate_head(head, val_x, val_y)
    assert accuracy == pytest.approx(result.best_val_accuracy)
    assert loss == pytest.approx(result.best_val_loss, rel=1e-5)
    assert result.train_loss_per_epoch[-1] < result.train_loss_per_epoch[0]
    # and the final head (what check-accuracies' default tests) is the last epoch's
    head.load_state_dict(result.final_state_dict)
    accuracy, loss = evaluate_head(head, val_x, val_y)
    assert accuracy == pytest.approx(curve[-1]) and loss == pytest.approx(result.val_loss_per_epoch[-1], rel=1e-5)


def test_head_training_is_deterministic_per_seed():
    a, _ = train_on_blobs(seed=3)
    b, _ = train_on_blobs(seed=3)
    c, _ = train_on_blobs(seed=4)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.val_accuracy_per_epoch == b.val_accuracy_per_epoch
    assert not torch.equal(a.state_dict["weight"], c.state_dict["weight"])


def test_cached_batches_visit_every_sample_once_in_the_sampler_order():
    features = torch.arange(10).float()[:, None]
    labels = torch.arange(10)
    batches = list(cached_batches(features, labels, 4, seed=7)(2))
    assert [len(y) for _, y in batches] == [4, 4, 2]  # the last partial batch is kept
    order = torch.cat([y for _, y in batches]).tolist()
    assert sorted(order) == list(range(10))
    sampler = ShuffledBatchSampler(10, 4, seed=7)
    sampler.set_epoch(2)
    assert [i for batch in sampler for i, epoch in batch] == order  # --augment sees the same order
    assert order != torch.cat([y for _, y in cached_batches(features, labels, 4, seed=7)(3)]).tolist()


def test_settings_key_changes_with_any_setting_or_data():
    base = settings_key(HeadSettings(), train="t", val="v", size=32)
    assert base == settings_key(HeadSettings(), train="t", val="v", size=32)
    assert base != settings_key(HeadSettings(learning_rate=0.1), train="t", val="v", size=32)
    assert base != settings_key(HeadSettings(augment=True), train="t", val="v", size=32)
    assert base != settings_key(HeadSettings(), train="t", val="other", size=32)


def test_feature_cache_is_keyed_by_checkpoint_content_and_folder(trained_run, image_root, tmp_path):
    state = load_checkpoint(trained_run / "ckpt_epoch_2.pth")
    index = scan_image_folder(image_root / "val")
    calls = []

    def encoder():
        calls.append(1)
        return build_frozen_encoder(state, "ckpt_epoch_2.pth")

    cache = FeatureCache(tmp_path / "cache")
    args = dict(index=index, fingerprint=folder_fingerprint(index), size=32, mean=state["mean"], std=state["std"],
                device=torch.device("cpu"), batch_size=64, num_workers=0)
    first, labels, hit = cached_features(cache, encoder, checkpoint_sha256="a" * 64, **args)
    assert not hit and len(calls) == 1 and first.shape == (18, encoder().num_features)
    again, _, hit = cached_features(cache, encoder, checkpoint_sha256="a" * 64, **args)
    assert hit and len(calls) == 2 and torch.equal(first, again)  # no encoder built on a hit
    _, _, hit = cached_features(cache, encoder, checkpoint_sha256="b" * 64, **args)
    assert not hit  # other checkpoint content, other file
    assert len(list((tmp_path / "cache").glob("features_*.pt"))) == 2
    # the cached features are exactly those of the eval transform through the frozen encoder
    direct, direct_labels = encode_samples(encoder(), index.samples, eval_transform(32, state["mean"], state["std"]),
                                           torch.device("cpu"))
    assert torch.allclose(first, direct, atol=1e-5) and torch.equal(labels, direct_labels)


@pytest.mark.parametrize("damage", ["truncated", "changed bytes"])
def test_damaged_feature_cache_file_is_recomputed_not_trusted(trained_run, image_root, tmp_path, caplog, damage):
    state = load_checkpoint(trained_run / "ckpt_epoch_2.pth")
    index = scan_image_folder(image_root / "val")
    calls = []

    def encoder():
        calls.append(1)
        return build_frozen_encoder(state, "ckpt_epoch_2.pth")

    cache = FeatureCache(tmp_path / "cache")
    args = dict(index=index, fingerprint=folder_fingerprint(index), size=32, mean=state["mean"], std=state["std"],
                device=torch.device("cpu"), batch_size=64, num_workers=0, checkpoint_sha256="a" * 64)
    original, _, _ = cached_features(cache, encoder, **args)
    [path] = (tmp_path / "cache").glob("features_*.pt")
    if damage == "truncated":  # the process killed mid-write before atomic writes, or a full disk
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # bit rot inside the tensor data: the file still loads
        data = torch.load(path, weights_only=True)
        data["features"][0, 0] += 1.0
        torch.save(data, path)
    calls.clear()
    with caplog.at_level("WARNING", logger="linear_probe.features"):
        again, _, hit = cached_features(cache, encoder, **args)
    assert not hit and calls  # recomputed through the encoder
    assert torch.allclose(again, original, atol=1e-6)
    assert f"recomputing feature cache file {path}" in caplog.text
    assert cached_features(cache, encoder, **args)[2]  # the rewritten file is trusted again


def test_folder_fingerprint_changes_when_an_image_changes(tmp_path, image_root):
    import shutil

    folder = shutil.copytree(image_root / "val", tmp_path / "val")
    before = folder_fingerprint(scan_image_folder(folder))
    image = next((folder / "cat").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")
    assert folder_fingerprint(scan_image_folder(folder)) != before


def test_frozen_encoder_is_in_eval_mode_without_gradients(trained_run):
    state = load_checkpoint(trained_run / "ckpt_epoch_4.pth")
    encoder = build_frozen_encoder(state, "ckpt_epoch_4.pth")
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in state["encoder"].items())
    assert_encoder_unchanged(encoder, state["encoder"], "ckpt")  # passes untouched
    with torch.no_grad():
        encoder.bn1.running_mean.add_(1.0)  # what a forward pass in train() mode would do to BN statistics
    with pytest.raises(RuntimeError, match="changed during probing"):
        assert_encoder_unchanged(encoder, state["encoder"], "ckpt")


def test_shape_mismatch_is_refused_with_the_tensor_named(trained_run):
    state = load_checkpoint(trained_run / "ckpt_epoch_4.pth")
    state["encoder"]["bn1.weight"] = torch.ones(7)
    with pytest.raises(UserError, match=r"bn1.weight has shape \(7,\)"):
        build_frozen_encoder(state, "ckpt_epoch_4.pth")


def test_other_architecture_is_refused(trained_run):
    state = load_checkpoint(trained_run / "ckpt_epoch_4.pth")
    state["model_config"] = {**state["model_config"], "model": "resnet18"}
    with pytest.raises(UserError, match="does not fit a resnet18 encoder"):
        build_frozen_encoder(state, "ckpt_epoch_4.pth")
    with pytest.raises(UserError, match="different architecture"):
        check_checkpoint(state, "ckpt_epoch_4.pth", {**state["model_config"], "model": "test_resnet"}, [])


def test_find_checkpoints_range_and_duplicate_last(trained_run):
    assert file_sha256(trained_run / "last.pth") == file_sha256(trained_run / "ckpt_epoch_4.pth")
    names = [r.name for r in find_checkpoints(trained_run)]
    assert names == ["ckpt_epoch_2.pth", "ckpt_epoch_4.pth"]  # last.pth is the same state as epoch 4
    assert [r.name for r in find_checkpoints(trained_run, 3)] == ["ckpt_epoch_4.pth"]
    assert [r.name for r in find_checkpoints(trained_run, 0, 3)] == ["ckpt_epoch_2.pth"]
    with pytest.raises(UserError, match=r"backbone epoch in \[5, end\]; epochs with checkpoints: 2, 4"):
        find_checkpoints(trained_run, 5)
