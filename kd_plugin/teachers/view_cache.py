"""Teacher-view cache (`config.kd.views.cache`): the teacher's embedding of each sample's consistent view, keyed by
(sample, epoch), filled by the first run that shows the view and read by every later run that repeats it (the
benchmark's methods and training seeds share one; kd_plugin.data.views says why the views repeat).

`DIR/meta.json` records the teacher, its input normalisation, the dataset's identity, the view settings and the
embedding size; a cache is refused for a run that differs in any of them. Each process that computes views writes
them into its own part per epoch, never into another's: `DIR/epoch_EEEE.<writer>.npy`, an (N, d) float16 array,
and `DIR/epoch_EEEE.<writer>.filled.npy`, an (N,) flag per sample, both memory-mapped and created sparse (a part
takes on disk about the rows its writer stored; N x d x 2 bytes at most: 2.6 MB for 10k 128-d samples, 43 GB for
WebFace42M at 512-d, where the teacher should rather run online without a cache). A row's flag is set only after its
embedding is flushed, so an interrupted run leaves only complete rows marked, and the next run computes the rest. A
lookup reads every part of the epoch that existed when the epoch was first opened, plus the process's own part
(views another rank computes during the same epoch are computed again, not waited for). Embeddings are served as
stored (float16, widened): a run reads exactly what the run that filled the cache computed, so a run's result does
not depend on whether its views were cached."""

from __future__ import annotations

import glob
import json
import os
import secrets

import numpy as np
import torch

from kd_plugin.atomic import write_json
from kd_plugin.data.datasets import dataset_fingerprint
from kd_plugin.distributed import get_rank
from kd_plugin.errors import KDPluginError

FORMAT = "kd_plugin.teacher_view_cache"


def _create_if_absent(path: str, write) -> None:
    """`write(temporary)` linked in at `path`, unless a file is there (or another process links one in first)."""
    if os.path.exists(path):
        return
    temporary = f"{path}.{os.getpid()}.tmp"
    write(temporary)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        os.remove(temporary)


