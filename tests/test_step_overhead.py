"""The training step has no overhead a GPU would pay for, counted on the CPU.

On a GPU an eager ResNet step is bound by kernel launches and stalled by host syncs; both are the
same ops on the CPU, so they are counted here (scripts/profile_step.py's OpCounter) rather than timed.
"""

from __future__ import annotations

import pytest
import torch

from supcon.epoch import train_one_epoch
from supcon.losses import SupConLoss
from supcon.models import build_model
from supcon.optim import build_optimizer, keep_implementation
from supcon.schedule import LRSchedule
from tests.test_bench_scripts import load_script


@pytest.fixture(scope="module")
def profile():
    return load_script("profile_step")


class Batches:
    """The same float-view batch ``steps`` times."""

    def __init__(self, steps: int, batch: int = 4, size: int = 16):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 2, 3, size, size, generator=generator)
        self.labels = torch.randint(0, 3, (batch,), generator=generator)
        self.steps = steps

    def __iter__(self):
        return iter([(self.images, self.labels)] * self.steps)


def project_setup(steps_per_epoch: int = 10**6):
    """The project's step on the CPU, fp32, on any host (the counts below are CPU counts)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    torch.manual_seed(0)
    model = build_model("test_resnet", small_input=True)
    optimizer = build_optimizer(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4,
                                device=accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = LRSchedule(0.05, epochs=100, steps_per_epoch=steps_per_epoch)
    return model, optimizer, schedule, accelerator


def test_the_step_syncs_only_on_log_steps(profile):
    model, optimizer, schedule, accelerator = project_setup()
    train_one_epoch(model, SupConLoss(), Batches(1), optimizer, schedule, accelerator, epoch=0, log_every=5)
    with profile.OpCounter("cpu") as counter:
        state = train_one_epoch(model, SupConLoss(), Batches(12), optimizer, schedule, accelerator, epoch=0,
                                log_every=5)
    # one read of the device per log step (after steps 5 and 10) and one for the 2 steps left at the end
    assert dict(counter.syncs) == {"tolist": 3}
    assert state.steps_done == 12 and torch.isfinite(torch.tensor(state.loss_sum)) and state.spread_sum > 0


def test_the_sums_and_the_non_finite_check_match_a_per_step_loop():
    model, optimizer, schedule, accelerator = project_setup(steps_per_epoch=7)
    losses, spreads = [], []

    class Recording(SupConLoss):
        def forward(self, features, labels=None):
            loss = super().forward(features, labels)
            losses.append(loss.item())
            spreads.append(features[:, 0].std(dim=0, unbiased=False).mean().item())
            return loss

    state = train_one_epoch(model, Recording(), Batches(7), optimizer, schedule, accelerator, epoch=0, log_every=3)
    assert state.steps_done == 7
    assert state.loss_sum == pytest.approx(sum(losses), rel=1e-6)
    assert state.spread_sum == pytest.approx(sum(spreads), rel=1e-5)

    class NanAtThirdCall(SupConLoss):
        calls = 0

        def forward(self, features, labels=None):
            NanAtThirdCall.calls += 1
            loss = super().forward(features, labels)
            return loss * float("nan") if NanAtThirdCall.calls >= 3 else loss

    from supcon.errors import UserError

    with pytest.raises(UserError, match=r"non-finite at epoch 2, step 3 of 7 \(global step 9\)"):
        train_one_epoch(model, NanAtThirdCall(), Batches(7), optimizer, schedule, accelerator, epoch=1, log_every=4)


def test_the_optimizer_is_fused_where_torch_has_the_kernel_and_steps_like_plain_sgd():
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    assert "cpu" in _get_fused_kernels_supported_devices()  # torch >= 2.4; the step below uses it
    torch.manual_seed(0)
    reference_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    fused_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    fused_model.load_state_dict(reference_model.state_dict())
    plain = torch.optim.SGD(reference_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=False)
    fused = build_optimizer(fused_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, device="cpu")
    assert fused.param_groups[0]["fused"] is True
    inputs = torch.randn(8, 6)
    for _ in range(3):
        for model, optimizer in ((reference_model, plain), (fused_model, fused)):
            optimizer.zero_grad(set_to_none=True)
            model(inputs).square().mean().backward()
            optimizer.step()
    for expected, actual in zip(reference_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


def test_a_checkpoint_of_an_unfused_optimizer_resumes_fused():
    layer = torch.nn.Linear(4, 3)
    unfused = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(2, 4)).sum().backward()
    unfused.step()
    fused = build_optimizer(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0, device="cpu")
    implementation = [{"fused": g.get("fused"), "foreach": g.get("foreach")} for g in fused.param_groups]
    fused.load_state_dict(unfused.state_dict())
    assert fused.param_groups[0]["fused"] is None  # what load_state_dict alone does
    keep_implementation(fused, implementation)
    assert fused.param_groups[0]["fused"] is True
    torch.testing.assert_close(fused.state[layer.weight]["momentum_buffer"],
                               unfused.state[layer.weight]["momentum_buffer"])


def test_a_step_launches_fewer_ops_than_the_reference_loop(profile):
    """Same tiny network, same batch: the project's step against bench_train.py's 40-line loop."""
    bench = load_script("bench_train")
    model, optimizer, schedule, accelerator = project_setup()
    loss_fn = SupConLoss()
    train_one_epoch(model, loss_fn, Batches(1, batch=4, size=16), optimizer, schedule, accelerator, epoch=0)
    with profile.OpCounter("cpu") as project:
        train_one_epoch(model, loss_fn, Batches(10, batch=4, size=16), optimizer, schedule, accelerator, epoch=0)

    class Args:
        size, small_input = 16, True

    setting = bench.Setting("reference", "fp32", "nchw", False, "float", False, False, loop="reference")
    run = bench.reference_run(setting, "test_resnet", 4, Args, torch.device("cpu"))
    run(1)
    with profile.OpCounter("cpu") as reference:
        run(10)
    # The obvious loop's optimizer loops over the parameters on the CPU (several foreach kernels on a GPU);
    # the project's is one fused op. Beyond the optimizer, the project adds at most a few ops per step
    # (its loss masks, 2 copies and the spread for the epoch's health statistics).
    optimizer_ops = {"add_", "add", "mul_", "_fused_sgd_"}
    project_rest = sum(n for name, n in project.ops.items() if name not in optimizer_ops) / 10
    reference_rest = sum(n for name, n in reference.ops.items() if name not in optimizer_ops) / 10
    assert project.ops["_fused_sgd_"] == 10
    assert project.total_ops < reference.total_ops
    assert project_rest <= reference_rest + 10, (project.ops - reference.ops)
