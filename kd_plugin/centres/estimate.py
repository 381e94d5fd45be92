"""Class centres estimated from a teacher's embeddings, for teachers released without a classifier.

Per class: the mean of the L2-normalised teacher embeddings of every image and of its horizontal flip (each normalised
on its own), then L2-normalised. Each rank holds only its own class range (`class_range`, as the head shards it):
under torchrun every rank embeds its share of the images and sends each row, in one all_to_all per round, to the rank
that owns its class, which sums it in float32 — so a rank's memory grows with C/W, never with C. From a teacher cache
a rank reads just the cached rows of its own classes and needs no communication."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kd_plugin.data.datasets import FaceDataset
from kd_plugin.distributed import (
    all_reduce_,
    class_owners,
    class_range,
    collective_device,
    gather_no_grad,
    get_rank,
    get_world_size,
    is_distributed,
)
from kd_plugin.embeddings import embed_pairs, embedding_width
from kd_plugin.errors import KDPluginError
from kd_plugin.teachers.classifier import ClassSlice



class ClassSums:
    """Float32 sums and counts of unit embeddings for this rank's class range. `add` is collective under torchrun
    (every rank calls it the same number of times, with rows of any classes, possibly none) unless `own=True` (the
    rows are all of this rank's classes); `centres` is collective."""

    def __init__(self, num_classes: int, dim: int, rank: int | None = None, world_size: int | None = None) -> None:
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.rank = get_rank() if rank is None else rank
        self.world = get_world_size() if world_size is None else world_size
        self.start, self.count = class_range(self.num_classes, self.rank, self.world)
        self.sums = torch.zeros(self.count, self.dim)
        self.counts = torch.zeros(self.count, dtype=torch.float64)

    def add(self, labels: torch.Tensor, rows: torch.Tensor, weight: float = 1.0, own: bool = False) -> None:
        """Add `rows` (each standing for `weight` embeddings) to their classes, wherever those live."""
        labels, rows = labels.reshape(-1).long(), rows.float().reshape(-1, self.dim)
        if self.world > 1 and not own:
            labels, rows = self._to_owners(labels, rows)
        local = labels.cpu() - self.start
        self.sums.index_add_(0, local, rows.cpu())
        self.counts.index_add_(0, local, torch.full((len(local),), float(weight), dtype=torch.float64))

    def add_with_flips(self, labels: torch.Tensor, plain: torch.Tensor, flipped: torch.Tensor,
                       own: bool = False) -> None:
        """Add the embeddings of images and of their flips, each L2-normalised: one row per image, worth two."""
        self.add(labels, F.normalize(plain.float(), dim=1) + F.normalize(flipped.float(), dim=1), weight=2.0, own=own)

    def _to_owners(self, labels: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One all_to_all: every row goes to the rank that owns its class; returns the rows this rank received."""
        device = collective_device()
        owners = class_owners(labels, self.num_classes, self.world)
        order = torch.argsort(owners, stable=True)
        send = torch.bincount(owners, minlength=self.world).to(device)
        receive = torch.empty_like(send)
        dist.all_to_all_single(receive, send)
        send, receive = send.tolist(), receive.tolist()
        got_labels = torch.empty(sum(receive), dtype=torch.int64, device=device)
        got_rows = torch.empty(sum(receive), self.dim, device=device)
        dist.all_to_all_single(got_labels, labels[order].to(device), receive, send)
        dist.all_to_all_single(got_rows, rows[order].to(device), receive, send)
        return got_labels, got_rows

    def centres(self, source: str) -> ClassSlice:
        """This rank's unit-norm class means (normalised in place); every class in 0..C-1 must have a row."""
        empty = torch.nonzero(self.counts == 0).squeeze(1)
        found = torch.tensor([float(len(empty)), float(self.start + empty[0]) if len(empty) else float("inf")])
        device = collective_device()
        total, first = all_reduce_(found[:1].to(device)), all_reduce_(found[1:].to(device), "min")
        if int(total.item()):
            raise KDPluginError(f"{source}: {int(total.item())} classes have no image (first: class "
                                f"{int(first.item())}); a centre cannot be estimated for them. Relabel the dataset so "
                                f"classes are 0..C-1 without gaps")
        self.sums /= self.counts[:, None].float()
        return ClassSlice(self.start, F.normalize(self.sums, dim=1, out=self.sums))


def estimate_class_slice(embedder, dataset: FaceDataset, batch_size: int = 256, progress: bool = True) -> ClassSlice:
    """This rank's rows of the (num_classes, d) unit-norm centre matrix; runs on every rank of a process group."""
    rank, world = get_rank(), get_world_size()
    labeled = np.flatnonzero(np.asarray(dataset.labels) >= 0)  # images without identity have no class
    mine = labeled[rank::world]
    rounds = math.ceil(math.ceil(len(labeled) / world) / batch_size)  # the most chunks any rank has: all take part
    pairs = embed_pairs(embedder, dataset, mine, batch_size, "estimating centres", progress and rank == 0)
    sums = None
    for _ in range(rounds):  # at least one: a dataset has images
        chunk, plain, flipped = next(pairs, (None, None, None))
        if sums is None:  # the width: from this rank's first chunk, or one embedding when it has none
            width = plain.shape[1] if plain is not None else embedding_width(embedder, dataset)
            sums = ClassSums(dataset.num_classes, width)
        if plain is None:  # this rank is done; the others still send it rows of its classes
            sums.add(torch.zeros(0, dtype=torch.int64), torch.zeros(0, sums.dim), weight=2.0)
        else:
            sums.add_with_flips(torch.from_numpy(dataset.labels[chunk]), plain, flipped)
    return sums.centres(dataset.source)


def estimate_centres(embedder, dataset: FaceDataset, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """The full (num_classes, d) float32 unit-norm centre matrix on every rank: `estimate_class_slice`, then the
    slices gathered. Holding C x d on every rank is the point here (`kd-plugin centres` writes one file); training
    uses the slices."""
    return whole_matrix(estimate_class_slice(embedder, dataset, batch_size, progress), dataset.num_classes)


def whole_matrix(part: ClassSlice, num_classes: int) -> torch.Tensor:
    """Every rank's class slice gathered into the full (num_classes, d) matrix, on every rank (collective): for the
    commands that write one file."""
    if not is_distributed():
        return part.rows
    sizes = [class_range(num_classes, r, get_world_size())[1] for r in range(get_world_size())]
    return gather_no_grad(part.rows.to(collective_device()), sizes).cpu()


def centres_from_cache(cache, labels: np.ndarray, num_classes: int, rank: int | None = None,
                       world_size: int | None = None, chunk: int = 65536) -> ClassSlice:
    """The same estimate for this rank's class range from a teacher-embedding cache (each image and its flip,
    normalised), without the teacher: only the cached rows of this rank's classes are read."""
    sums = ClassSums(num_classes, cache.embedding_size, rank, world_size)
    labels = np.asarray(labels, dtype=np.int64)
    mine = np.flatnonzero((labels >= sums.start) & (labels < sums.start + sums.count))
    for a in range(0, len(mine), chunk):
        idx = mine[a:a + chunk]
        sums.add_with_flips(torch.from_numpy(labels[idx]), cache.get(idx, False), cache.get(idx, True), own=True)
    return sums.centres(f"the cached dataset ({cache.directory})")
