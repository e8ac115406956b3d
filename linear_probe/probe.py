"""One linear head on a frozen encoder's features, validated after every head epoch.

As in the reference SupCon linear evaluation: a single ``nn.Linear``, cross-entropy, SGD with
momentum, a cosine schedule set once per head epoch (``eta_min = lr * 0.2 ** 3``), validation after
every head epoch, and the best validation accuracy kept with its head epoch and weights. Within one
checkpoint the *first* head epoch that reaches the best accuracy wins (the reference's
``if val_acc > best_acc``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from linear_probe.config import ProbeConfig
from linear_probe.features import EpochBatches, torch_threads
from supcon.schedule import LRSchedule

#: The reference linear evaluation's ``lr_decay_rate``: cosine ends at ``lr * 0.2 ** 3``.
COSINE_DECAY_RATE = 0.2

#: On the CPU, head steps below this many multiply-adds (batch x features x classes) run on one
#: thread: intra-op threads only add synchronisation to such tiny matmuls, and on a busy machine
#: their spinning made 100 head epochs of a 96-d, 10-class head 35x slower (37 s vs 1.1 s).
SINGLE_THREAD_MACS = 1 << 24


@dataclass(frozen=True)
class HeadSettings:
    """Everything that decides how a head is trained (part of the "already probed?" key)."""

    # The defaults are probe-all's (ProbeConfig), written once there.
    batch_size: int = ProbeConfig.batch_size
    learning_rate: float = ProbeConfig.learning_rate
    momentum: float = ProbeConfig.momentum
    weight_decay: float = ProbeConfig.weight_decay
    epochs: int = ProbeConfig.epochs
    cosine: bool = ProbeConfig.cosine
    augment: bool = ProbeConfig.augment
    seed: int = ProbeConfig.seed
    head_solver: str = "sgd"  # a resolved ProbeConfig's solver is always given (from_config)

    @classmethod
    def from_config(cls, config: ProbeConfig) -> HeadSettings:
        """The head settings of a resolved probe-all config."""
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        """The settings that decide the head (and its key).

        SGD: every field but ``head_solver`` (so heads probed before the option existed keep their key).
        L-BFGS: only what the fit depends on (solver, C grid, iterations); batch, LR, epochs do not apply.
        """
        if self.head_solver == "lbfgs":
            from supcon.logistic import C_GRID, MAX_ITER

            return {"head_solver": "lbfgs", "c_grid": list(C_GRID), "max_iter": MAX_ITER, "augment": False}
        settings = asdict(self)
        del settings["head_solver"]
        return settings

    def describe(self) -> str:
        """E.g. ``cached, bs 256, lr 0.25, 100 ep`` (weight decay shown when not 0), or the L-BFGS label."""
        return describe_settings(self.to_dict())


def describe_settings(settings: dict[str, Any]) -> str:
    """A short label of head settings for tables and plot legends."""
    if settings.get("head_solver") == "lbfgs":
        return "cached, L-BFGS logistic regression, C on val"
    mode = "augment" if settings.get("augment") else "cached"
    text = f"{mode}, bs {settings.get('batch_size')}, lr {settings.get('learning_rate'):g}"
    if settings.get("weight_decay"):
        text += f", wd {settings['weight_decay']:g}"
    return text + f", {settings.get('epochs')} ep"


def settings_key(settings: HeadSettings, **data: Any) -> str:
    """A short stable hash of the head settings and the data they were trained and validated on."""
    text = json.dumps({"head": settings.to_dict(), **data}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class HeadResult:
    """The outcome of training one head: the best epoch by val accuracy and its weights, and the final head."""

    best_val_accuracy: float
    best_head_epoch: int  # 1-based
    best_val_loss: float
    state_dict: dict[str, torch.Tensor]
    val_accuracy_per_epoch: list[float] = field(default_factory=list)
    val_loss_per_epoch: list[float] = field(default_factory=list)
    train_loss_per_epoch: list[float] = field(default_factory=list)
    #: L-BFGS heads: the inverse L2 strength chosen on val (the per-epoch lists then hold one value per C).
    regularization_c: float | None = None
    final_state_dict: dict[str, torch.Tensor] = field(default_factory=dict)


def make_head(feature_dim: int, num_classes: int, seed: int) -> nn.Linear:
    """A linear head with PyTorch's default init drawn from ``seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(feature_dim, num_classes)


@torch.no_grad()
def evaluate_head(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of a head on features already on its device."""
    logits = head(features)
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(1) == labels).float().mean()
    return float(accuracy.item()), float(loss.item())


def train_linear_head(epoch_batches: EpochBatches, steps_per_epoch: int, val_features: torch.Tensor,
                      val_labels: torch.Tensor, num_classes: int, settings: HeadSettings) -> HeadResult:
    """Train a linear head for ``settings.epochs`` head epochs; keep the best by val accuracy.

    Args:
        epoch_batches: yields the ``(features, labels)`` mini-batches of a 0-based head epoch,
            on the device the head should train on (cached or freshly augmented features).
        steps_per_epoch: mini-batches per head epoch (for the schedule).
        val_features: ``[N, D]`` val features on that device.
        val_labels: ``[N]`` val labels on that device.
        num_classes: outputs of the head.
        settings: optimiser and schedule settings.
    """
    device = val_features.device
    head = make_head(val_features.shape[1], num_classes, settings.seed).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=settings.learning_rate, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    schedule = LRSchedule(settings.learning_rate, settings.epochs, max(steps_per_epoch, 1), cosine=settings.cosine,
                          decay_rate=COSINE_DECAY_RATE)
    tiny = device.type == "cpu" and settings.batch_size * val_features.shape[1] * num_classes < SINGLE_THREAD_MACS
    # (an encoder behind epoch_batches, with --augment, keeps the caller's threads: see augmented_batches)
    with torch_threads(1 if tiny else None):
        return _train(head, optimizer, schedule, epoch_batches, val_features, val_labels, settings)


def _train(head, optimizer, schedule, epoch_batches, val_features, val_labels, settings) -> HeadResult:
    device = val_features.device
    result = HeadResult(-1.0, 0, float("inf"), {})
    for head_epoch in range(settings.epochs):
        lr = schedule.epoch_lr(head_epoch + 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        head.train()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for features, labels in epoch_batches(head_epoch):
            loss = F.cross_entropy(head(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * labels.shape[0]
            seen += labels.shape[0]
        head.eval()
        val_accuracy, val_loss = evaluate_head(head, val_features, val_labels)
        result.train_loss_per_epoch.append(float(loss_sum.item()) / max(seen, 1))
        result.val_accuracy_per_epoch.append(val_accuracy)
        result.val_loss_per_epoch.append(val_loss)
        if val_accuracy > result.best_val_accuracy:
            result.best_val_accuracy = val_accuracy
            result.best_head_epoch = head_epoch + 1
            result.best_val_loss = val_loss
            result.state_dict = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    # the head at the end of the schedule: what the default selection uses (its val accuracy is no maximum)
    result.final_state_dict = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    return result
