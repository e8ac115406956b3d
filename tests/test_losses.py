"""SupConLoss against a naive float64 loop of Khosla et al. 2020, eq. 2 (L_out)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from supcon.losses import SupConLoss


def naive_supcon(features: torch.Tensor, labels: torch.Tensor | None, temperature: float,
                 base_temperature: float) -> torch.Tensor:
    """Eq. 2 of the paper, one anchor and one positive at a time, in float64 (differentiable).

    Every view of every sample is an anchor i; A(i) is every other view in the batch; P(i) the views in
    A(i) with the anchor's label (for SimCLR, the other views of the same image). The reference
    convention: the result is the mean over anchors of (T / T_base) * L_i, and an anchor with no
    positive contributes 0.
    """
    batch, n_views, _ = features.shape
    z = features.double()
    label_of = labels.tolist() if labels is not None else list(range(batch))
    views = [(z[b, v], label_of[b]) for b in range(batch) for v in range(n_views)]
    terms = []
    for i, (anchor, anchor_label) in enumerate(views):
        denominator = sum(torch.exp(anchor @ other / temperature) for a, (other, _) in enumerate(views) if a != i)
        positives = [other for p, (other, label) in enumerate(views) if p != i and label == anchor_label]
        if not positives:
            terms.append(torch.zeros((), dtype=torch.float64))
            continue
        log_probs = [torch.log(torch.exp(anchor @ positive / temperature) / denominator) for positive in positives]
        terms.append(-(temperature / base_temperature) * sum(log_probs) / len(positives))
    return sum(terms) / len(terms)


def unit_features(batch: int, n_views: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, n_views, dim, generator=generator), dim=-1)


CASES = [
    # batch, n_views, dim, labels (None: SimCLR)
    (4, 2, 8, [0, 1, 0, 1]),
    (6, 2, 16, [0, 0, 0, 1, 2, 2]),
    (5, 3, 4, [3, 1, 3, 3, 1]),
    (7, 1, 8, [0, 1, 0, 2, 1, 3, 0]),  # one view: labels 2 and 3 have no positive
    (3, 1, 5, [0, 1, 2]),  # one view, no anchor has a positive
    (16, 2, 32, [i % 5 for i in range(16)]),
    (5, 2, 8, None),
    (4, 3, 6, None),
    (3, 1, 4, None),  # SimCLR with one view: no positives at all
]


@pytest.mark.parametrize("batch,n_views,dim,labels", CASES)
@pytest.mark.parametrize("temperature,base_temperature", [(0.07, 0.07), (0.1, 0.07), (0.5, 1.0)])
def test_loss_equals_naive_formula(batch, n_views, dim, labels, temperature, base_temperature):
    features = unit_features(batch, n_views, dim, seed=batch * 10 + n_views)
    label_tensor = torch.tensor(labels) if labels is not None else None
    expected = naive_supcon(features, label_tensor, temperature, base_temperature)
    loss = SupConLoss(temperature, base_temperature)(features, label_tensor)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("batch,n_views,dim,labels", [(4, 2, 8, [0, 1, 0, 1]), (5, 3, 4, [3, 1, 3, 3, 1]),
                                                      (5, 1, 6, [0, 1, 0, 2, 1]), (4, 2, 6, None)])
def test_gradient_equals_naive_formula(batch, n_views, dim, labels):
    raw = torch.randn(batch, n_views, dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    label_tensor = torch.tensor(labels) if labels is not None else None

    raw_naive = raw.clone().requires_grad_(True)
    naive_supcon(F.normalize(raw_naive, dim=-1), label_tensor, 0.1, 0.07).backward()
    raw_loss = raw.float().requires_grad_(True)
    SupConLoss(0.1, 0.07)(F.normalize(raw_loss, dim=-1), label_tensor).backward()

    assert torch.isfinite(raw_loss.grad).all()
    torch.testing.assert_close(raw_loss.grad.double(), raw_naive.grad, rtol=1e-4, atol=1e-5)


def test_simclr_is_supcon_with_one_label_per_image():
    features = unit_features(6, 2, 8, seed=3)
    simclr = SupConLoss()(features, None)
    distinct_labels = SupConLoss()(features, torch.arange(6) * 10)
    assert simclr.item() == pytest.approx(distinct_labels.item(), rel=1e-6)
    # ...and different from a supervised loss where samples share labels
    assert SupConLoss()(features, torch.tensor([0, 0, 0, 1, 1, 1])).item() != pytest.approx(simclr.item(), rel=1e-3)


def test_anchors_without_positive_give_zero_not_nan():
    features = unit_features(4, 1, 8, seed=5).requires_grad_(True)
    loss = SupConLoss()(features, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(features.grad).all()


def test_collapsed_embedding_gives_log_2b_minus_1():
    """Every projection identical: each anchor's log-probability is -log(2B - 1), whatever the labels."""
    batch = 8
    features = F.normalize(torch.ones(batch, 2, 16), dim=-1)
    loss = SupConLoss(0.1, 0.07)(features, torch.tensor([0, 1] * 4))
    assert loss.item() == pytest.approx(0.1 / 0.07 * math.log(2 * batch - 1), rel=1e-5)


def test_extra_feature_dims_are_flattened_and_bad_shapes_refused():
    features = unit_features(4, 2, 8, seed=9)
    labels = torch.tensor([0, 1, 0, 1])
    loss = SupConLoss()(features.view(4, 2, 2, 4), labels)
    assert loss.item() == pytest.approx(SupConLoss()(features, labels).item())
    with pytest.raises(ValueError, match="batch, n_views, dim"):
        SupConLoss()(features[:, 0], labels)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        SupConLoss()(features, labels[:3])
