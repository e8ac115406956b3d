"""Gradient caching (``--chunk-size``) gives the gradients of the whole contrastive batch."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from supcon.gradcache import contrastive_step
from supcon.losses import SupConLoss
from supcon.models import build_model

BATCH, CHUNK = 16, 4
WORLD = 2


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def batch(seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    views = torch.randn(BATCH, 2, 3, size, size, generator=generator)
    labels = torch.randint(0, 4, (BATCH,), generator=generator)
    return views, labels


def sgd(model: nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_close_dicts(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-5):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def bn_in_eval(model: nn.Module) -> nn.Module:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


class DropoutNet(nn.Module):
    """No BatchNorm, but dropout: the second pass must draw the first pass's masks."""

    def __init__(self, p: float = 0.3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(8 * 7 * 7, 16)

    def forward(self, images):
        hidden = self.drop(F.relu(self.conv(images))).flatten(1)
        return {"projection": F.normalize(self.fc(hidden), dim=1)}


def test_chunks_of_4_give_the_gradients_of_the_unchunked_batch_of_16(accelerator):
    """BatchNorm in eval mode: the computation does not depend on how the batch is cut."""
    torch.manual_seed(0)
    model = bn_in_eval(build_model("test_resnet", small_input=True, feat_dim=16))
    chunked = copy.deepcopy(model)
    views, labels = batch()
    loss_fn = SupConLoss(0.1, 0.07)
    whole_loss, _ = contrastive_step(model, loss_fn, sgd(model, lr=0.0), accelerator, views, labels)
    chunked_loss, _ = contrastive_step(chunked, loss_fn, sgd(chunked, lr=0.0), accelerator, views, labels,
                                       chunk_size=CHUNK)
    assert chunked_loss.item() == pytest.approx(whole_loss.item(), abs=1e-6)
    expected = gradients(model)
    assert len(expected) == len(list(model.parameters()))
    assert_close_dicts(gradients(chunked), expected, atol=1e-5)
    # a real comparison: the gradients are not all tiny
    assert max(g.abs().max().item() for g in expected.values()) > 1e-3


def reference_step(model, views, labels, loss_fn, optimizer, chunk: int):
    """The plain step of a run whose BatchNorm (and dropout) sees each chunk on its own: one graph, chunk by chunk."""
    projections = [model(part.flatten(0, 1))["projection"] for part in views.split(chunk)]
    projection = torch.cat(projections).view(views.shape[0], 2, -1)
    loss = loss_fn(projection, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_with_batchnorm_one_step_equals_the_step_with_chunk_statistics(accelerator, grad_checkpointing):
    torch.manual_seed(1)
    model = build_model("test_resnet", small_input=True, feat_dim=16).train()
    if grad_checkpointing:
        from supcon.grad_checkpointing import enable_grad_checkpointing

        enable_grad_checkpointing(model)
    reference = copy.deepcopy(model)
    views, labels = batch(1)
    loss_fn = SupConLoss(0.1, 0.07)
    expected_loss = reference_step(reference, views, labels, loss_fn, sgd(reference), CHUNK)
    loss, _ = contrastive_step(model, loss_fn, sgd(model), accelerator, views, labels, chunk_size=CHUNK)
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-6)
    assert_close_dicts(gradients(model), gradients(reference))
    assert_close_dicts(dict(model.named_parameters()), dict(reference.named_parameters()))
    # running statistics: updated once per chunk (four times), exactly as in the reference, not twice
    buffers, expected_buffers = dict(model.named_buffers()), dict(reference.named_buffers())
    assert_close_dicts(buffers, expected_buffers, atol=1e-6)
    counters = [v for k, v in buffers.items() if k.endswith("num_batches_tracked")]
    assert counters and all(int(c) == BATCH // CHUNK for c in counters)


def test_whole_batch_statistics_differ_from_chunk_statistics(accelerator):
    """The check above would catch BatchNorm seeing the whole batch: the two steps do differ."""
    torch.manual_seed(1)
    model = build_model("test_resnet", small_input=True, feat_dim=16).train()
    whole = copy.deepcopy(model)
    views, labels = batch(1)
    loss_fn = SupConLoss(0.1, 0.07)
    contrastive_step(model, loss_fn, sgd(model), accelerator, views, labels, chunk_size=CHUNK)
    contrastive_step(whole, loss_fn, sgd(whole), accelerator, views, labels)
    assert not torch.allclose(model.head.net[0].weight.grad, whole.head.net[0].weight.grad, atol=1e-5)


def test_the_second_pass_draws_the_same_dropout_masks(accelerator):
    torch.manual_seed(2)
    model = DropoutNet().train()
    reference = copy.deepcopy(model)
    views, labels = batch(2)
    loss_fn = SupConLoss(0.1, 0.07)
    torch.manual_seed(5)
    expected_loss = reference_step(reference, views, labels, loss_fn, sgd(reference), CHUNK)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    loss, _ = contrastive_step(model, loss_fn, sgd(model), accelerator, views, labels, chunk_size=CHUNK)
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-6)
    assert_close_dicts(gradients(model), gradients(reference))
    # the generator continues where one pass over the chunks leaves it
    assert torch.equal(torch.rand(3), expected_next)


def test_uneven_last_chunk(accelerator):
    torch.manual_seed(3)
    model = bn_in_eval(build_model("test_resnet", small_input=True, feat_dim=16))
    chunked = copy.deepcopy(model)
    views, labels = batch(3)
    loss_fn = SupConLoss(0.1, 0.07)
    contrastive_step(model, loss_fn, sgd(model, 0.0), accelerator, views, labels)
    contrastive_step(chunked, loss_fn, sgd(chunked, 0.0), accelerator, views, labels, chunk_size=5)  # 5, 5, 5, 1
    assert_close_dicts(gradients(chunked), gradients(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a GradScaler needs a CUDA GPU")
def test_fp16_with_grad_scaler_matches_the_unchunked_step():
    accelerator = Accelerator(mixed_precision="fp16")
    torch.manual_seed(4)
    model = bn_in_eval(build_model("test_resnet", small_input=True, feat_dim=16)).to(accelerator.device)
    chunked = copy.deepcopy(model)
    views, labels = (t.to(accelerator.device) for t in batch(4))
    loss_fn = SupConLoss(0.1, 0.07)
    optimizer, chunked_optimizer = accelerator.prepare(sgd(model, 0.0), sgd(chunked, 0.0))
    contrastive_step(model, loss_fn, optimizer, accelerator, views, labels)
    contrastive_step(chunked, loss_fn, chunked_optimizer, accelerator, views, labels, chunk_size=CHUNK)
    expected = gradients(model)
    # the scaler unscaled both (finite, not multiplied by 2**16)
    assert all(torch.isfinite(g).all() for g in expected.values())
    assert_close_dicts(gradients(chunked), expected, atol=5e-3)


class _DDPAccelerator:
    """What the step uses of an Accelerator, for a DDP model in a bare gloo group (fp32)."""

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        return model.no_sync()


def _ddp_worker(process_rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=process_rank, world_size=WORLD)
    try:
        torch.manual_seed(6)
        model = DistributedDataParallel(DropoutNet(p=0.0))
        views, labels = batch(6)
        local = slice(process_rank * BATCH // WORLD, (process_rank + 1) * BATCH // WORLD)
        loss, _ = contrastive_step(model, SupConLoss(0.1, 0.07), sgd(model, 0.0), _DDPAccelerator(), views[local],
                                   labels[local], chunk_size=2)
        torch.save({"loss": loss, "grads": gradients(model.module)}, Path(out_dir) / f"rank{process_rank}.pth")
    finally:
        dist.destroy_process_group()


def test_two_processes_in_chunks_give_the_gradients_of_one_process_on_the_whole_batch(tmp_path):
    """Each process caches its own chunks of 2; the loss contrasts the global batch; DDP averages once."""
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in range(WORLD)]
    torch.manual_seed(6)
    model = DropoutNet(p=0.0)
    views, labels = batch(6)
    loss, _ = contrastive_step(model, SupConLoss(0.1, 0.07), sgd(model, 0.0), Accelerator(cpu=True), views, labels)
    # the mean over processes of their local losses is the one-process loss of the whole batch
    assert torch.stack([r["loss"] for r in results]).mean().item() == pytest.approx(loss.item(), abs=1e-6)
    for result in results:
        assert_close_dicts(result["grads"], gradients(model))


class _Bf16Accelerator:
    """bf16 autocast on the CPU (the process-wide Accelerator state keeps the fixture's fp32)."""

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def backward(self, loss):
        loss.backward()

    def no_sync(self, model):
        return contextlib.nullcontext()


def test_bf16_autocast_chunks_match_the_unchunked_bf16_step():
    torch.manual_seed(7)
    model = bn_in_eval(build_model("test_resnet", small_input=True, feat_dim=16))
    chunked = copy.deepcopy(model)
    views, labels = batch(7)
    loss_fn = SupConLoss(0.1, 0.07)
    whole_loss, _ = contrastive_step(model, loss_fn, sgd(model, 0.0), _Bf16Accelerator(), views, labels)
    loss, _ = contrastive_step(chunked, loss_fn, sgd(chunked, 0.0), _Bf16Accelerator(), views, labels,
                               chunk_size=CHUNK)
    assert loss.item() == pytest.approx(whole_loss.item(), rel=1e-2)
    expected = gradients(model)
    for name, grad in gradients(chunked).items():  # bf16 rounding: close, in direction and size
        cosine = F.cosine_similarity(grad.flatten(), expected[name].flatten(), dim=0).item()
        assert cosine > 0.99 and grad.norm().item() == pytest.approx(expected[name].norm().item(), rel=5e-2), name
