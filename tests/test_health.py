"""Training health: collapsed level, spread, the collapse detector, the kNN monitor and their logging."""

from __future__ import annotations

import csv
import logging
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supcon.health import (
    CollapseDetector,
    collapsed_loss,
    embedding_spread,
    extract_features,
    knn_accuracy,
    weighted_knn_predict,
)
from supcon.losses import SupConLoss
from tests.conftest import tiny_config


def test_collapsed_loss_is_the_loss_of_identical_projections():
    batch, views, dim = 16, 2, 8
    same = F.normalize(torch.ones(batch, views, dim), dim=-1)
    labels = torch.arange(batch) % 4
    for temperature in (0.07, 0.5):
        loss = SupConLoss(temperature=temperature, base_temperature=0.07)(same, labels).item()
        assert loss == pytest.approx(collapsed_loss(batch, views, temperature, 0.07), rel=1e-5)
    assert collapsed_loss(128, 2) == pytest.approx(math.log(255))


def test_spread_is_zero_when_collapsed_and_about_one_over_sqrt_dim_when_uniform():
    torch.manual_seed(0)
    dim = 128
    uniform = F.normalize(torch.randn(4096, dim), dim=1)
    assert embedding_spread(uniform).item() == pytest.approx(1 / math.sqrt(dim), rel=0.05)
    assert embedding_spread(uniform[:1].expand(50, dim)).item() == pytest.approx(0.0, abs=1e-7)


def test_detector_fires_after_patience_epochs_at_the_collapsed_level_and_rearms():
    level, dim = math.log(255), 128
    detector = CollapseDetector(patience=3)
    collapsed = dict(loss=level * 1.001, collapsed_value=level, spread=0.0005, dim=dim)
    assert [detector.update(**collapsed) for _ in range(5)] == [False, False, True, False, False]
    # leaving the level resets; a new stretch fires again
    assert detector.update(loss=level * 0.9, collapsed_value=level, spread=0.05, dim=dim) is False
    assert [detector.update(**collapsed) for _ in range(3)] == [False, False, True]


@pytest.mark.parametrize("loss_factor, spread", [(1.0, 0.08), (0.95, 0.0005), (1.2, 0.0005)])
def test_detector_needs_both_the_level_and_a_tiny_spread(loss_factor, spread):
    level = math.log(63)
    detector = CollapseDetector(patience=1)
    assert not any(detector.update(level * loss_factor, level, spread, 128) for _ in range(5))


def brute_force_knn(bank, bank_labels, queries, num_classes, k, temperature, exclude_self=False):
    predictions = []
    for qi, q in enumerate(queries.double()):
        sims = []
        for bi, b in enumerate(bank.double()):
            if exclude_self and bi == qi:
                continue
            sims.append(((q @ b) / (q.norm() * b.norm())).item())
            sims[-1] = (sims[-1], bi)
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, bi in sims[:k]:
            votes[int(bank_labels[bi])] += math.exp(sim / temperature)
        predictions.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(predictions)


@pytest.mark.parametrize("k, exclude_self", [(1, False), (5, False), (7, True), (100, False)])
def test_weighted_knn_equals_brute_force(k, exclude_self):
    generator = torch.Generator().manual_seed(k)
    bank = torch.randn(40, 6, generator=generator)
    bank_labels = torch.randint(0, 3, (40,), generator=generator)
    queries = bank if exclude_self else torch.randn(25, 6, generator=generator)
    expected = brute_force_knn(bank, bank_labels, queries, 3, k, 0.5, exclude_self)
    got = weighted_knn_predict(bank, bank_labels, queries, 3, k=k, temperature=0.5, exclude_self=exclude_self,
                               chunk=7)
    assert torch.equal(got, expected)
    query_labels = torch.randint(0, 3, (len(queries),), generator=generator)
    assert knn_accuracy(bank, bank_labels, queries, query_labels, 3, k, 0.5, exclude_self) == pytest.approx(
        (expected == query_labels).float().mean().item())


class ConstantEncoder(nn.Module):
    """Maps every image to the same vector: a forced collapse."""

    num_features = 16

    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.ones(self.num_features))

    def forward(self, x):
        return self.value.expand(x.shape[0], -1) + 0 * x.mean()


