"""The SGD the trainers build: torch's fused kernel where this torch has one for the device."""

from __future__ import annotations

import torch


def build_optimizer(params, lr: float, momentum: float, weight_decay: float,
                    device: torch.device | str) -> torch.optim.SGD:
    """SGD with torch's fused kernel where this torch has one for ``device`` (CUDA, and the CPU since 2.4).

    The fused step updates every parameter in one kernel (one per chunk of tensors), where the default
    runs several multi-tensor kernels on a GPU (weight decay, momentum, update) and a Python loop of
    four ops per parameter on the CPU; the update it computes is the same (tests/test_step_overhead.py).
    With a GradScaler (fp16) it also unscales and skips on overflow inside the kernel, without the
    host sync of the unfused path.
    """
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a private helper: if a later torch moves it, CUDA has had the kernel since 2.2
        supported = {"cuda"}
    fused = torch.device(device).type in supported
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)


def implementation_of(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's fused/foreach choice (to keep across ``load_state_dict``)."""
    return [{"fused": group.get("fused"), "foreach": group.get("foreach")} for group in optimizer.param_groups]


def keep_implementation(optimizer: torch.optim.Optimizer, implementation: list[dict]) -> None:
    """Restore each group's fused/foreach choice after ``load_state_dict`` (which copies the saved one)."""
    for group, chosen in zip(optimizer.param_groups, implementation):
        group.update(chosen)
