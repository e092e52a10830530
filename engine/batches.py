"""Micro-batches for one rank, in a deterministic order that a resumed run continues exactly.

The global order of an epoch is a permutation seeded by (seed, epoch). Rank r takes every
world_size-th sample of it, starting at r, so the samples of one optimizer step across all
ranks are the same set as a single process with `grad_accum * world_size` micro-steps would
see: that is what lets a 2-process FSDP2 run reproduce the single-process loss curve.

A micro-batch whose samples were unreadable is refilled from the following samples, so a batch
always holds `micro_batch_size` usable samples (the trainer counts the bad ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch


class MicroBatches:
    def __init__(
        self,
        dataset: Sequence,
        collate: Callable[[list], dict],
        *,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if len(dataset) < world_size * micro_batch_size:
            raise ValueError(
                f"the training data has {len(dataset)} samples, fewer than one global micro-batch "
                f"({world_size} ranks x micro_batch_size {micro_batch_size})"
            )
        self.dataset, self.collate = dataset, collate
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.per_rank = len(dataset) // world_size  # the tail that does not split evenly is dropped
        self.position = 0  # samples drawn by this rank since training started

    def skip_to(self, position: int) -> None:
        self.position = position

    def _index(self, position: int, order_cache: dict[int, torch.Tensor]) -> int:
        epoch, offset = divmod(position, self.per_rank)
        if epoch not in order_cache:
            order_cache.clear()
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order_cache[epoch] = torch.randperm(len(self.dataset), generator=g)
            else:
                order_cache[epoch] = torch.arange(len(self.dataset))
        return int(order_cache[epoch][offset * self.world_size + self.rank])

    def __iter__(self) -> Iterator[dict]:
        cache: dict[int, torch.Tensor] = {}
        while True:
            good, bad = [], []
            while len(good) < self.micro_batch_size:
                item = self.dataset[self._index(self.position, cache)]
                self.position += 1
                (bad if "bad" in item else good).append(item)
                if len(bad) > 50 * self.micro_batch_size and not good:
                    raise RuntimeError(f"{len(bad)} samples in a row could not be read; last: {bad[-1]['bad']}")
            batch = self.collate(good)
            batch["n_bad"] = len(bad)
            batch["bad"] = [item["bad"] for item in bad]
            yield batch
