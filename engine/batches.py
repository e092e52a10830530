"""Micro-batches for one rank, in a deterministic order that a resumed run continues exactly.

The global order is one endless stream, the same at every world size: epoch e is a permutation
of the dataset seeded by (seed, e), and the epochs follow one another with nothing dropped. Rank
r of W takes the stream's samples r, r + W, r + 2W, ..., so the samples of one optimizer step
across all ranks are the same set as a single process with `grad_accum * world_size`
micro-steps would see: that is what lets a 2-process FSDP2 run reproduce the single-process loss
curve, and what lets a checkpoint taken at one world size resume at another
(`reshard_positions`).

`position` counts the samples this rank has taken from that stream; it is all a resumed run
needs (`skip_to`). A micro-batch whose samples were unreadable is refilled from the following
samples, so a batch always holds `micro_batch_size` usable samples and reports the bad ones in
`n_bad` and `bad` (the trainer counts them against `data.max_bad_fraction`). When
`50 * micro_batch_size` samples in a row are bad the batch is given up: it is yielded with
`starved: True` and no tensors, so that the trainer stops every rank together instead of one
rank raising while the others wait in a collective.

With `num_workers > 0` the samples are read and decoded in that many worker processes (a
`torch.utils.data.DataLoader` over the same position-ordered index stream, which keeps order
and prefetches `prefetch_factor` samples per worker). Batching, refill and `position` stay in
this process and count consumed samples only, so the batches, their order and the resume
position are exactly those of `num_workers=0`. The workers' seed comes from a generator of
their own: starting them does not draw from the global RNG that dropout uses. With `pin_memory`
(training on CUDA) each batch's tensors are page-locked, so that the trainer's
`.to(device, non_blocking=True)` returns at once and the copy overlaps the previous step.

Each item is read as drawn in its epoch of the stream: a dataset with `set_epoch` (random
augmentation, prompt variants) is told the epoch before the item is read, in the workers too
(they hold copies of the dataset), so epoch e + 1 draws other crops and prompts than epoch e,
and a resumed run draws the same ones again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import torch

from pefomed.errors import UserError

STARVED_AFTER = 50  # micro-batches' worth of bad samples in a row before a batch is given up


class TooFewSamples(UserError, ValueError):
    """The training data cannot fill one micro-batch on every rank."""


def _as_is(item):
    return item


class _PositionIndices(torch.utils.data.Sampler[tuple[int, int]]):
    """`(dataset index, epoch)` at each position from `start` on, endlessly (for the DataLoader)."""

    def __init__(self, draw_at: Callable[[int, dict], tuple[int, int]], start: int) -> None:
        self.draw_at, self.start = draw_at, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        cache: dict[int, torch.Tensor] = {}
        for position in itertools.count(self.start):
            yield self.draw_at(position, cache)


class _InEpoch(torch.utils.data.Dataset):
    """`dataset[(index, epoch)]`: the item as its epoch draws it (`set_epoch` first, when it has one)."""

    def __init__(self, dataset: Sequence) -> None:
        self.dataset = dataset
        self.set_epoch = getattr(dataset, "set_epoch", None)
        self.epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        if self.set_epoch is not None and epoch != self.epoch:
            self.set_epoch(epoch)
            self.epoch = epoch
        return self.dataset[index]


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
        num_workers: int = 0,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
    ) -> None:
        if len(dataset) < world_size * micro_batch_size:
            raise TooFewSamples(
                f"the training data has {len(dataset)} samples, fewer than one global micro-batch "
                f"({world_size} ranks x micro_batch_size {micro_batch_size}); add data (data.train) or "
                "lower train.micro_batch_size"
            )
        if num_workers < 0:
            raise ValueError(
                f"num_workers={num_workers}: use 0 (read in this process) or more workers (data.num_workers)"
            )
        self.dataset, self.collate = dataset, collate
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.pin_memory = pin_memory
        self.position = 0  # samples drawn by this rank since training started

    def skip_to(self, position: int) -> None:
        self.position = position

    def index_at(self, position: int, order_cache: dict[int, torch.Tensor] | None = None) -> int:
        """The dataset index that this rank draws at `position` (pass a dict to reuse the epoch's order)."""
        return self.draw_at(position, order_cache)[0]

    def draw_at(self, position: int, order_cache: dict[int, torch.Tensor] | None = None) -> tuple[int, int]:
        """`(dataset index, epoch)` of this rank's draw at `position`."""
        order_cache = {} if order_cache is None else order_cache
        epoch, offset = divmod(position * self.world_size + self.rank, len(self.dataset))
        if epoch not in order_cache:
            order_cache.clear()
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order_cache[epoch] = torch.randperm(len(self.dataset), generator=g)
            else:
                order_cache[epoch] = torch.arange(len(self.dataset))
        return int(order_cache[epoch][offset]), epoch

    def _items(self, start: int) -> Iterator[dict]:
        """The dataset's items at positions start, start + 1, ... in order."""
        in_epoch = _InEpoch(self.dataset)
        if self.num_workers == 0:
            cache: dict[int, torch.Tensor] = {}
            for position in itertools.count(start):
                yield in_epoch[self.draw_at(position, cache)]
        loader = torch.utils.data.DataLoader(
            in_epoch,
            batch_size=None,
            sampler=_PositionIndices(self.draw_at, start),
            num_workers=self.num_workers,
            collate_fn=_as_is,
            prefetch_factor=self.prefetch_factor,
            generator=torch.Generator().manual_seed(self.seed * 100_003 + self.rank),
        )
        yield from loader

    def __iter__(self) -> Iterator[dict]:
        items = self._items(self.position)
        try:
            while True:
                good, bad, bad_in_a_row = [], [], 0
                while len(good) < self.micro_batch_size and bad_in_a_row < STARVED_AFTER * self.micro_batch_size:
                    item = next(items)
                    self.position += 1
                    if "bad" in item:
                        bad.append(item)
                        bad_in_a_row += 1
                    else:
                        good.append(item)
                        bad_in_a_row = 0
                if len(good) < self.micro_batch_size:
                    yield {"n_bad": len(bad), "bad": [item["bad"] for item in bad], "starved": True}
                    continue
                batch = self.collate(good)
                if self.pin_memory:  # so that the trainer's non_blocking copy to the GPU overlaps compute
                    batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
                batch["n_bad"] = len(bad)
                batch["bad"] = [item["bad"] for item in bad]
                yield batch
        finally:
            items.close()  # stops the DataLoader's workers


class CannotReshard(UserError, ValueError):
    """Saved data positions that cannot be split over another world size without changing the order."""


def reshard_positions(positions: list[int], world_size: int) -> list[int]:
    """Each new rank's position in the same global stream, for a run resumed at `world_size`.

    The saved ranks have drawn the stream's first `sum(positions)` samples when they all stand at
    the same position; the new ranks continue right after them, which needs that count to divide
    by the new world size. Otherwise (a rank skipped bad samples and drew more, or the count does
    not divide) the order cannot continue exactly and this raises `CannotReshard`.
    """
    if len(set(positions)) != 1:
        raise CannotReshard(
            f"the ranks stopped at different places in the data order {positions} (a rank that met "
            "unreadable samples draws further to refill its batches), so the samples left do not split "
            "over another number of ranks in the saved order"
        )
    drawn = positions[0] * len(positions)
    if drawn % world_size:
        raise CannotReshard(
            f"the ranks have drawn {drawn} samples of the data order together, which {world_size} ranks cannot "
            "continue from evenly"
        )
    return [drawn // world_size] * world_size
