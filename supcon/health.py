"""Training health: the collapsed-loss level, embedding spread, a collapse detector and a kNN monitor.

A SupCon loss that stops moving may mean a collapsed embedding (every image mapped to one point),
whose loss is exactly ``(T / T_base) * log(n_views * global_batch - 1)``. We log the loss beside
that level together with the spread of the projections, warn when a run sits there, and measure
whether the encoder's features separate the classes with a cheap weighted kNN on the val folder.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def collapsed_loss(global_batch: int, n_views: int = 2, temperature: float = 0.07,
                   base_temperature: float = 0.07) -> float:
    """Loss value when every projection is the same vector: ``(T / T_base) * log(n_views * B - 1)``."""
    return (temperature / base_temperature) * math.log(n_views * global_batch - 1)


def embedding_spread(projections: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std of L2-normalised projections ``[N, dim]``.

    About ``1/sqrt(dim)`` for vectors spread over the sphere, 0 for a collapsed embedding.
    """
    return projections.float().std(dim=0, unbiased=False).mean()


@dataclass
class CollapseDetector:
    """Counts consecutive epochs at the collapsed level; ``update`` returns True when it fires.

    An epoch counts as collapsed when its mean loss is within ``loss_tolerance`` (relative) of the
    collapsed value *and* the normalised spread ``spread * sqrt(dim)`` is below ``spread_tolerance``
    (uniform vectors give about 1). Both must hold: a loss near the level alone also happens while
    a healthy run is leaving it.
    """

    patience: int = 3
    loss_tolerance: float = 0.01
    spread_tolerance: float = 0.05
    epochs_collapsed: int = 0
    fired: bool = False

    def is_collapsed(self, loss: float, collapsed_value: float, spread: float, dim: int) -> bool:
        near = abs(loss - collapsed_value) <= self.loss_tolerance * collapsed_value
        return near and spread * math.sqrt(dim) < self.spread_tolerance

    def update(self, loss: float, collapsed_value: float, spread: float, dim: int) -> bool:
        if self.is_collapsed(loss, collapsed_value, spread, dim):
            self.epochs_collapsed += 1
        else:
            self.epochs_collapsed = 0
            self.fired = False
        if self.epochs_collapsed >= self.patience and not self.fired:
            self.fired = True
            return True
        return False

    def state_dict(self) -> dict:
        return {"epochs_collapsed": self.epochs_collapsed, "fired": self.fired}

    def load_state_dict(self, state: dict) -> None:
        self.epochs_collapsed = int(state.get("epochs_collapsed", 0))
        self.fired = bool(state.get("fired", False))


COLLAPSE_ADVICE = (
    "the embedding has collapsed: every image maps to nearly the same point (loss at log(2B-1), "
    "projection spread ~0), so the loss looks converged but nothing is learned. Try: a fresh run with "
    "--no-zero-init-last (the default) or --pretrained, a larger --learning-rate warm-up (--warm), a larger "
    "batch, or milder augmentation; --stop-on-collapse ends such runs early."
)


@torch.no_grad()
def weighted_knn_predict(bank_features: torch.Tensor, bank_labels: torch.Tensor, query_features: torch.Tensor,
                         num_classes: int, k: int = 20, temperature: float = 0.07,
                         exclude_self: bool = False, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): cosine similarity, votes ``exp(sim / T)`` of the ``k`` nearest.

    Args:
        bank_features: ``[N, D]`` features of the labelled bank.
        bank_labels: ``[N]`` integer labels.
        query_features: ``[M, D]`` features to classify.
        num_classes: number of classes.
        k: neighbours (capped at the bank size).
        temperature: vote temperature.
        exclude_self: the queries are the bank itself (same order): leave each one out.

    Returns:
        ``[M]`` predicted labels.
    """
    bank = F.normalize(bank_features.float(), dim=1)
    queries = F.normalize(query_features.float(), dim=1)
    k = min(k, bank.shape[0] - (1 if exclude_self else 0))
    predictions = []
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start:start + chunk] @ bank.T
        if exclude_self:
            rows = torch.arange(sims.shape[0], device=sims.device)
            sims[rows, rows + start] = float("-inf")
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, bank_labels[top_idx], (top_sims / temperature).exp())
        predictions.append(votes.argmax(1))
    return torch.cat(predictions)


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, loader, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features and labels for every sample of ``loader``, gathered from every process.

    ``loader`` must have been prepared by ``accelerator`` (so each process sees a shard);
    ``gather_for_metrics`` drops the padding of the last shard.
    """
    was_training = encoder.training
    encoder.eval()
    features, labels = [], []
    for images, targets in loader:
        with accelerator.autocast():
            out = encoder(images)
        features.append(accelerator.gather_for_metrics(out.float().contiguous()))
        labels.append(accelerator.gather_for_metrics(targets))
    encoder.train(was_training)
    return torch.cat(features), torch.cat(labels)


def knn_accuracy(bank_features, bank_labels, query_features, query_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07, exclude_self: bool = False) -> float:
    """Fraction of queries whose weighted-kNN prediction equals their label."""
    predicted = weighted_knn_predict(bank_features, bank_labels, query_features, num_classes, k, temperature,
                                     exclude_self=exclude_self)
    return (predicted == query_labels.to(predicted.device)).float().mean().item()
