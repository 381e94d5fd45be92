"""Identity-balanced distributed batch sampler.

Each rank's batch is `R` random samples followed by `P` identities x `K` images and, with unlabelled images in the
dataset (negative labels), `U` of those: `R + P*K + U = batch_size` on every rank and every step (arcface_torch asserts
a fixed per-rank batch). An epoch is one pass of the labelled images; the unlabelled ones cycle through their own
permutation. The random part is a seeded permutation of the whole
dataset per epoch, split across ranks and steps like `DistributedSampler`, so it covers every sample once per epoch
(the last global step wraps around to the start of the permutation). The balanced part gives every batch positive
pairs, which EKD needs. Batches are pure functions of (seed, epoch, step, rank), so resuming from (epoch, position)
is exact. Items are `(index, flip)` pairs: the horizontal flip is decided here, seeded, so a teacher-embedding cache
can be keyed by them. Random draws depend on global positions (not on the rank), so W ranks with batch B draw,
together, what one process with batch W x B draws (the random parts in the same order, the P x K groups too).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from kd_plugin.distributed import get_rank, get_world_size


class IdentityBalancedBatchSampler(torch.utils.data.Sampler):
    """Yields per-rank batches of `(index, flip)`; use as `DataLoader(dataset, batch_sampler=...)`."""

    def __init__(self, labels: Sequence[int], batch_size: int, identities_per_batch: int = 0,
                 images_per_identity: int = 4, seed: int = 2048, rank: int | None = None,
                 world_size: int | None = None, flip: bool = True, unlabeled_per_batch: int = 0) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.num_identities = int(identities_per_batch)
        self.images_per_identity = int(images_per_identity)
        self.unlabeled_size = int(unlabeled_per_batch)
        self.random_size = self.batch_size - self.num_identities * self.images_per_identity - self.unlabeled_size
        self._labeled = np.flatnonzero(self.labels >= 0)  # negative labels: images without identity
        self._unlabeled = np.flatnonzero(self.labels < 0)
        self.seed = int(seed)
        self.rank = get_rank() if rank is None else int(rank)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        self.flip = flip
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, position) from load_state_dict, used once
        self._orders: tuple[int, np.ndarray, np.ndarray] | None = None
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.random_size < 0 or self.batch_size <= 0:
            raise ValueError(f"batch_size {batch_size} must be positive and at least identities_per_batch x "
                             f"images_per_identity + unlabeled_per_batch = {self.num_identities} x "
                             f"{self.images_per_identity} + {self.unlabeled_size}")
        if len(self._labeled) == 0:
            raise ValueError("the sampler got no labelled image")
        if self.unlabeled_size and not len(self._unlabeled):
            raise ValueError(f"unlabeled_per_batch={self.unlabeled_size} but the dataset has no unlabelled image")
        order = np.argsort(self.labels, kind="stable")
        classes, starts, counts = np.unique(self.labels[order], return_index=True, return_counts=True)
        self._members = order
        eligible = (counts >= 2) & (classes >= 0)  # an identity with one image gives no positive pair
        self._id_start, self._id_count = starts[eligible], counts[eligible]
        if self.num_identities:
            if self.images_per_identity < 2:
                raise ValueError(f"images_per_identity must be >= 2 to form positive pairs, got {images_per_identity}")
            if len(self._id_count) < self.num_identities:
                raise ValueError(f"identities_per_batch={self.num_identities} but only {len(self._id_count)} "
                                 f"identities have 2 or more images; lower identities_per_batch")
        per_step = self.world_size * (self.random_size or self.num_identities * self.images_per_identity)
        self.steps_per_epoch = math.ceil(len(self._labeled) / per_step)

    def _start(self) -> int:
        return self._resume[1] if self._resume and self._resume[0] == self.epoch else 0

    def __len__(self) -> int:
        return self.steps_per_epoch - self._start()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (as `DistributedSampler.set_epoch`); a loaded resume position applies to its own epoch."""
        self.epoch = int(epoch)

    def state_dict(self, position: int = 0) -> dict[str, int]:
        """The resumable state: the epoch and the number of its batches already consumed (`position`)."""
        return {"epoch": self.epoch, "position": int(position), "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next iteration over `epoch` yields its batches `position ..` (also after `set_epoch(epoch)`)."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler uses {self.seed}")
        if not 0 <= int(state["position"]) <= self.steps_per_epoch:
            raise ValueError(f"sampler position {state['position']} outside 0..{self.steps_per_epoch}")
        self.epoch = int(state["epoch"])
        self._resume = (self.epoch, int(state["position"]))

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        start, self._resume = self._start(), None
        for step in range(start, self.steps_per_epoch):
            yield self.batch(self.epoch, step)

    def _epoch_orders(self, epoch: int) -> tuple[np.ndarray, ...]:
        """This epoch's permutation of the labelled samples (wrapped to fill every step), the flips of its positions,
        the identity order, and the unlabelled samples' permutation and flips, cached per epoch. Everything is indexed
        by global position, so the union of the ranks' batches at a step is the batch one process with W times the
        batch size would draw."""
        if self._orders is None or self._orders[0] != epoch:
            total = self.steps_per_epoch * self.world_size * self.random_size
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self._labeled))
            samples = np.resize(self._labeled[order], total)
            flips = np.random.default_rng([self.seed, epoch, 2]).random(total) < 0.5
            identities = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self._id_count))
            unlabeled, unlabeled_flips = self._unlabeled[:0], flips[:0]
            if self.unlabeled_size:  # cycles through its own permutation at its own rate
                total = self.steps_per_epoch * self.world_size * self.unlabeled_size
                order = np.random.default_rng([self.seed, epoch, 4]).permutation(len(self._unlabeled))
                unlabeled = np.resize(self._unlabeled[order], total)
                unlabeled_flips = np.random.default_rng([self.seed, epoch, 5]).random(total) < 0.5
            self._orders = (epoch, samples, flips, identities, unlabeled, unlabeled_flips)
        return self._orders[1:]

    def batch(self, epoch: int, step: int) -> list[tuple[int, bool]]:
        """The batch this rank draws at (epoch, step)."""
        samples, flips, id_order, unlabeled, unlabeled_flips = self._epoch_orders(epoch)
        first = (step * self.world_size + self.rank) * self.random_size
        indices = [int(i) for i in samples[first:first + self.random_size]]
        flipped = [bool(f) and self.flip for f in flips[first:first + self.random_size]]
        for p in range(self.num_identities):
            slot = (step * self.world_size + self.rank) * self.num_identities + p  # a global slot number
            rng = np.random.default_rng([self.seed, epoch, 3, slot])
            ident = id_order[slot % len(id_order)]
            start, count = self._id_start[ident], self._id_count[ident]
            k = self.images_per_identity
            picks = rng.permutation(count)[:k]
            if count < k:  # too few images: all of them, then repeats
                picks = np.concatenate([picks, rng.integers(0, count, k - count)])
            indices.extend(int(i) for i in self._members[start + picks])
            flipped.extend(bool(f) and self.flip for f in rng.random(k) < 0.5)
        first = (step * self.world_size + self.rank) * self.unlabeled_size  # last: the unlabelled part
        indices.extend(int(i) for i in unlabeled[first:first + self.unlabeled_size])
        flipped.extend(bool(f) and self.flip for f in unlabeled_flips[first:first + self.unlabeled_size])
        return list(zip(indices, flipped))


def random_part_rows(sizes: list[int], random_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Row numbers, in order, of a gathered global batch that came from the samplers' random parts (each rank's first
    `random_size` rows), for the reference EKD recipe where the margin loss sees only those and EKD the whole batch.
    Built on `device` from the sizes alone: selecting them reads nothing on the host."""
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    return torch.cat([torch.arange(o, o + min(random_size, n), device=device) for o, n in zip(offsets, sizes)])
