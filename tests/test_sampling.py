"""The training batches of --sampler: the random sampler unchanged, the balanced one's shares, repeats,
determinism, resumption and sharding, and the folders it refuses."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from supcon.data import EpochBatchSampler, MultiViewDataset, scan_image_folder, two_view_augmentation
from supcon.errors import UserError
from supcon.sampling import (
    BalancedBatchSampler,
    check_balanced_classes,
    class_shares,
    make_batch_sampler,
)

#: A 1:9 folder of 40 images: 4 of the rare class (label 0), 36 of the common one (label 1).
RARE, COMMON = 4, 36
LABELS_1_TO_9 = [0] * RARE + [1] * COMMON


def batches_of(sampler: EpochBatchSampler, epoch: int, start: int = 0) -> list[list[tuple[int, ...]]]:
    sampler.set_epoch(epoch, start)
    return list(sampler)


def class_counts(batch, labels) -> Counter:
    return Counter(labels[key[0]] for key in batch)


def reference_random_batches(num_samples, batch_size, seed, epoch, rank=0, world_size=1, start_batch=0):
    """EpochBatchSampler.__iter__ as it was before --sampler existed: the random sampler must stay bit for bit."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=generator).tolist()
    global_batch = batch_size * world_size
    for b in range(start_batch, num_samples // global_batch):
        start = b * global_batch + rank * batch_size
        yield [(i, epoch) for i in order[start:start + batch_size]]


@pytest.mark.parametrize("num_samples, batch_size, seed, epoch, rank, world_size, start", [
    (50, 8, 3, 0, 0, 1, 0), (50, 4, 3, 5, 1, 2, 2), (37, 5, 0, 2, 2, 3, 1), (40, 8, 11, 7, 0, 1, 4)])
def test_the_random_sampler_gives_the_batches_it_gave_before(num_samples, batch_size, seed, epoch, rank, world_size,
                                                             start):
    sampler = make_batch_sampler("random", [0] * num_samples, batch_size, seed, rank, world_size)
    assert type(sampler) is EpochBatchSampler
    assert batches_of(sampler, epoch, start) == list(
        reference_random_batches(num_samples, batch_size, seed, epoch, rank, world_size, start))


@pytest.mark.parametrize("labels, batch_size", [
    (LABELS_1_TO_9, 8),  # 4 + 4
    (LABELS_1_TO_9, 7),  # 3 or 4 of each
    ([0] * 3 + [1] * 5 + [2] * 30, 8),  # 3 classes: 2 each, 2 extra
    ([0] * 2 + [1] * 2 + [2] * 2 + [3] * 34, 6),  # 4 classes: 1 each, 2 extra
])
def test_balanced_batches_hold_each_class_within_one_image_of_its_share(labels, batch_size):
    num_classes = len(set(labels))
    sampler = BalancedBatchSampler(labels, batch_size, seed=0)
    random = EpochBatchSampler(len(labels), batch_size, seed=0)
    for epoch in (0, 3):
        batches = batches_of(sampler, epoch)
        assert len(batches) == len(batches_of(random, epoch)) == len(labels) // batch_size
        totals = Counter()
        for b, batch in enumerate(batches):
            counts = class_counts(batch, labels)
            assert len(batch) == batch_size
            assert all(abs(counts[c] - batch_size / num_classes) < 1 for c in range(num_classes)), (b, counts)
            assert [counts[c] for c in range(num_classes)] == class_shares(batch_size, num_classes, b)
            totals.update(counts)
        # the extra images rotate through the classes: over the epoch no class gets more than one image more
        assert max(totals.values()) - min(totals.values()) <= 1


def test_class_shares_rotate_the_extra_images_through_the_classes():
    assert class_shares(8, 2, 0) == [4, 4]
    assert [class_shares(7, 3, b) for b in range(3)] == [[3, 2, 2], [2, 3, 2], [2, 2, 3]]
    assert [class_shares(8, 3, b) for b in range(3)] == [[3, 3, 2], [3, 2, 3], [2, 3, 3]]
    assert class_shares(2, 3, 0) == [1, 1, 0]  # fewer images than classes: some sit a batch out


def test_common_images_are_seen_at_most_once_an_epoch_while_the_rare_ones_repeat_with_other_draws():
    sampler = BalancedBatchSampler(LABELS_1_TO_9, 8, seed=1)
    for epoch in (0, 1, 2):
        batches = batches_of(sampler, epoch)
        keys = [key for batch in batches for key in batch]
        seen = Counter(key[0] for key in keys)
        assert all(seen[i] <= 1 for i in range(RARE, RARE + COMMON))
        assert sum(seen[i] for i in range(RARE, RARE + COMMON)) == 20  # half of the epoch's 40 images
        assert [seen[i] for i in range(RARE)] == [5] * RARE  # 20 rare places, 4 rare images: 5 times each
        for batch in batches:  # a class of at least its share of images repeats none within a batch
            assert len({key[0] for key in batch}) == len(batch)
        # each repeat is keyed by its draw (other crops), the first draw as the random sampler keys it
        draws = {}
        for key in keys:
            index = key[0]
            assert key[1] == epoch
            assert key == ((index, epoch) if index not in draws else (index, epoch, draws[index] + 1))
            draws[index] = draws.get(index, -1) + 1


def test_the_balanced_batches_are_a_function_of_seed_and_epoch_and_resume_mid_epoch():
    def batches(seed, epoch, start=0):
        return batches_of(BalancedBatchSampler(LABELS_1_TO_9, 8, seed=seed), epoch, start)

    assert batches(0, 1) == batches(0, 1)
    assert batches(0, 1) != batches(0, 2)
    assert batches(0, 1) != batches(1, 1)
    assert batches(0, 1, start=3) == batches(0, 1)[3:]  # the repeats keep their draw numbers
    sampler = BalancedBatchSampler(LABELS_1_TO_9, 8, seed=0)
    sampler.set_epoch(1, 3)
    assert len(sampler) == 2


def test_the_balanced_batches_are_sharded_over_processes_as_the_random_ones():
    labels = [0] * 6 + [1] * 10 + [2] * 34
    single = BalancedBatchSampler(labels, batch_size=8, seed=3)
    ranks = [BalancedBatchSampler(labels, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 5):
        single_batches = batches_of(single, epoch)
        rank_batches = [batches_of(sampler, epoch) for sampler in ranks]
        assert len(single_batches) == len(rank_batches[0]) == len(rank_batches[1]) == 50 // 8
        for b, batch in enumerate(single_batches):
            assert batch == rank_batches[0][b] + rank_batches[1][b]
        # the classes are mixed within the global batch, so a process's slice is not one class
        assert any(len(class_counts(batch, labels)) > 1 for batch in rank_batches[0])


def test_a_repeated_image_gets_other_crops_and_its_first_draw_the_usual_ones(train_folder):
    samples = scan_image_folder(train_folder).samples[:4]
    dataset = MultiViewDataset(samples, two_view_augmentation(24, [0.5] * 3, [0.25] * 3), n_views=2, seed=0)
    first = dataset[(2, 1)][0]
    assert torch.equal(dataset[(2, 1, 0)][0], first)
    again = dataset[(2, 1, 1)][0]
    assert not torch.equal(again, first)
    assert torch.equal(dataset[(2, 1, 1)][0], again)  # still a function of (seed, epoch, index, draw)
    assert not torch.equal(dataset[(2, 1, 2)][0], again)


def test_a_class_of_one_image_is_refused_naming_it():
    with pytest.raises(UserError) as refused:
        check_balanced_classes(["benign", "malignant"], [0] * 9 + [1], global_batch=8)
    assert str(refused.value) == (
        "--sampler balanced needs at least 2 images in every class: class 'malignant' of the data folder has 1 "
        "image, so a balanced batch would repeat it within every batch (its only positives copies of itself); add "
        "images of it, or use --sampler random")
    with pytest.raises(UserError, match="class 'b' of the training part has 0 images"):
        check_balanced_classes(["a", "b"], [0, 0, 0], global_batch=2, where="training part")


def test_classes_smaller_than_their_share_of_a_batch_are_named_in_a_warning():
    assert check_balanced_classes(["a", "b"], LABELS_1_TO_9, global_batch=8) is None  # 4 rare images, share 4
    warning = check_balanced_classes(["a", "b", "c"], [0] * 2 + [1] * 3 + [2] * 30, global_batch=10)
    assert warning == ("--sampler balanced: a (2), b (3) hold fewer images than their share of a global batch (4); "
                       "each batch repeats some of their images, with other crops")


def test_an_unknown_sampler_is_refused():
    with pytest.raises(UserError, match="--sampler must be one of random, balanced, got 'per-class:4'"):
        make_batch_sampler("per-class:4", [0, 1], 2, 0)
