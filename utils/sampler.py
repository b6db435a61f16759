"""An endless, resumable, rank-sharded sampler for training (SPEC §6: one run = ``max_iters`` steps, not epochs)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class InfiniteSampler(Sampler):
    """Yields ``(index, seed)`` pairs forever.

    Each epoch is a permutation drawn from ``seed + epoch`` (identical on every rank), padded to a multiple of the
    world size and sharded ``perm[rank::world]``, so ranks see disjoint images. The per-sample ``seed`` drives that
    sample's CPU augmentation, which therefore does not depend on DataLoader workers: a run resumed with ``start``
    (samples already consumed by this rank) sees exactly the images and crops it would have seen.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.rank, self.world_size, self.seed, self.start = size, rank, world_size, seed, start

    def per_rank(self) -> int:
        return -(-self.size // self.world_size)  # ceil

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_rank = self.per_rank()
        epoch, offset = divmod(self.start, per_rank)
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.size, generator=generator)
            perm = torch.cat([perm, perm[: per_rank * self.world_size - self.size]])  # pad by wrapping
            shard = perm[self.rank :: self.world_size].tolist()
            seeds = torch.randint(0, 2**31 - 1, (len(perm),), generator=generator)[self.rank :: self.world_size]
            for position in range(offset, per_rank):
                yield shard[position], int(seeds[position])
            epoch, offset = epoch + 1, 0
