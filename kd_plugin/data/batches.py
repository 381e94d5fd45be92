"""The one loader contract of a KD run, the same under `kd-plugin train` and under train_v2's hook: the DataLoader's
item is a whole batch of the sampler (`BatchReader`, read in the loader's workers) and it arrives as a `Batch` that
carries everything the KD step needs besides the images: labels, sample indices, flips, the cached teacher rows read
with the images, and (consistent views with mixed labels) each row's mixup partner. Nothing is re-derived from the
sampler in the training process."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from kd_plugin.data.views import ViewDataset, mix_partners


class Batch(NamedTuple):
    """One training batch on the host (pinned with a CUDA device). `images`: uint8 RGB NCHW, or arcface_torch's
    normalised float under train_v2 (its loader normalises in its workers); `flips`: bool per row, the teacher cache's
    key (all False with consistent views: the view decides); `rows`: the teacher cache's (or the view cache's) float16
    rows of the batch, when the run reads one; `known`: with a view cache, which rows it held (numpy bool); `mix`:
    with kd.views.mixed_labels = "mix", each row's partner label and lam (kd_plugin.data.views.mix_partners)."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    flips: torch.Tensor
    rows: torch.Tensor | None = None
    known: np.ndarray | None = None
    mix: tuple[torch.Tensor, torch.Tensor] | None = None


class BatchReader(torch.utils.data.Dataset):
    """A dataset whose item is one batch of the sampler — a list of (index, flip), or (index, epoch) over a
    `ViewDataset` — read into a `Batch`. `cache` (a TeacherCache: rows by index and flip) or `views` (a ViewCache:
    rows by index and epoch) is read here, in the loader's workers, so the training step only copies the rows to the
    device; `attach` sets them after the loader exists (under train_v2 the loader is built before the KD head).
    `normalise`: a function applied to the stacked uint8 images (the hook's arcface_torch normalisation)."""

    def __init__(self, dataset, normalise=None) -> None:
        self.dataset, self.normalise = dataset, normalise
        self.cache = self.views = None

    def attach(self, cache=None, views=None) -> None:
        if cache is not None and views is not None:
            raise ValueError("a batch reads one cache: the teacher cache or the view cache")
        self.cache, self.views = cache, views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, items) -> Batch:
        images, labels, indices = zip(*(self.dataset[item] for item in items))
        images, labels, indices = torch.stack(images), torch.stack(labels), torch.stack(indices)
        viewed = isinstance(self.dataset, ViewDataset)
        flips = torch.zeros(len(items), dtype=torch.bool) if viewed else torch.tensor([bool(f) for _, f in items])
        if self.normalise is not None:
            images = self.normalise(images)
        rows = known = mix = None
        if self.cache is not None:
            rows = self.cache.get(indices, flips).half()
        elif self.views is not None:
            rows, known = self.views.lookup(indices, int(items[0][1]))
            rows = rows.half()
        if viewed and self.dataset.keep_labels:
            mix = mix_partners(self.dataset.settings, self.dataset.dataset, indices, int(items[0][1]))
        return Batch(images, labels, indices, flips, rows, known, mix)


def as_is(batch):
    """The loader's collate_fn: a `Batch` is already one batch (the default would turn `known` into a tensor)."""
    return batch
