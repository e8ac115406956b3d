"""DeviceAugment's cost on a GPU, pinned without one: the kernels it launches per batch.

The pixels live on the ``meta`` device (shapes, no data), so every op on them is one a GPU would
launch, and the host-side work on the per-view parameters (CPU tensors on any device) is counted
apart (scripts/profile_step.py's ``augment_counts``). Measured at commit bb0bffa, before the fused
rewrite: 238 device ops and 137 host ops per batch of 64 x 2 views (scripts/compare_augment.py).
"""

from __future__ import annotations

import pytest
import torch

from supcon.gpu_augment import AugmentSpec, DeviceAugment
from tests.test_bench_scripts import load_script

#: Device ops per batch, now: 83 at 64 x 2 views (6 blend passes, one hue pass, 2 transfers, ...).
MAX_DEVICE_OPS = 83
MAX_HOST_OPS = 80


@pytest.fixture(scope="module")
def profile():
    return load_script("profile_step")


@pytest.mark.parametrize("channels_last", [False, True])
def test_kernels_per_batch_are_few_and_do_not_grow_with_the_batch(profile, channels_last):
    counts = {batch: profile.augment_counts(batch, 32, channels_last=channels_last) for batch in (16, 64, 256)}
    for batch, (device_ops, host_ops, syncs) in counts.items():
        assert device_ops <= MAX_DEVICE_OPS, (batch, device_ops)
        assert host_ops <= MAX_HOST_OPS, (batch, host_ops)
        assert syncs == 0
    assert counts[256][0] == counts[64][0]  # per batch, not per view or per op-order group


def test_the_device_copies_of_the_parameters_are_two_per_batch(profile):
    augment = DeviceAugment(AugmentSpec.supcon(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), "meta", seed=0)
    pixels = torch.empty(8, 2, 32, 32, 3, dtype=torch.uint8, device="meta")
    augment(pixels, 0)
    with profile.OpCounter("meta") as counter:
        out = augment(pixels, 1)
    # the coefficient table and the reordering indices to the device; the uint8 -> float conversion
    assert counter.device_ops["_to_copy"] == 3
    assert out.shape == (8, 2, 3, 32, 32) and out.dtype == torch.float32