def test_forced_collapse_warns_and_stop_on_collapse_ends_the_run_keeping_checkpoints(
        train_folder, tmp_path, monkeypatch, caplog):
    import supcon.train as train_module
    import supcon.trainer as trainer_module
    from supcon.models import SupConModel

    monkeypatch.setattr(trainer_module, "build_model", lambda **kw: SupConModel(ConstantEncoder(), kw["feat_dim"]))
    config = tiny_config(train_folder, tmp_path / "run", epochs=10, collapse_patience=2, stop_on_collapse=True,
                         knn_every=0)
    with caplog.at_level(logging.WARNING):
        result = train_module.train(config, progress=False)
    assert result.stopped_on_collapse and result.exit_code == 3
    assert result.epochs_done == 2
    assert "collapsed" in caplog.text and "--stop-on-collapse" in caplog.text
    assert (tmp_path / "run" / "last.pth").is_file()
    assert (tmp_path / "run" / "ckpt_epoch_2.pth").is_file()
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert float(row["loss"]) == pytest.approx(float(row["collapsed_loss"]), rel=1e-4)
        assert float(row["spread"]) == pytest.approx(0.0, abs=1e-6)


def test_healthy_tiny_run_is_not_flagged_and_logs_every_health_series(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = list(csv.DictReader(open(trained_run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert float(row["collapsed_loss"]) == pytest.approx(math.log(2 * 8 - 1))
        assert float(row["spread"]) * math.sqrt(128) > 0.05  # far from collapsed
        assert 0.0 <= float(row["knn_accuracy"]) <= 1.0
    # the toy classes are colours: a working encoder separates them
    assert float(rows[-1]["knn_accuracy"]) >= 0.9
    events = EventAccumulator(str(trained_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/collapsed_loss", "train/spread", "monitor/knn_accuracy", "train/lr",
            "train/images_per_s"} <= tags
    assert [e.step for e in events.Scalars("monitor/knn_accuracy")] == [1, 2, 3, 4]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world, port, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    accelerator = Accelerator(cpu=True)
    # sample i is the constant image i, label i % 3; the "encoder" averages pixels, so feature i == i
    images = torch.arange(11, dtype=torch.float32)[:, None, None, None].expand(11, 1, 2, 2).clone()
    loader = accelerator.prepare(DataLoader(TensorDataset(images, torch.arange(11) % 3), batch_size=2))
    encoder = nn.Sequential(nn.Flatten(), nn.AdaptiveAvgPool1d(1))
    features, labels = extract_features(encoder, loader, accelerator)
    queue.put((rank, accelerator.num_processes, features.flatten().tolist(), labels.tolist()))
    accelerator.end_training()


def test_knn_monitor_features_come_from_every_process():
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_gather_worker, args=(2, _free_port(), queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    for _rank, processes, features, labels in results:
        assert processes == 2
        # every process holds every sample once, in order (the padding of the last shard is dropped)
        assert features == [float(i) for i in range(11)]
        assert labels == [i % 3 for i in range(11)]


def test_until_plateau_ends_a_collapsed_run_with_one_line(train_folder, tmp_path, monkeypatch, caplog):
    import supcon.train as train_module
    import supcon.trainer as trainer_module
    from supcon.models import SupConModel

    monkeypatch.setattr(trainer_module, "build_model", lambda **kw: SupConModel(ConstantEncoder(), kw["feat_dim"]))
    config = tiny_config(train_folder, tmp_path / "run", epochs=30, collapse_patience=2, until="plateau",
                         probe_every=1, knn_every=0)
    with caplog.at_level(logging.INFO):
        result = train_module.train(config, progress=False)
    assert result.stopped_on_collapse and result.exit_code == 3
    assert result.epochs_done == 2  # not trained to the --epochs ceiling
    ending = [r.getMessage() for r in caplog.records if "stopping (--until plateau)" in r.getMessage()]
    assert len(ending) == 1 and "collapsed level for 2 epochs" in ending[0]
    assert (tmp_path / "run" / "last.pth").is_file()
