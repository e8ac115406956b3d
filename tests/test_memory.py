"""Cross-batch memory: the queue, and the loss with earlier projections as extra contrast candidates."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from supcon.losses import SupConLoss
from supcon.memory import NO_LABEL, ProjectionMemory


def projections(n: int, views: int = 2, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, views, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def naive_loss(features, labels, memory_features, memory_labels, temperature=0.1, base_temperature=0.07):
    """The SupCon formula with memory entries appended to the contrast set, in float64 loops."""
    batch, n_views, _ = features.shape
    anchors = [(features[b, v].double(), int(labels[b])) for v in range(n_views) for b in range(batch)]
    contrast = anchors + [(f.double(), int(label)) for f, label in zip(memory_features, memory_labels)]
    total = 0.0
    for i, (anchor, anchor_label) in enumerate(anchors):
        others = [j for j in range(len(contrast)) if j != i]
        denominator = sum(math.exp(float(anchor @ contrast[j][0]) / temperature) for j in others)
        positives = [j for j in others if contrast[j][1] == anchor_label]
        if positives:
            total += -(temperature / base_temperature) / len(positives) * sum(
                float(anchor @ contrast[j][0]) / temperature - math.log(denominator) for j in positives)
    return total / len(anchors)


def test_empty_memory_gives_exactly_the_loss_without_one():
    features, labels = projections(6), torch.tensor([0, 1, 0, 2, 1, 0])
    loss_fn = SupConLoss(0.1, 0.07)
    plain = loss_fn(features, labels)
    empty = (torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    assert torch.equal(loss_fn(features, labels, memory=empty), plain)
    assert torch.equal(loss_fn(features, labels, memory=None), plain)
    assert ProjectionMemory(16, 8).contents() is None


@pytest.mark.parametrize("supervised", [True, False])
def test_memory_entries_are_positives_where_labels_match_and_negatives_otherwise(supervised):
    features, labels = projections(5, seed=1), torch.tensor([0, 1, 0, 2, 1])
    memory_features = F.normalize(torch.randn(7, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    memory_labels = torch.tensor([0, 2, 3, 1, 0, 3, 2]) if supervised else torch.full((7,), NO_LABEL)
    loss_fn = SupConLoss(0.1, 0.07)
    got = loss_fn(features, labels if supervised else None, memory=(memory_features, memory_labels))
    expected = naive_loss(features, labels if supervised else torch.arange(5), memory_features, memory_labels)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() != pytest.approx(loss_fn(features, labels if supervised else None).item(), rel=1e-3)


def test_no_gradient_flows_into_the_memory():
    features = projections(4, seed=3).requires_grad_(True)
    memory_features = projections(3, views=1, seed=4)[:, 0].requires_grad_(True)
    SupConLoss()(features, torch.tensor([0, 1, 0, 1]), memory=(memory_features, torch.tensor([0, 1, 2]))).backward()
    assert features.grad is not None and memory_features.grad is None


def test_queue_is_first_in_first_out_and_keeps_the_newest():
    memory = ProjectionMemory(5, 2)
    memory.enqueue(torch.tensor([[1.0, 0], [2, 0], [3, 0]]), torch.tensor([1, 2, 3]))
    features, labels = memory.contents()
    assert labels.tolist() == [1, 2, 3] and features[:, 0].tolist() == [1, 2, 3]
    memory.enqueue(torch.tensor([[4.0, 0], [5, 0], [6, 0]]), torch.tensor([4, 5, 6]))
    features, labels = memory.contents()
    assert labels.tolist() == [6, 2, 3, 4, 5]  # the oldest (1) was replaced
    memory.enqueue(torch.arange(7.0)[:, None].expand(7, 2) + 10, torch.arange(10, 17))  # more than fits
    assert sorted(memory.contents()[1].tolist()) == [12, 13, 14, 15, 16]


def test_state_round_trips_through_a_weights_only_checkpoint():
    memory = ProjectionMemory(4, 3)
    memory.enqueue(torch.randn(3, 3), torch.tensor([0, 1, 2]))
    buffer = io.BytesIO()
    torch.save({"memory": memory.state_dict()}, buffer)
    buffer.seek(0)
    restored = ProjectionMemory(4, 3)
    restored.load_state_dict(torch.load(buffer, weights_only=True)["memory"])
    for got, expected in zip(restored.contents(), memory.contents()):
        assert torch.equal(got, expected)
    assert (restored.next_slot, restored.filled) == (3, 3)
    with pytest.raises(ValueError, match="shape"):
        ProjectionMemory(8, 3).load_state_dict(memory.state_dict())
