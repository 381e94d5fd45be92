"""Teacher-embedding cache: every training image and its horizontal flip embedded once, stored as fp16.

`DIR/meta.json` records the teacher spec, its input normalisation, the dataset's identity, the dims and the cache's
parts: `DIR/embeddings.partRRRRR-of-WWWWW.npy`, one (rows, 2, d) float16 .npy per rank that built it, holding a
contiguous range of samples ([:, 0] the image, [:, 1] its flip), read memory-mapped. Under torchrun each rank embeds
its range into its own file, written whole under a temporary name and renamed, so no file has two writers (ranks on
different nodes of an NFS folder never share a page); rank 0 writes meta.json, with each part's byte size, only once
it sees every part complete. A reader checks every part against meta.json and refuses a torn set naming the part, a
cache whose dataset or teacher does not match (augmented images other than the flip need the teacher online, or
consistent views with their own cache: kd_plugin.teachers.view_cache). A cache written before parts existed (one
`embeddings.npy`, version 1) is read as one part."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from kd_plugin.atomic import replacing, write_json
from kd_plugin.data.datasets import FaceDataset, dataset_fingerprint
from kd_plugin.distributed import barrier, class_range, get_rank, get_world_size
from kd_plugin.embeddings import embed_pairs, embedding_width
from kd_plugin.errors import KDPluginError
from kd_plugin.job_files import PartSet, agree_or_raise, require_shared_folder

FORMAT = "kd_plugin.teacher_cache"
_REBUILD = "rebuild it with kd-plugin cache --teacher SPEC --data DATA --out DIR"


def build_cache(embedder, dataset: FaceDataset, out_dir: str, teacher: str, batch_size: int = 256,
                progress: bool = True) -> str:
    """Embed every image of `dataset` and its flip with `embedder` into `out_dir`; call on every rank. Returns
    `out_dir`. Every rank reads every part afterwards, so the folder must be shared: checked first."""
    rank, world = get_rank(), get_world_size()
    os.makedirs(out_dir, exist_ok=True)
    require_shared_folder(out_dir, "the teacher cache folder")
    dim = embedding_width(embedder, dataset)
    if rank == 0 and os.path.exists(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))  # the set is rebuilt: no reader may take the old one
    barrier()
    parts = PartSet(out_dir, "embeddings", world)
    start, count = class_range(len(dataset), rank, world)
    with replacing(parts.path(rank)) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(count, 2, dim))
        for chunk, plain, flipped in embed_pairs(embedder, dataset, np.arange(start, start + count), batch_size,
                                                 "caching teacher embeddings", progress and rank == 0):
            array[chunk - start, 0] = plain.cpu().numpy().astype(np.float16)
            array[chunk - start, 1] = flipped.cpu().numpy().astype(np.float16)
        array.flush()
        del array

    def finish() -> None:  # rank 0, once every part is complete: the set's meta.json
        if rank != 0:
            return
        listing = [dict(entry, start=class_range(len(dataset), r, world)[0],
                        rows=class_range(len(dataset), r, world)[1]) for r, entry in enumerate(parts.listing())]
        for stale in parts.stale() + [os.path.join(out_dir, "embeddings.npy")]:  # other world sizes, version 1
            if os.path.exists(stale):
                os.remove(stale)
        norm = getattr(embedder, "normalization", None)
        meta = {"format": FORMAT, "version": 2, "teacher": teacher, "num_images": len(dataset),
                "embedding_size": dim, "dtype": "float16", "layout": "parts of (index, flip, dim); flip 0 = as stored",
                "normalization": None if norm is None else {"mean": norm.mean, "std": norm.std, "bgr": norm.bgr},
                "dataset": dataset_fingerprint(dataset), "ranks": world, "parts": listing}
        write_json(meta, os.path.join(out_dir, "meta.json"), indent=1)
    agree_or_raise(finish)
    return out_dir


class TeacherCache:
    """Cached teacher embeddings; `get(indices, flipped)` returns float32 (n, d). Opened lazily in each process."""

    def __init__(self, directory: str, meta: dict) -> None:
        self.directory, self.meta = directory, meta
        self.teacher = meta["teacher"]
        self.num_images, self.embedding_size = int(meta["num_images"]), int(meta["embedding_size"])
        self.parts = meta["parts"]
        self._starts = np.asarray([int(p["start"]) for p in self.parts], dtype=np.int64)
        self._arrays: list[np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}  # never pickle the mapped data into a worker

    def _data(self) -> list[np.ndarray]:
        if self._arrays is None:
            self._arrays = PartSet.open(self.directory, self.parts, os.path.join(self.directory, "meta.json"),
                                        _REBUILD)
        return self._arrays

    def get(self, indices, flipped) -> torch.Tensor:
        """Teacher embeddings of samples `indices` (flipped where `flipped` is true), as float32."""
        idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        flip = np.broadcast_to(np.asarray(torch.as_tensor(flipped).cpu(), dtype=np.int64).reshape(-1), idx.shape)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"{self.directory}: sample index out of range 0..{self.num_images - 1}")
        arrays = self._data()
        if len(arrays) == 1:
            return torch.from_numpy(arrays[0][idx, flip].astype(np.float32))
        part = np.searchsorted(self._starts, idx, side="right") - 1
        out = np.empty((len(idx), self.embedding_size), dtype=np.float32)
        for p in np.unique(part):
            rows = part == p
            out[rows] = arrays[p][idx[rows] - self._starts[p], flip[rows]]
        return torch.from_numpy(out)

    def check(self, dataset: FaceDataset | None = None, teacher: str | None = None) -> None:
        """Refuse a cache made for another dataset or teacher."""
        where = os.path.join(self.directory, "meta.json")
        if teacher is not None and teacher != self.teacher:
            raise KDPluginError(f"{where}: the cache was built with teacher {self.teacher!r}, this run uses "
                                f"{teacher!r}; rebuild it: kd-plugin cache --teacher {teacher} --data ... --out ...")
        if dataset is not None:
            recorded, actual = self.meta["dataset"], dataset_fingerprint(dataset)
            for key in ("num_images", "num_classes", "labels_sha1", "images_sha1"):
                if recorded.get(key) != actual[key]:
                    raise KDPluginError(f"{where}: the cache was built for another dataset ({recorded['source']}: "
                                        f"{key} {recorded.get(key)} vs {actual[key]} for {dataset.source}); rebuild it "
                                        f"for this dataset with kd-plugin cache")


def _parts_of(directory: str, meta: dict) -> list[dict]:
    """The parts meta.json lists, checked to tile samples 0..N-1; a version-1 cache is its one embeddings.npy."""
    where = os.path.join(directory, "meta.json")
    if meta.get("version", 1) == 1:
        path = os.path.join(directory, "embeddings.npy")
        return [{"file": "embeddings.npy", "bytes": os.path.getsize(path) if os.path.isfile(path) else -1,
                 "start": 0, "rows": int(meta["num_images"])}]
    parts = meta.get("parts") or []
    starts = np.cumsum([0] + [int(p["rows"]) for p in parts])
    if not parts or starts[-1] != int(meta["num_images"]) or any(int(p["start"]) != s for p, s in zip(parts, starts)):
        raise KDPluginError(f"{where}: its parts do not cover samples 0..{int(meta['num_images']) - 1} in order; "
                            f"{_REBUILD}")
    return parts


def load_cache(directory: str, dataset: FaceDataset | None = None, teacher: str | None = None) -> TeacherCache:
    """Open a cache written by `kd-plugin cache`, checked against the dataset and teacher when given, and every part
    checked present and complete."""
    where = os.path.join(directory, "meta.json")
    if not os.path.isfile(where):
        started = any(f.startswith("embeddings") for f in os.listdir(directory)) if os.path.isdir(directory) else False
        raise KDPluginError(f"{directory}: no complete teacher cache here ("
                            + ("an interrupted build left parts without meta.json" if started else "meta.json missing")
                            + f"); {_REBUILD}")
    with open(where, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise KDPluginError(f"{where}: not a kd_plugin teacher cache (format {meta.get('format')!r})")
    cache = TeacherCache(directory, {**meta, "parts": _parts_of(directory, meta)})
    for entry, array in zip(cache.parts, cache._data()):
        if array.shape != (int(entry["rows"]), 2, cache.embedding_size):
            raise KDPluginError(f"{directory}/{entry['file']}: shape {array.shape} does not match meta.json "
                                f"({entry['rows']}, 2, {cache.embedding_size}); {_REBUILD}")
    cache.check(dataset, teacher)
    return cache
