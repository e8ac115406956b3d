"""The training batches of ``--sampler``: ``random`` (:class:`supcon.data.EpochBatchSampler`) or ``balanced``.

``balanced`` gives every class an equal share of each global batch, whatever its share of the folder:
at 1:9 and a batch of 32, a random batch holds about three images of the rare class, so most rare
anchors' only positive is their own second view; a balanced one holds 16. The rare classes are dealt
again (with other crops) when they run out. An epoch keeps the random sampler's number of steps, and
like it the batches are a pure function of ``(seed, epoch)``, cut into one slice per process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from supcon.config import SAMPLERS
from supcon.data import EpochBatchSampler
from supcon.errors import UserError

logger = logging.getLogger(__name__)

#: The fewest images a class needs under ``--sampler balanced``: a class of one image would be repeated
#: within every batch, its only positives copies of itself.
MIN_IMAGES_PER_CLASS = 2


def class_shares(global_batch: int, num_classes: int, batch: int) -> list[int]:
    """The images of each class in global batch number ``batch`` (0-based, from the epoch's start).

    Each class gets ``global_batch // num_classes``; the ``r = global_batch % num_classes`` extra images go
    to the classes ``(batch * r + j) % num_classes`` for ``j < r``, so they rotate through the classes
    (over ``num_classes`` batches each class gets ``r`` of them).
    """
    base, extra = divmod(global_batch, num_classes)
    shares = [base] * num_classes
    for j in range(extra):
        shares[(batch * extra + j) % num_classes] += 1
    return shares


class _Deck:
    """One class's images dealt in rounds: each round a new seeded permutation of all of them."""

    def __init__(self, members: np.ndarray, rng: np.random.Generator):
        self.members, self.rng = members, rng
        self.cards: list[int] = []
        self.position = 0

    def deal(self, count: int) -> list[int]:
        """The next ``count`` images; a class of at least ``count`` images repeats none within the hand."""
        hand: list[int] = []
        while len(hand) < count:
            if self.position == len(self.cards):
                cards = self.rng.permutation(self.members).tolist()
                in_hand = set(hand)  # already in this batch: to the back of the new round
                self.cards = [c for c in cards if c not in in_hand] + [c for c in cards if c in in_hand]
                self.position = 0
            take = min(count - len(hand), len(self.cards) - self.position)
            hand.extend(self.cards[self.position:self.position + take])
            self.position += take
        return hand


def balanced_epoch(members: Sequence[np.ndarray], num_batches: int, global_batch: int, seed: int,
                   epoch: int) -> list[list[tuple[int, ...]]]:
    """The class-balanced global batches of an epoch, a pure function of their arguments.

    Args:
        members: the dataset indices of each class.
        num_batches: global batches in the epoch.
        global_batch: images per global batch; each class's count is :func:`class_shares`'.
        seed, epoch: seed the permutations (``numpy.random.default_rng([seed, epoch])``).

    Returns:
        Per batch, its keys in a seeded order that mixes the classes (so every process's slice holds
        several): ``(index, epoch)`` for an image's first draw in the epoch, ``(index, epoch, draw)`` for
        its repeats (``draw`` 1, 2, ...: other crops, see :func:`supcon.data.sample_seed`).
    """
    rng = np.random.default_rng([seed, epoch])
    decks = [_Deck(np.asarray(m), rng) for m in members]
    draws: dict[int, int] = {}
    batches = []
    for b in range(num_batches):
        shares = class_shares(global_batch, len(decks), b)
        indices = [i for deck, share in zip(decks, shares) for i in deck.deal(share)]
        batch = []
        for position in rng.permutation(len(indices)).tolist():
            index = indices[position]
            draw = draws.get(index, 0)
            draws[index] = draw + 1
            batch.append((index, epoch) if draw == 0 else (index, epoch, draw))
        batches.append(batch)
    return batches


class BalancedBatchSampler(EpochBatchSampler):
    """Class-balanced batches (:func:`balanced_epoch`), sliced over the processes as the random sampler's are.

    Args:
        labels: the label of every dataset index; every class present must have at least one image
            (:func:`check_balanced_classes` asks for two).
        batch_size, seed, rank, world_size: as :class:`supcon.data.EpochBatchSampler`'s.
    """

    def __init__(self, labels: Sequence[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(len(labels), batch_size, seed, rank, world_size)
        label_array = np.asarray(labels)
        self.members = [np.flatnonzero(label_array == label) for label in np.unique(label_array)]

    def global_batches(self) -> Iterator[list[tuple[int, ...]]]:
        """The epoch's balanced global batches from ``start_batch`` on (the draw counts start at batch 0)."""
        batches = balanced_epoch(self.members, self.num_samples // self.global_batch, self.global_batch, self.seed,
                                 self.epoch)
        yield from batches[self.start_batch:]


def make_batch_sampler(kind: str, labels: Sequence[int], batch_size: int, seed: int, rank: int = 0,
                       world_size: int = 1) -> EpochBatchSampler:
    """The training batch sampler of ``--sampler kind`` (``random`` or ``balanced``).

    Raises:
        UserError: an unknown kind.
    """
    if kind == "random":
        return EpochBatchSampler(len(labels), batch_size, seed, rank, world_size)
    if kind == "balanced":
        return BalancedBatchSampler(labels, batch_size, seed, rank, world_size)
    raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {kind!r}")


def check_balanced_classes(classes: Sequence[str], labels: Sequence[int], global_batch: int,
                           where: str = "data folder") -> str | None:
    """Refuse a folder ``--sampler balanced`` cannot balance; say when some classes will repeat within a batch.

    Args:
        classes: the class names (label order).
        labels: the label of every training image.
        global_batch: images per global batch.
        where: how to name the images in the message (``data folder``, ``training part``).

    Returns:
        A warning naming the classes with fewer images than their share of a global batch (each batch
        then repeats some of their images, with other crops), or None.

    Raises:
        UserError: a class has fewer than :data:`MIN_IMAGES_PER_CLASS` images.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    for name, count in zip(classes, counts.tolist()):
        if count < MIN_IMAGES_PER_CLASS:
            raise UserError(
                f"--sampler balanced needs at least {MIN_IMAGES_PER_CLASS} images in every class: class {name!r} of "
                f"the {where} has {count} image{'' if count == 1 else 's'}, so a balanced batch would repeat it within "
                "every batch (its only positives copies of itself); add images of it, or use --sampler random")
    share = -(-global_batch // len(classes))
    few = [f"{name} ({count})" for name, count in zip(classes, counts.tolist()) if count < share]
    if not few:
        return None
    return (f"--sampler balanced: {', '.join(few)} hold fewer images than their share of a global batch ({share}); "
            "each batch repeats some of their images, with other crops")
