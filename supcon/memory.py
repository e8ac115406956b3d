"""Cross-batch memory (Wang et al., CVPR 2020): the last K projections, with labels, as extra contrast candidates.

The loss of a step contrasts its anchors against the step's own (all-gathered) views and, once the
memory is in use, against the projections of earlier steps: positives where the labels match,
negatives otherwise. The memory holds detached projections; no gradient flows into it. Every
process enqueues the all-gathered views of the step, so all processes hold the same memory, and
rank 0's copy is what the checkpoint saves.
"""

from __future__ import annotations

from typing import Any

import torch

from supcon.distributed import gather_no_grad

#: The label stored for SimCLR entries: it matches no anchor (SimCLR's anchor labels are >= 0).
NO_LABEL = -1


class ProjectionMemory:
    """A first-in, first-out queue of ``size`` projections ``[size, dim]`` and their labels.

    Args:
        size: how many projections (views, not images) it holds.
        dim: the projection size.
        device: where the queue lives (the training device).
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu"):
        if size < 1:
            raise ValueError(f"memory size must be at least 1, got {size}")
        self.size = size
        self.features = torch.zeros(size, dim, device=device)
        self.labels = torch.full((size,), NO_LABEL, dtype=torch.long, device=device)
        self.next_slot = 0  # where the next projection is written
        self.filled = 0  # how many slots hold a projection

    def contents(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(features [n, dim], labels [n])`` of the ``n`` stored projections; None while empty."""
        if self.filled == 0:
            return None
        return self.features[:self.filled], self.labels[:self.filled]

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add this process's ``features [n, dim]`` and ``labels [n]`` and every other process's (all-gathered)."""
        features = gather_no_grad(features.detach().float())
        labels = gather_no_grad(labels.detach().long())
        if features.shape[0] > self.size:  # more than fits: only the newest stay
            features, labels = features[-self.size:], labels[-self.size:]
        n = features.shape[0]
        slots = (self.next_slot + torch.arange(n, device=self.features.device)) % self.size
        self.features[slots] = features.to(self.features.device)
        self.labels[slots] = labels.to(self.labels.device)
        self.next_slot = (self.next_slot + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only (``torch.load(weights_only=True)``-loadable)."""
        return {"features": self.features.detach().cpu().clone(), "labels": self.labels.detach().cpu().clone(),
                "next_slot": self.next_slot, "filled": self.filled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s contents.

        Raises:
            ValueError: the saved queue has another size or projection size.
        """
        if tuple(state["features"].shape) != tuple(self.features.shape):
            raise ValueError(f"saved memory has shape {tuple(state['features'].shape)}, "
                             f"this run's is {tuple(self.features.shape)}")
        self.features.copy_(state["features"])
        self.labels.copy_(state["labels"])
        self.next_slot = int(state["next_slot"])
        self.filled = int(state["filled"])
