"""Where a run's teacher embeddings come from, batch by batch: the teacher's cache (by sample index and flip) when the
run has one, else the frozen teacher run on the very images the student sees. With consistent views
(`kd.views`, kd_plugin.data.views) those images are the views, and a teacher-view cache (by sample and epoch) serves
the views it holds and keeps what the teacher computes for the others. `kd-plugin train` and the train_v2 hook both
take them from here."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from kd_plugin.teachers.cache import TeacherCache
from kd_plugin.teachers.view_cache import ViewCache


class TeacherFeed:
    """`embedder` (an Embedder, kd_plugin.teachers.formats) or `cache` (a TeacherCache, which then serves every batch);
    `views`: a ViewCache, with the embedder, for runs on consistent views."""

    def __init__(self, embedder=None, cache: TeacherCache | None = None, views: ViewCache | None = None) -> None:
        if embedder is None and cache is None:
            raise ValueError("a teacher feed needs a teacher or its cache")
        if views is not None and (cache is not None or embedder is None):
            raise ValueError("a teacher-view cache goes with the teacher itself, not with a cache of plain images")
        self.embedder, self.cache, self.views = embedder, cache, views
        self.teacher_rows = 0  # rows the teacher itself embedded (the rest came from a cache)

    def set_epoch(self, epoch: int) -> str | None:
        """Multi-step KD switches the teacher per student epoch: the newly loaded teacher's spec, else None. Call it on
        every rank."""
        if self.cache is None and self.embedder.set_epoch(epoch):
            return self.embedder.spec
        return None

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        self.teacher_rows += len(images)
        return torch.as_tensor(self.embedder.embed(images)).float()

    def embeddings(self, indices: torch.Tensor, flips, images: torch.Tensor | Callable[[], torch.Tensor],
                   device: torch.device, epoch: int | None = None, loaded: tuple = ()) -> torch.Tensor:
        """float32 teacher embeddings of a batch on `device`: from the cache by (index, flip), from the view cache by
        (index, `epoch`) where it holds them, else the teacher run on `images` (uint8 RGB, or a function returning
        them: only called when the teacher runs). `loaded`: what the DataLoader's workers already read from the
        cache for this batch (kd_plugin.data.batches): (rows,) or, with a view cache, (rows, known: a numpy bool
        per row)."""
        if self.cache is not None:
            rows = loaded[0] if loaded else self.cache.get(indices, flips)
            return rows.to(device, non_blocking=True).float()
        if self.views is None:
            return self._run(images() if callable(images) else images).to(device)
        out, known = loaded if loaded else self.views.lookup(indices, epoch)
        if known.all():  # numpy, on the host
            return out.to(device, non_blocking=True).float()
        # the teacher embeds each missing view once, even if the batch holds it twice; what it computes is stored, so
        # a step with missing views copies them to the host (the view cache's first epoch)
        out, batch = out.float(), images() if callable(images) else images
        rows = (~known).nonzero()[0]
        samples, first, repeat = np.unique(np.asarray(torch.as_tensor(indices).cpu())[rows], return_index=True,
                                           return_inverse=True)
        computed = self._run(batch[torch.from_numpy(rows[first]).to(batch.device)])
        out[torch.from_numpy(rows)] = self.views.store(samples, epoch, computed)[torch.from_numpy(repeat)]
        return out.to(device)