class ViewCache:
    """`lookup(indices, epoch)` -> (float32 embeddings, which rows were cached); `store(indices, epoch, values)` ->
    the stored (float16-rounded) values as float32."""

    def __init__(self, directory: str, meta: dict) -> None:
        self.directory, self.meta = directory, meta
        self.num_images, self.embedding_size = int(meta["num_images"]), int(meta["embedding_size"])
        self.writer = f"r{get_rank()}-{secrets.token_hex(4)}"  # this process's parts: one writer each
        self._epoch_parts: tuple[int, list[tuple[np.ndarray, np.ndarray]]] | None = None
        self._own: tuple[int, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        # never pickle mapped files; a copy (a DataLoader worker's) only reads, every writer's part this process's too
        return {**self.__dict__, "_epoch_parts": None, "_own": None, "_reader": True}

    def _path(self, epoch: int, writer: str, flags: bool = False) -> str:
        return os.path.join(self.directory, f"epoch_{epoch:04d}.{writer}{'.filled' if flags else ''}.npy")

    def _others(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The other writers' parts of `epoch` (read-only), listed once per epoch, in name order."""
        if self._epoch_parts is None or self._epoch_parts[0] != epoch:
            parts = []
            for flags in sorted(glob.glob(self._path(epoch, "*", flags=True))):
                rows = flags[:-len(".filled.npy")] + ".npy"
                mine = os.path.basename(rows) == os.path.basename(self._path(epoch, self.writer))
                if (getattr(self, "_reader", False) or not mine) and os.path.isfile(rows):
                    parts.append((np.load(rows, mmap_mode="r"), np.load(flags, mmap_mode="r")))
            self._epoch_parts = (epoch, parts)
        return self._epoch_parts[1]

    def _mine(self, epoch: int, create: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """This process's part of `epoch`, created (zero-filled, sparse) on the first store (never by a reader)."""
        if getattr(self, "_reader", False):
            if create:
                raise RuntimeError("a view cache copied into a DataLoader worker only reads")
            return None
        if self._own is not None and self._own[0] == epoch:
            return self._own[1:]
        if not create:
            return None
        rows, flags = self._path(epoch, self.writer), self._path(epoch, self.writer, flags=True)
        for path, shape, dtype in ((rows, (self.num_images, self.embedding_size), np.float16),
                                   (flags, (self.num_images,), np.uint8)):
            _create_if_absent(path, lambda t: np.lib.format.open_memmap(t, "w+", dtype, shape).flush())
        self._own = (epoch, np.load(rows, mmap_mode="r+"), np.load(flags, mmap_mode="r+"))  # one epoch open
        return self._own[1:]

    def _indices(self, indices) -> np.ndarray:
        idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"{self.directory}: sample index out of range 0..{self.num_images - 1}")
        return idx

    def lookup(self, indices, epoch: int) -> tuple[torch.Tensor, np.ndarray]:
        epoch, idx = int(epoch), self._indices(indices)
        out = np.zeros((len(idx), self.embedding_size), dtype=np.float32)
        known = np.zeros(len(idx), dtype=bool)
        mine = self._mine(epoch, create=False)
        for rows, flags in ([mine] if mine is not None else []) + self._others(epoch):
            take = ~known & flags[idx].astype(bool)
            out[take] = rows[idx[take]]
            known |= take
        return torch.from_numpy(out), known

    def store(self, indices, epoch: int, values: torch.Tensor) -> torch.Tensor:
        rows, flags = self._mine(int(epoch), create=True)
        idx = self._indices(indices)
        stored = values.detach().float().cpu().numpy().astype(np.float16)
        rows[idx] = stored
        rows.flush()  # the embeddings reach the file before their flags do
        flags[idx] = 1
        flags.flush()
        return torch.from_numpy(stored.astype(np.float32))

    def filled(self, epoch: int) -> int:
        """How many samples of `epoch` have their view's embedding cached (in any part)."""
        epoch, seen = int(epoch), np.zeros(self.num_images, dtype=bool)
        mine = self._mine(epoch, create=False)
        for _, flags in ([mine] if mine is not None else []) + self._others(epoch):
            seen |= np.asarray(flags).astype(bool)
        return int(seen.sum())


def open_view_cache(directory: str, dataset, teacher: str, normalization, views: dict,
                    embedding_size: int) -> ViewCache:
    """The cache in `directory` for this run (created when absent); refused when it was made for another teacher,
    dataset or view settings."""
    os.makedirs(directory, exist_ok=True)
    where = os.path.join(directory, "meta.json")
    meta = {"format": FORMAT, "version": 2, "teacher": teacher,
            "normalization": None if normalization is None else {"mean": list(normalization.mean),
                                                                 "std": list(normalization.std),
                                                                 "bgr": bool(normalization.bgr)},
            "views": dict(views), "num_images": len(dataset), "embedding_size": int(embedding_size),
            "dtype": "float16",
            "layout": "per writer: epoch_EEEE.<writer>.npy (index, dim) + epoch_EEEE.<writer>.filled.npy (index,)",
            "dataset": dataset_fingerprint(dataset)}
    _create_if_absent(where, lambda temporary: write_json(meta, temporary, indent=1))
    with open(where, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("format") != FORMAT:
        raise KDPluginError(f"{where}: not a kd_plugin teacher-view cache (format {saved.get('format')!r}); point "
                            f"kd.views.cache at an empty or a teacher-view cache folder")
    for key in ("version", "teacher", "normalization", "views", "num_images", "embedding_size"):
        if json.loads(json.dumps(saved.get(key))) != json.loads(json.dumps(meta[key])):
            raise KDPluginError(f"{where}: the cache holds views made with {key} = {saved.get(key)!r}, this run has "
                                f"{meta[key]!r}; use another kd.views.cache folder for this run (or delete that one)")
    for key in ("num_classes", "labels_sha1", "images_sha1"):
        if saved["dataset"].get(key) != meta["dataset"][key]:
            raise KDPluginError(f"{where}: the cache was made for another dataset ({saved['dataset']['source']}: "
                                f"{key} {saved['dataset'].get(key)} vs {meta['dataset'][key]} for {dataset.source}); "
                                f"use another kd.views.cache folder for this data")
    return ViewCache(directory, saved)
