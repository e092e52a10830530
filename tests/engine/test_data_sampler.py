"""ResumableSampler: DistributedSampler's order, exact resume mid-epoch and across epochs, rank partition."""

from itertools import islice

import pytest
import torch
from torch.utils.data import DistributedSampler

from pefomed.engine.data.sampler import ResumableSampler


def reference(n, seed, shuffle, rank, world_size, drop_last, epoch):
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("n,world_size,drop_last", [(17, 1, False), (17, 3, False), (17, 3, True), (4, 3, False), (18, 3, True)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_each_epoch_is_distributed_samplers_order(n, world_size, drop_last, shuffle):
    for rank in range(world_size):
        sampler = ResumableSampler(n, seed=5, shuffle=shuffle, rank=rank, world_size=world_size, drop_last=drop_last)
        for epoch in range(3):
            expected = reference(n, 5, shuffle, rank, world_size, drop_last, epoch)
            assert list(sampler) == expected and len(sampler) == len(expected)
        assert sampler.epoch == 3


def stream(sampler, count):
    """`count` indices across epoch boundaries, as a training loop draws them."""
    out = []
    while len(out) < count:
        out += list(islice(iter(sampler), count - len(out)))
    return out


@pytest.mark.parametrize("consumed", [0, 1, 6, 7, 13, 14, 30])
def test_resume_continues_at_the_exact_next_sample(consumed):
    n, total = 13, 45
    full = stream(ResumableSampler(n, seed=2, rank=1, world_size=2), total)
    first = ResumableSampler(n, seed=2, rank=1, world_size=2)
    head = stream(first, consumed)
    state = first.state_dict()
    assert state["epoch"] * len(first) + state["position"] == consumed
    resumed = ResumableSampler(n, seed=2, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert head + stream(resumed, total - consumed) == full


def test_stopping_at_an_epoch_end_does_not_give_an_empty_epoch():
    sampler = ResumableSampler(6, seed=3)
    assert list(islice(iter(sampler), 6)) == reference(6, 3, True, 0, 1, False, 0)
    assert list(sampler) == reference(6, 3, True, 0, 1, False, 1)


def test_set_position_rolls_over_epochs():
    sampler = ResumableSampler(10, seed=0)
    sampler.set_position(1, 23)
    assert (sampler.epoch, sampler.position) == (3, 3)
    assert list(sampler) == reference(10, 0, True, 0, 1, False, 3)[3:]
    sampler.set_epoch(7)
    assert list(sampler) == reference(10, 0, True, 0, 1, False, 7)


def test_two_ranks_partition_the_data():
    a = ResumableSampler(20, seed=9, rank=0, world_size=2)
    b = ResumableSampler(20, seed=9, rank=1, world_size=2)
    first, second = list(a), list(b)
    assert set(first).isdisjoint(second) and sorted(first + second) == list(range(20))
    assert list(a) != first  # the next epoch is another permutation
    assert sorted(list(b) + ResumableSampler(20, seed=9, rank=0, world_size=2).epoch_indices(1)) == list(range(20))


def test_works_as_a_dataloader_sampler():
    data = torch.arange(100, 112)
    sampler = ResumableSampler(len(data), seed=1)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    batches = [b.tolist() for b in loader]
    assert sum(batches, []) == [100 + i for i in reference(12, 1, True, 0, 1, False, 0)]


def test_bad_arguments_and_mismatched_state():
    with pytest.raises(ValueError, match="rank 2 is not in"):
        ResumableSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="cannot give each of 4 ranks"):
        ResumableSampler(3, world_size=4, drop_last=True)
    state = ResumableSampler(10, seed=1, world_size=2).state_dict()
    with pytest.raises(ValueError, match="saved with world_size=2 but this sampler has world_size=1"):
        ResumableSampler(10, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with n=10"):
        ResumableSampler(11, seed=1, world_size=2).load_state_dict(state)
