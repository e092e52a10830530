"""A rank-sharded sampler that a resumed run continues at the exact next sample.

Each epoch's order is the one `torch.utils.data.DistributedSampler` gives: a permutation from a
`torch.Generator` seeded with `seed + epoch` (or 0..n-1 without shuffling), then either cut to a
multiple of `world_size` (`drop_last=True`) or padded by repeating its head, and rank r takes
positions r, r + world_size, ... of it. On top of that the sampler remembers where it is: `epoch`
and `position` (how many of this rank's indices of that epoch were handed out), saved by
`state_dict()` and restored by `load_state_dict()`, so that rebuilding it from the same
arguments and loading the state yields exactly the indices that had not been drawn yet.

Iterating gives the rest of the current epoch, then moves to the next epoch with position 0.
With a DataLoader that prefetches (workers, pin_memory), the sampler runs ahead of training:
the trainer should then save the count of samples it consumed and restore it with
`set_position(epoch, position)` rather than saving `state_dict()` as it is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


class ResumableSampler(torch.utils.data.Sampler[int]):
    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if n < 1:
            raise ValueError(f"n={n}: the sampler needs at least one sample")
        if drop_last and n < world_size:
            raise ValueError(f"n={n} samples with drop_last cannot give each of {world_size} ranks one sample")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """This rank's samples per epoch."""
        return self.per_rank

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's whole order for `epoch` (the same as DistributedSampler after set_epoch)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        if total <= len(order):
            order = order[:total]
        else:
            repeats = math.ceil((total - len(order)) / len(order))
            order = order + (order * repeats)[: total - len(order)]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        # A consumer that stopped right after an epoch's last index never resumed the generator
        # past it: roll over here, or the next iteration would be an empty epoch.
        self.set_position(self.epoch, self.position)
        indices = self.epoch_indices(self.epoch)
        while self.position < len(indices):
            index = indices[self.position]
            self.position += 1
            yield index
        self.epoch, self.position = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (DistributedSampler's method, same meaning)."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, position: int) -> None:
        """Continue at this rank's `position`-th index of `epoch`; a position at or past the
        end of the epoch rolls over into the following epochs."""
        if epoch < 0 or position < 0:
            raise ValueError(f"epoch {epoch} and position {position} must be >= 0")
        extra_epochs, position = divmod(position, self.per_rank)
        self.epoch, self.position = epoch + extra_epochs, position

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "world_size": self.world_size, "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Restore (epoch, position); the saved order's arguments must match this sampler's."""
        for key in ("seed", "n", "world_size", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r} but this sampler has {key}={getattr(self, key)!r}: "
                    "the saved position would point into a different order (resume with the same data and world size)"
                )
        self.set_position(int(state["epoch"]), int(state["position"]))
