import math

import pytest

from pefomed.engine.batches import MicroBatches
from pefomed.engine.config import OptimConfig
from pefomed.engine.trainer import lr_at


class Items:
    """A dataset of labelled indices; indices in `bad` are unreadable."""

    def __init__(self, n, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"bad": f"item{i}.png: unreadable", "index": i} if i in self.bad else {"i": i}


def collate(items):
    return {"ids": [it["i"] for it in items]}


def take(stream, k):
    it = iter(stream)
    return [next(it)["ids"] for _ in range(k)]


def test_two_ranks_see_the_single_process_steps():
    data = Items(40)
    single = take(MicroBatches(data, collate, micro_batch_size=2, seed=3), 8)
    ranks = [take(MicroBatches(data, collate, micro_batch_size=2, seed=3, rank=r, world_size=2), 4) for r in (0, 1)]
    # One optimizer step: single process does 2 micro-steps; two ranks do 1 each.
    for step in range(4):
        single_set = set(single[2 * step]) | set(single[2 * step + 1])
        assert single_set == set(ranks[0][step]) | set(ranks[1][step])


def test_resume_continues_exactly():
    data = Items(23)
    full = take(MicroBatches(data, collate, micro_batch_size=3, seed=5), 12)  # crosses epochs
    first = MicroBatches(data, collate, micro_batch_size=3, seed=5)
    head = take(first, 5)
    resumed = MicroBatches(data, collate, micro_batch_size=3, seed=5)
    resumed.skip_to(first.position)
    assert head + take(resumed, 7) == full


def test_epochs_are_permutations_and_differ():
    data = Items(12)
    batches = take(MicroBatches(data, collate, micro_batch_size=4, seed=1), 6)
    epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1


def test_bad_samples_are_refilled_and_counted():
    data = Items(10, bad={0, 1, 2, 3, 4, 5, 6, 7, 8})
    stream = iter(MicroBatches(data, collate, micro_batch_size=1, seed=0, shuffle=False))
    batch = next(stream)
    assert batch["ids"] == [9] and batch["n_bad"] == 9 and "item0.png" in batch["bad"][0]


def test_warmup_then_cosine():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    mid = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5))
    assert lr_at(60, cfg, 110) == pytest.approx(mid)
    assert lr_at(110, cfg, 110) == pytest.approx(1e-5)
    assert lr_at(500, cfg, 110) == pytest.approx(1e-5)


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="fewer than one global micro-batch"):
        MicroBatches(Items(3), collate, micro_batch_size=2, seed=0, world_size=2)
