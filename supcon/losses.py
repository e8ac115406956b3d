"""Supervised contrastive loss (Khosla et al. 2020, L_out, eq. 2) and its SimCLR special case."""

from __future__ import annotations

import torch
from torch import nn

from supcon.distributed import gather_no_grad, gather_with_grad, is_distributed, rank


class SupConLoss(nn.Module):
    """SupCon L_out over ``n_views`` views, with the reference implementation's call convention.

    ``loss(features, labels)`` with ``features`` of shape ``[batch, n_views, dim]`` (L2-normalised)
    and ``labels`` of shape ``[batch]``; ``labels=None`` gives SimCLR (only the other views of the
    same image are positives). Every view is an anchor; for anchor ``i`` with positives ``P(i)``::

        L_i = -(T / T_base) / |P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) )

    and the loss is the mean of ``L_i`` over anchors. An anchor with no positive (one view, a
    label seen once) contributes 0, as in the reference implementation, instead of NaN.

    With several processes (``torch.distributed`` initialised), the anchors are the local
    views and the contrast set is every process's views (a differentiable all-gather), so the
    global batch is contrasted; the mean over processes of the local losses (what DDP's gradient
    averaging optimises) is the single-process loss on the concatenated batch.

    ``memory=(features [n, dim], labels [n])`` adds earlier steps' projections (a cross-batch memory,
    :mod:`supcon.memory`) to the contrast set only: they are never anchors and no gradient flows into
    them; positives where the labels match. ``None`` or an empty memory gives the loss without one.
    """

    def __init__(self, temperature: float = 0.07, base_temperature: float = 0.07, gather: bool = True):
        super().__init__()
        self.temperature = temperature
        self.base_temperature = base_temperature
        self.gather = gather

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None,
                memory: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if features.dim() < 3:
            raise ValueError("features must be [batch, n_views, dim]")
        if features.dim() > 3:
            features = features.flatten(2)
        batch, n_views, _ = features.shape
        features = features.float()
        if labels is None:
            offset = rank() * batch if (self.gather and is_distributed()) else 0
            labels = torch.arange(batch, device=features.device) + offset
        else:
            labels = labels.reshape(-1).to(features.device)
            if labels.numel() != batch:
                raise ValueError(f"labels has {labels.numel()} entries for a batch of {batch}")

        # View-major order, as in the reference: all first views, then all second views, ...
        anchors = features.transpose(0, 1).reshape(n_views * batch, -1)
        anchor_labels = labels.repeat(n_views)
        if self.gather and is_distributed():
            # Every process's [view, sample] blocks, concatenated in rank order.
            contrast = gather_with_grad(anchors)
            contrast_labels = gather_no_grad(anchor_labels)
            self_index = rank() * anchors.shape[0] + torch.arange(anchors.shape[0], device=features.device)
        else:
            contrast = anchors
            contrast_labels = anchor_labels
            self_index = torch.arange(anchors.shape[0], device=features.device)
        if memory is not None and memory[0].shape[0] > 0:
            contrast = torch.cat([contrast, memory[0].detach().to(contrast.device, contrast.dtype)])
            contrast_labels = torch.cat([contrast_labels, memory[1].to(contrast_labels.device)])

        logits = anchors @ contrast.T / self.temperature
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[torch.arange(anchors.shape[0], device=features.device), self_index] = True
        positives = (anchor_labels[:, None] == contrast_labels[None, :]) & ~self_mask
        log_prob = logits - logits.masked_fill(self_mask, float("-inf")).logsumexp(dim=1, keepdim=True)
        n_positives = positives.sum(1)
        mean_log_prob_pos = (log_prob * positives).sum(1) / n_positives.clamp(min=1)
        loss = -(self.temperature / self.base_temperature) * mean_log_prob_pos
        return loss.mean()
