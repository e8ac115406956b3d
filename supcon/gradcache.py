"""The SupCon optimisation step, plain or with exact gradient caching (Gao et al., 2021).

The contrastive loss couples the images of a batch only through their projections, so a large
contrastive batch can go through the network in chunks:

1. encode every chunk without a graph (the memory of one chunk at a time);
2. compute the loss over all projections at once (all-gathered across processes, plus the
   cross-batch memory, if any) and its gradient with respect to the projections;
3. encode each chunk again, with a graph, and back-propagate the cached projection gradients.

The parameter gradients are those of the whole batch, for about one extra forward pass. Two
details keep the second pass the same computation as the first:

* **Randomness.** The random number generator state is saved before each chunk's first encoding
  and restored before its second, so dropout and drop-path draw the same masks. (The device
  augmentation runs once per batch, before the batch is cut into chunks.)
* **BatchNorm.** Each chunk is normalised with its own statistics, as per-GPU BatchNorm under DDP
  is with each GPU's. The running statistics are updated once per chunk, by the second pass: every
  buffer is put back after the first pass, which therefore leaves no trace in the model.

With several processes, each process caches its own chunks; the loss contrasts the global batch,
and DDP averages the gradients once, after the last chunk (the others run under ``no_sync``).
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator

from supcon.memory import NO_LABEL, ProjectionMemory


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _encode(model, images: torch.Tensor, accelerator: Accelerator, channels_last: bool) -> torch.Tensor:
    """``[B, n_views, C, H, W]`` views -> float projections ``[B * n_views, dim]`` (image-major)."""
    inputs = images.flatten(0, 1)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with accelerator.autocast():
        return model(inputs)["projection"].float()


def _loss(loss_fn, projection: torch.Tensor, labels: torch.Tensor | None, contents) -> torch.Tensor:
    """Without a memory in use, the loss is called as it always was (``loss_fn(features, labels)``)."""
    if contents is None:
        return loss_fn(projection, labels)
    return loss_fn(projection, labels, memory=contents)


def contrastive_step(model, loss_fn, optimizer, accelerator: Accelerator, views: torch.Tensor, labels: torch.Tensor,
                     *, channels_last: bool = False, supervised: bool = True, chunk_size: int | None = None,
                     memory: ProjectionMemory | None = None,
                     use_memory: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on ``[B, n_views, C, H, W]`` views.

    Args:
        chunk_size: images per forward pass; None or ``>= B``: the whole batch at once (no caching).
        memory: a cross-batch memory; the step's projections are added to it after the step.
        use_memory: contrast against the memory's contents (False during ``--memory-warmup``).

    Returns:
        The detached loss and the detached first-view projections ``[B, dim]``.
    """
    batch, n_views = views.shape[:2]
    loss_labels = labels if supervised else None
    contents = memory.contents() if (memory is not None and use_memory) else None
    if chunk_size is None or chunk_size >= batch:
        projection = _encode(model, views, accelerator, channels_last).view(batch, n_views, -1)
        loss = _loss(loss_fn, projection, loss_labels, contents)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
    else:
        loss, projection = _cached_backward(model, loss_fn, optimizer, accelerator, views, loss_labels, chunk_size,
                                            channels_last, contents)
    optimizer.step()
    projection = projection.detach()
    if memory is not None:
        stored_labels = labels if supervised else torch.full_like(labels, NO_LABEL)
        memory.enqueue(projection.flatten(0, 1), stored_labels.repeat_interleave(n_views))
    return loss.detach(), projection[:, 0]


def _cached_backward(model, loss_fn, optimizer, accelerator: Accelerator, views: torch.Tensor,
                     labels: torch.Tensor | None, chunk_size: int, channels_last: bool,
                     contents) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient caching: the parameter gradients of the whole batch's loss, ``chunk_size`` images at a time."""
    batch, n_views = views.shape[:2]
    device = views.device
    chunks = views.split(chunk_size)
    # Put every buffer (BatchNorm running statistics, its batch counter) back after the first pass.
    buffers = [buffer for buffer in model.buffers() if buffer is not None]
    saved_buffers = [buffer.detach().clone() for buffer in buffers]
    chunk_rng = []
    with torch.no_grad():
        parts = []
        for chunk in chunks:
            chunk_rng.append(_rng_state(device))
            parts.append(_encode(model, chunk, accelerator, channels_last))
        for buffer, saved in zip(buffers, saved_buffers):
            buffer.copy_(saved)
    rng_after = _rng_state(device)
    projection = torch.cat(parts).view(batch, n_views, -1).requires_grad_(True)
    loss = _loss(loss_fn, projection, labels, contents)
    (projection_grad,) = torch.autograd.grad(loss, projection)
    grads = projection_grad.flatten(0, 1).split(chunk_size * n_views)

    optimizer.zero_grad(set_to_none=True)
    last = len(chunks) - 1
    for index, (chunk, grad) in enumerate(zip(chunks, grads)):
        _set_rng_state(chunk_rng[index], device)
        # DDP averages the gradients once, in the last chunk's backward.
        sync = contextlib.nullcontext() if index == last else accelerator.no_sync(model)
        with sync:
            chunk_projection = _encode(model, chunk, accelerator, channels_last)
            # d(sum(z * g))/d(theta) = g . dz/d(theta): the cached gradient, through the chunk's graph.
            accelerator.backward((chunk_projection * grad).sum())
    _set_rng_state(rng_after, device)
    return loss, projection
