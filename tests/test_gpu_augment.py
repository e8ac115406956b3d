"""The fast data path (supcon.gpu_augment) and --grad-checkpointing, on the CPU.

The fast path must draw from the same augmentation distribution as the plain torchvision pipeline:
its colour ops are checked against torchvision's tensor ops for given parameters, its parameter
draws against torchvision's own draws, and its output against the plain pipeline's output through
per-view statistics; the same statistical comparison must reject deliberately wrong settings, so a
passing test means something. Then determinism, shapes and training runs (resume included).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import signal
from itertools import permutations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms
from torchvision.transforms.v2 import functional as F

from supcon.data import MultiViewDataset, two_view_augmentation
from supcon.errors import UserError
from supcon.gpu_augment import AugmentSpec, CropDataset, DeviceAugment, ViewParams, build_gpu_pipeline, shift_hue
from tests.conftest import tiny_config

MEAN, STD = (0.45, 0.42, 0.4), (0.25, 0.24, 0.26)
SIZE = 24


def spec(**changes) -> AugmentSpec:
    return dataclasses.replace(AugmentSpec.supcon(SIZE, MEAN, STD), **changes)


# --- one spec is the source of both paths ------------------------------------------------------------------

def test_spec_is_read_from_the_plain_pipeline():
    s = AugmentSpec.supcon(SIZE, MEAN, STD)
    assert (s.size, s.scale, s.flip_p, s.jitter_p, s.grayscale_p) == (SIZE, (0.2, 1.0), 0.5, 0.8, 0.2)
    assert s.ratio == pytest.approx((3 / 4, 4 / 3))
    assert s.brightness == s.contrast == s.saturation == pytest.approx((0.6, 1.4))
    assert s.hue == pytest.approx((-0.1, 0.1))
    assert s.mean == MEAN and s.std == STD


def test_the_plain_pipeline_is_built_from_the_spec():
    """Both paths read one spec: a changed setting reaches the torchvision pipeline too."""
    changed = spec(scale=(0.5, 1.0), flip_p=0.0, jitter_p=0.3, brightness=None, hue=(-0.2, 0.2), grayscale_p=0.7)
    crop, flip, jitter_apply, gray, _, normalize = changed.torchvision_pipeline().transforms
    jitter = jitter_apply.transforms[0]
    assert (crop.size, crop.scale, crop.interpolation) == ((SIZE, SIZE), (0.5, 1.0),
                                                           transforms.InterpolationMode.BILINEAR)
    assert (flip.p, jitter_apply.p, gray.p) == (0.0, 0.3, 0.7)
    assert jitter.brightness is None and tuple(jitter.contrast) == pytest.approx((0.6, 1.4))
    assert tuple(jitter.hue) == pytest.approx((-0.2, 0.2))
    assert tuple(normalize.mean) == MEAN and tuple(normalize.std) == STD
    # and the plain SupCon pipeline is the reference recipe's
    reference = transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)
    plain_jitter = two_view_augmentation(SIZE, MEAN, STD).transforms[2].transforms[0]
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert tuple(getattr(plain_jitter, name)) == pytest.approx(tuple(getattr(reference, name)))


# --- colour ops equal torchvision's tensor ops for given parameters -------------------------------------------

def reference_view(pixels: torch.Tensor, params: ViewParams, i: int, s: AugmentSpec) -> torch.Tensor:
    """One view through torchvision's own functional tensor ops, in the view's drawn op order."""
    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    factors = [params.brightness, params.contrast, params.saturation, params.hue]
    img = pixels[i].permute(2, 0, 1).float() / 255
    if params.flip[i]:
        img = F.horizontal_flip(img)
    if params.jittered[i]:
        for op in params.order[i].tolist():
            img = ops[op](img, float(factors[op][i]))
    if params.grayscale[i]:
        img = F.rgb_to_grayscale(img, num_output_channels=3)
    return F.normalize(img, list(s.mean), list(s.std))


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_ops_equal_torchvision_tensor_ops(channels_last):
    s = spec()
    augment = DeviceAugment(s, seed=5, channels_last=channels_last)
    n = 96
    pixels = torch.randint(0, 256, (n, SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    params = augment.draw(n, global_step=7)
    assert len({tuple(o) for o in params.order[params.jittered].tolist()}) > 12  # orders vary within a batch
    out = augment.apply(pixels, params)
    expected = torch.stack([reference_view(pixels, params, i, s) for i in range(n)])
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


def test_hue_shift_equals_torchvision():
    x = torch.rand(12, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    x[:, :, 0, :] = x[:, :1, 0, :]  # gray pixels
    x[:, :, 1, :] = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1)  # pure red
    shifts = torch.linspace(-0.5, 0.5, 12)
    expected = torch.stack([F.adjust_hue(x[i], float(shifts[i])) for i in range(12)])
    torch.testing.assert_close(shift_hue(x, shifts), expected, atol=1e-5, rtol=0)


# --- parameter draws follow torchvision's --------------------------------------------------------------------

def test_parameter_draws_follow_torchvision():
    s = spec()
    n = 20_000
    params = DeviceAugment(s, seed=0).draw(n, global_step=0)

    def rate_ok(flags, p):  # within 5 standard errors of the plain pipeline's probability
        return abs(flags.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)

    assert rate_ok(params.flip, s.flip_p)
    assert rate_ok(params.jittered, s.jitter_p)
    assert rate_ok(params.grayscale, s.grayscale_p)
    # Factors of jittered views against torchvision's own ColorJitter.get_params draws.
    torch.manual_seed(0)
    jitter = transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)
    draws = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) for _ in range(4000)]
    on = params.jittered
    for k, ours in enumerate([params.brightness, params.contrast, params.saturation, params.hue]):
        theirs = np.array([d[k + 1] for d in draws])
        assert stats.ks_2samp(ours[on].numpy(), theirs).pvalue > 1e-3
        low, high = (s.brightness, s.contrast, s.saturation, s.hue)[k]
        assert low <= ours[on].min() < low + 0.01 and high - 0.01 < ours[on].max() <= high
    # Views without jitter get identity factors.
    assert torch.all(params.brightness[~on] == 1) and torch.all(params.hue[~on] == 0)
    # Op orders: all 24 permutations, uniformly (torchvision: randperm(4) per call).
    counts = {p: 0 for p in permutations(range(4))}
    for order in params.order[on].tolist():
        counts[tuple(order)] += 1
    assert stats.chisquare(list(counts.values())).pvalue > 1e-3


# --- the output distribution equals the plain pipeline's -----------------------------------------------------

N_IMAGES = 600


@pytest.fixture(scope="module")
def source_image(tmp_path_factory) -> str:
    """A 40x48 image: a strong left-to-right luma ramp (reveals flips) under one tint, so every crop has the same
    chroma and hue and those statistics show the colour ops, not the crop; noise makes crops differ."""
    height, width = 40, 48
    ramp = np.linspace(50, 205, width)[None, :, None]
    tint = np.array([35.0, -5.0, -30.0])[None, None, :]
    noise = np.random.default_rng(0).normal(0, 4, (height, width, 3))
    pixels = np.clip(ramp + tint + noise, 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("stats") / "source.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def view_statistics(views: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-view statistics of normalised views ``[n, 3, H, W]``, each sensitive to some of the ops."""
    x = views.double() * torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1) + torch.tensor(
        MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    luma = torch.einsum("nchw,c->nhw", x, torch.tensor([0.2989, 0.587, 0.114], dtype=torch.float64))
    chroma = x.amax(1) - x.amin(1)
    half = x.shape[-1] // 2
    gray = chroma.amax((1, 2)) < 1e-3
    # the hue angle of the mean chroma vector; 0 for gray views, whose angle would be rounding noise
    hue = torch.atan2(math.sqrt(3) / 2 * (x[:, 1] - x[:, 2]).mean((1, 2)),
                      (x[:, 0] - (x[:, 1] + x[:, 2]) / 2).mean((1, 2)))
    hue = torch.where(gray, torch.zeros_like(hue), hue)

    def rounded(values):  # a gray view's 0 must tie with the other path's 1e-8, not fall before it
        return np.round(values.numpy(), 4)

    return {
        "brightness": rounded(luma.mean((1, 2))),  # brightness, contrast, crop position
        "contrast": rounded(luma.std((1, 2))),  # contrast, crop size
        "saturation": rounded(chroma.mean((1, 2))),  # saturation, grayscale
        # brightness and contrast scale chroma and luma spread alike; saturation keeps the luma
        "saturation_over_contrast": rounded(chroma.mean((1, 2)) / luma.std((1, 2))),
        "hue": rounded(hue),
        "gray": gray.numpy(),
        "flipped": (luma[..., :half].mean((1, 2)) > luma[..., half:].mean((1, 2))).numpy(),
    }


def plain_views(path: str) -> torch.Tensor:
    dataset = MultiViewDataset([(path, 0)] * N_IMAGES, two_view_augmentation(SIZE, MEAN, STD), seed=11)
    return torch.cat([dataset[(i, 0)][0] for i in range(N_IMAGES)])


@functools.lru_cache(maxsize=2)
def crops(path: str, scale: tuple[float, float]) -> torch.Tensor:
    dataset = CropDataset([(path, 0)] * N_IMAGES, spec(scale=scale), seed=11)
    return torch.stack([dataset[(i, 0)][0] for i in range(N_IMAGES)])


def fast_views(path: str, s: AugmentSpec) -> torch.Tensor:
    images = crops(path, s.scale)
    augment = DeviceAugment(s, seed=11)
    return torch.cat([augment(images[start:start + 100], step).flatten(0, 1)
                      for step, start in enumerate(range(0, N_IMAGES, 100))])


def distribution_differences(reference: dict, candidate: dict) -> dict[str, float]:
    """p-values of two-sample tests, one per statistic (KS for continuous, z-test for rates)."""
    pvalues = {}
    for key, ref in reference.items():
        got = candidate[key]
        if ref.dtype == bool:
            p1, p2, n1, n2 = ref.mean(), got.mean(), len(ref), len(got)
            pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
            se = math.sqrt(max(pooled * (1 - pooled) * (1 / n1 + 1 / n2), 1e-12))
            pvalues[key] = math.erfc(abs(p1 - p2) / se / math.sqrt(2))
        else:
            pvalues[key] = stats.ks_2samp(ref, got).pvalue
    return pvalues


@pytest.fixture(scope="module")
def plain_statistics(source_image):
    torch.set_num_threads(2)
    return view_statistics(plain_views(source_image))


def test_output_distribution_equals_the_plain_pipeline(source_image, plain_statistics):
    fast = view_statistics(fast_views(source_image, spec()))
    assert 0.15 < plain_statistics["gray"].mean() < 0.25 and 0.45 < plain_statistics["flipped"].mean() < 0.55
    pvalues = distribution_differences(plain_statistics, fast)
    assert min(pvalues.values()) > 1e-3, pvalues


@pytest.mark.parametrize("wrong", [
    {"jitter_p": 0.5}, {"grayscale_p": 0.3}, {"flip_p": 0.35}, {"brightness": (0.8, 1.2)},
    {"contrast": (0.3, 1.7)}, {"saturation": (1.0, 1.4)}, {"hue": (-0.03, 0.03)}, {"scale": (0.5, 1.0)},
], ids=lambda w: next(iter(w)))
def test_the_comparison_rejects_a_wrong_setting(source_image, plain_statistics, wrong):
    """The output comparison has the power to see a wrong probability or a shifted or wrong-sized range.

    (A symmetric range narrowed around 1, e.g. contrast 0.8-1.2, hides in the spread the crops add;
    test_parameter_draws_follow_torchvision catches that one.)
    """
    pvalues = distribution_differences(plain_statistics, view_statistics(fast_views(source_image, spec(**wrong))))
    assert min(pvalues.values()) < 1e-3, pvalues


# --- determinism, shapes, normalisation ----------------------------------------------------------------------

def test_augmentation_is_a_function_of_seed_rank_and_step():
    pixels = torch.randint(0, 256, (4, 2, SIZE, SIZE, 3), dtype=torch.uint8)
    out = DeviceAugment(spec(), seed=1)(pixels, 5)
    assert torch.equal(out, DeviceAugment(spec(), seed=1)(pixels, 5))
    for other in (DeviceAugment(spec(), seed=1)(pixels, 6), DeviceAugment(spec(), seed=2)(pixels, 5),
                  DeviceAugment(spec(), seed=1, rank=1)(pixels, 5)):
        assert not torch.allclose(out, other)


def test_crops_are_a_function_of_seed_epoch_and_index(source_image):
    dataset = CropDataset([(source_image, 3)] * 4, spec(), n_views=2, seed=4)
    views, label = dataset[(2, 1)]
    assert views.dtype == torch.uint8 and views.shape == (2, SIZE, SIZE, 3) and label == 3
    assert torch.equal(views, CropDataset([(source_image, 3)] * 4, spec(), seed=4)[(2, 1)][0])
    assert not torch.equal(views[0], views[1])
    assert not torch.equal(views, dataset[(2, 2)][0]) and not torch.equal(views, dataset[(1, 1)][0])


@pytest.mark.parametrize("channels_last", [False, True])
def test_output_shape_dtype_and_normalisation(channels_last):
    identity = spec(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    pixels = torch.randint(0, 256, (3, 2, SIZE, SIZE, 3), dtype=torch.uint8)
    out = DeviceAugment(identity, channels_last=channels_last)(pixels, 0)
    assert out.shape == (3, 2, 3, SIZE, SIZE) and out.dtype == torch.float32
    flat = out.flatten(0, 1)
    assert flat.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    expected = (pixels.permute(0, 1, 4, 2, 3).float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(
        STD).view(3, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        DeviceAugment(identity)(pixels.float(), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_result():
    pixels = torch.randint(0, 256, (16, 2, 64, 64, 3), dtype=torch.uint8)
    s = dataclasses.replace(AugmentSpec.supcon(64, MEAN, STD))
    cpu = DeviceAugment(s, "cpu", seed=3)(pixels, 9)
    cuda = DeviceAugment(s, "cuda", seed=3, channels_last=True)(pixels.cuda(), 9)
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=0)


def test_build_gpu_pipeline_uses_the_config(train_folder, tmp_path):
    from supcon.data import scan_image_folder

    config = tiny_config(train_folder, tmp_path, mean=list(MEAN), std=list(STD), channels_last=True, seed=9)
    dataset, augment = build_gpu_pipeline(scan_image_folder(train_folder).samples, config, "cpu", 2)
    assert augment.spec == AugmentSpec.supcon(32, MEAN, STD) and augment.seed == dataset.seed == 9
    assert augment.channels_last and augment.rank == 0 and len(dataset) == 36


# --- training with the fast path ------------------------------------------------------------------------------

def final_weights(run_dir):
    state = torch.load(run_dir / "last.pth", weights_only=True)
    return state["epoch"], {**state["encoder"], **{f"head.{k}": v for k, v in state["head"].items()}}


def test_training_on_the_cpu_with_the_fast_path_resumes_exactly(train_folder, tmp_path, monkeypatch):
    """2 epochs straight equal 2 epochs interrupted (SIGTERM) mid-epoch and resumed with the default."""
    from supcon.rundir import read_config
    from supcon.train import train

    values = dict(epochs=2, knn_every=0, gpu_augment=True, mean=list(MEAN), std=list(STD), size=16)
    straight = train(tiny_config(train_folder, tmp_path / "straight", **values), progress=False)
    assert straight.epochs_done == 2 and math.isfinite(straight.history[-1]["loss"])
    assert read_config(tmp_path / "straight")["gpu_augment"] is True

    original = DeviceAugment.__call__

    def interrupt_at_step_5(self, images, global_step):
        if global_step == 5:  # epoch 2, step 2 of 4 (36 images // batch 8)
            signal.raise_signal(signal.SIGTERM)
        return original(self, images, global_step)

    monkeypatch.setattr(DeviceAugment, "__call__", interrupt_at_step_5)
    interrupted = train(tiny_config(train_folder, tmp_path / "resumed", **values), progress=False)
    assert interrupted.interrupted_by == signal.SIGTERM and interrupted.epochs_done == 1
    monkeypatch.setattr(DeviceAugment, "__call__", original)
    # Resumed with the option left to its default (off on the CPU): the run's recorded data path wins.
    resumed = train(tiny_config(train_folder, tmp_path / "resumed", **{**values, "gpu_augment": None}, resume=True),
                    progress=False)
    assert resumed.epochs_done == 2
    epoch, got = final_weights(tmp_path / "resumed")
    expected_epoch, expected = final_weights(tmp_path / "straight")
    assert epoch == expected_epoch == 2
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


# --- --grad-checkpointing ---------------------------------------------------------------------------------------

def test_grad_checkpointing_gives_the_same_loss_gradients_and_batchnorm_statistics():
    from supcon.grad_checkpointing import enable_grad_checkpointing
    from supcon.losses import SupConLoss
    from supcon.models import build_model

    torch.manual_seed(0)
    plain = build_model("test_resnet", small_input=True)
    checkpointed = copy.deepcopy(plain)
    enable_grad_checkpointing(checkpointed)
    loss_fn = SupConLoss()
    images, labels = torch.randn(6, 2, 3, 16, 16), torch.tensor([0, 1, 0, 1, 2, 2])
    for _ in range(2):
        results = []
        for model in (plain, checkpointed):
            model.train()
            model.zero_grad()
            loss = loss_fn(model(images.flatten(0, 1))["projection"].view(6, 2, -1), labels)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()],
                            [b.clone() for b in model.buffers()]))
        (loss_a, grads_a, buffers_a), (loss_b, grads_b, buffers_b) = results
        assert torch.equal(loss_a, loss_b)
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(grads_a, grads_b))
        assert all(torch.equal(a, b) for a, b in zip(buffers_a, buffers_b))  # BN stats updated once per step


def test_grad_checkpointing_trains_and_refuses_compile(train_folder, tmp_path):
    from supcon.rundir import read_config
    from supcon.train import train

    result = train(tiny_config(train_folder, tmp_path / "ckpt", epochs=1, knn_every=0, size=16,
                               grad_checkpointing=True), progress=False)
    assert result.epochs_done == 1
    recorded = read_config(tmp_path / "ckpt")
    assert recorded["grad_checkpointing"] is True
    # the fast data path defaults to on with a GPU, off on the CPU (this suite also runs on GPU hosts)
    assert recorded["gpu_augment"] is torch.cuda.is_available()
    with pytest.raises(UserError, match="--grad-checkpointing with --compile"):
        train(tiny_config(train_folder, tmp_path / "both", grad_checkpointing=True, compile=True), progress=False)
