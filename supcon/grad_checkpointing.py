"""Activation (gradient) checkpointing for the encoder, with BatchNorm statistics updated once per step.

timm models recompute each checkpointed block's forward during backward
(``model.set_grad_checkpointing()``). Recomputing a BatchNorm layer in training mode updates its
running mean and variance a second time, so the statistics the probes later use would differ from
an unchecked run's (momentum applied twice per step). :func:`enable_grad_checkpointing` keeps the
math identical: a BatchNorm layer called a second time within one forward-and-backward puts its
running statistics back after the recompute. The recompute itself normalises with the batch
statistics, as the first call did, so loss and gradients are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from supcon.errors import UserError


class _BatchNormOncePerStep:
    """Hooks that undo the running-statistics update of a BatchNorm layer's recomputed forward."""

    def __init__(self):
        self.step = 0
        self.last_step: dict[int, int] = {}
        self.saved: dict[int, list[torch.Tensor]] = {}

    def new_step(self, module, args) -> None:
        self.step += 1

    def before(self, bn: nn.modules.batchnorm._BatchNorm, args) -> None:
        if not (bn.training and bn.track_running_stats):
            return
        key = id(bn)
        if self.last_step.get(key) == self.step:  # called again in this step: the backward's recompute
            self.saved[key] = [buf.detach().clone() for buf in (bn.running_mean, bn.running_var,
                                                                bn.num_batches_tracked) if buf is not None]
        else:
            self.last_step[key] = self.step

    def after(self, bn: nn.modules.batchnorm._BatchNorm, args, output) -> None:
        saved = self.saved.pop(id(bn), None)
        if saved is not None:
            buffers = [buf for buf in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if buf is not None]
            with torch.no_grad():
                for buf, value in zip(buffers, saved):
                    buf.copy_(value)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Checkpoint the activations of ``model.encoder`` (a timm model) to trade compute for memory.

    Each step then recomputes the encoder blocks' forward during backward (about a third more
    compute) and keeps only the block inputs, not every intermediate activation.

    Args:
        model: a :class:`supcon.models.SupConModel` (hooks go on it and its BatchNorm layers).

    Raises:
        UserError: the encoder does not support timm's gradient checkpointing.
    """
    encoder = model.encoder
    if not hasattr(encoder, "set_grad_checkpointing"):
        raise UserError(f"--grad-checkpointing: the model {type(encoder).__name__} does not support it")
    try:
        encoder.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError) as exc:
        raise UserError(f"--grad-checkpointing is not supported by this model: {exc}")
    guard = _BatchNormOncePerStep()
    model.register_forward_pre_hook(guard.new_step)
    for module in encoder.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(guard.before)
            module.register_forward_hook(guard.after)
