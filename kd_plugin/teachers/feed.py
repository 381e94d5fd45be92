"""Where a run's teacher embeddings come from, batch by batch: the teacher's cache (by sample index and flip) when the
run has one, else the frozen teacher run on the very images the student sees. `kd-plugin train` and the train_v2 hook
both take them from here."""

from __future__ import annotations

from typing import Callable

import torch

from kd_plugin.teachers.cache import TeacherCache


class TeacherFeed:
    """`embedder` (anything with `embed(uint8 batch)`) or `cache` (a TeacherCache, which then serves every batch)."""

    def __init__(self, embedder=None, cache: TeacherCache | None = None) -> None:
        if embedder is None and cache is None:
            raise ValueError("a teacher feed needs a teacher or its cache")
        self.embedder, self.cache = embedder, cache

    def set_epoch(self, epoch: int) -> str | None:
        """Multi-step KD switches the teacher per student epoch: the newly loaded teacher's spec, else None. Call it on
        every rank."""
        switch = getattr(self.embedder, "set_epoch", None)
        if self.cache is None and switch is not None and switch(epoch):
            return self.embedder.spec
        return None

    def embeddings(self, indices: torch.Tensor, flips, images: torch.Tensor | Callable[[], torch.Tensor],
                   device: torch.device) -> torch.Tensor:
        """float32 teacher embeddings of a batch on `device`: from the cache by (index, flip), else the teacher run
        on `images` (uint8 RGB, or a function returning them: only called when the teacher runs)."""
        if self.cache is not None:
            return self.cache.get(indices, flips).to(device)
        batch = images() if callable(images) else images
        return torch.as_tensor(self.embedder.embed(batch)).float().to(device)
