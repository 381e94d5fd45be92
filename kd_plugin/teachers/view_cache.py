"""Teacher-view cache (`config.kd.views.cache`): the teacher's embedding of each sample's consistent view, keyed by
(sample, epoch), filled by the first run that shows the view and read by every later run that repeats it (the
benchmark's methods and training seeds share one; kd_plugin.data.views says why the views repeat).

`DIR/meta.json` records the teacher, its input normalisation, the dataset's identity, the view settings and the
embedding size; a cache is refused for a run that differs in any of them. Per epoch, `DIR/epoch_EEEE.npy` holds an
(N, d) float16 array and `DIR/epoch_EEEE.filled.npy` an (N,) flag per sample, both memory-mapped (on disk, not in each
rank's memory; an epoch of N samples takes N x d x 2 bytes: 2.6 MB for 10k 128-d samples, 43 GB for WebFace42M at
512-d, where the teacher should rather run online without a cache). Files are created whole under a temporary name
and linked into place only if absent, so ranks and concurrent runs never truncate each other's work; a row's flag is
set only after its embedding is flushed, so an interrupted run leaves only complete rows marked, and the next run
computes the rest. Embeddings are served as stored (float16, widened): a run reads exactly what the run that filled
the cache computed, so a run's result does not depend on whether its views were cached."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from kd_plugin.atomic import write_json
from kd_plugin.errors import KDPluginError
from kd_plugin.teachers.cache import dataset_fingerprint

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
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # never pickle mapped files

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._open:
            rows = os.path.join(self.directory, f"epoch_{epoch:04d}.npy")
            flags = os.path.join(self.directory, f"epoch_{epoch:04d}.filled.npy")
            for path, shape, dtype in ((rows, (self.num_images, self.embedding_size), np.float16),
                                       (flags, (self.num_images,), np.uint8)):  # zero-filled
                _create_if_absent(path, lambda t: np.lib.format.open_memmap(t, "w+", dtype, shape).flush())
            self._open = {epoch: (np.load(rows, mmap_mode="r+"), np.load(flags, mmap_mode="r+"))}  # one epoch open
        return self._open[epoch]

    def _indices(self, indices) -> np.ndarray:
        idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"{self.directory}: sample index out of range 0..{self.num_images - 1}")
        return idx

    def lookup(self, indices, epoch: int) -> tuple[torch.Tensor, np.ndarray]:
        rows, flags = self._epoch(int(epoch))
        idx = self._indices(indices)
        return torch.from_numpy(rows[idx].astype(np.float32)), flags[idx].astype(bool)

    def store(self, indices, epoch: int, values: torch.Tensor) -> torch.Tensor:
        rows, flags = self._epoch(int(epoch))
        idx = self._indices(indices)
        stored = values.detach().float().cpu().numpy().astype(np.float16)
        rows[idx] = stored
        rows.flush()  # the embeddings reach the file before their flags do
        flags[idx] = 1
        flags.flush()
        return torch.from_numpy(stored.astype(np.float32))

    def filled(self, epoch: int) -> int:
        """How many samples of `epoch` have their view's embedding cached."""
        return int(self._epoch(int(epoch))[1].sum())


def open_view_cache(directory: str, dataset, teacher: str, normalization, views: dict,
                    embedding_size: int) -> ViewCache:
    """The cache in `directory` for this run (created when absent); refused when it was made for another teacher,
    dataset or view settings."""
    os.makedirs(directory, exist_ok=True)
    where = os.path.join(directory, "meta.json")
    meta = {"format": FORMAT, "version": 1, "teacher": teacher,
            "normalization": None if normalization is None else {"mean": list(normalization.mean),
                                                                 "std": list(normalization.std),
                                                                 "bgr": bool(normalization.bgr)},
            "views": dict(views), "num_images": len(dataset), "embedding_size": int(embedding_size),
            "dtype": "float16", "layout": "epoch_EEEE.npy (index, dim) + epoch_EEEE.filled.npy (index,)",
            "dataset": dataset_fingerprint(dataset)}
    _create_if_absent(where, lambda temporary: write_json(meta, temporary, indent=1))
    with open(where, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("format") != FORMAT:
        raise KDPluginError(f"{where}: not a kd_plugin teacher-view cache (format {saved.get('format')!r}); point "
                            f"kd.views.cache at an empty or a teacher-view cache folder")
    for key in ("teacher", "normalization", "views", "num_images", "embedding_size"):
        if json.loads(json.dumps(saved.get(key))) != json.loads(json.dumps(meta[key])):
            raise KDPluginError(f"{where}: the cache holds views made with {key} = {saved.get(key)!r}, this run has "
                                f"{meta[key]!r}; use another kd.views.cache folder for this run (or delete that one)")
    for key in ("num_classes", "labels_sha1", "images_sha1"):
        if saved["dataset"].get(key) != meta["dataset"][key]:
            raise KDPluginError(f"{where}: the cache was made for another dataset ({saved['dataset']['source']}: "
                                f"{key} {saved['dataset'].get(key)} vs {meta['dataset'][key]} for {dataset.source}); "
                                f"use another kd.views.cache folder for this data")
    return ViewCache(directory, saved)
