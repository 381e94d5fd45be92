"""Teacher-embedding cache: every training image and its horizontal flip embedded once, stored as fp16.

`DIR/embeddings.npy` is a plain (N, 2, d) float16 .npy read memory-mapped ([:, 0] the image, [:, 1] its flip) and
`DIR/meta.json` records the teacher spec, its input normalisation, the dataset's identity and the dims. Under torchrun
every rank embeds its share of the images straight into the one file. The file is written as `.partial` and renamed,
and meta.json written last, so an interrupted build is never mistaken for a complete cache. A cache whose dataset or
teacher does not match is refused, and so is any augmentation other than the flip (the teacher must then run online)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from kd_plugin.atomic import write_json
from kd_plugin.data.datasets import FaceDataset
from kd_plugin.distributed import get_rank, get_world_size, is_distributed
from kd_plugin.errors import KDPluginError
from kd_plugin.teachers.centres import embed_pairs, embedding_width

FORMAT = "kd_plugin.teacher_cache"
CACHEABLE_AUGMENTATIONS = (None, "none", "flip")


def dataset_fingerprint(dataset: FaceDataset, samples: int = 16) -> dict:
    """What identifies a dataset: sizes, a hash of all labels, and a hash of a few evenly spaced encoded images."""
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).astype(np.int64))
    content = hashlib.sha1()
    for i in picks:
        content.update(dataset.read_bytes(int(i)))
    return {"source": dataset.source, "num_images": len(dataset), "num_classes": int(dataset.num_classes),
            "labels_sha1": hashlib.sha1(np.ascontiguousarray(dataset.labels, dtype=np.int64).tobytes()).hexdigest(),
            "images_sha1": content.hexdigest()}


def build_cache(embedder, dataset: FaceDataset, out_dir: str, teacher: str, batch_size: int = 256,
                progress: bool = True) -> str:
    """Embed every image of `dataset` and its flip with `embedder` into `out_dir`; call on every rank."""
    import torch.distributed as dist

    rank, world = get_rank(), get_world_size()
    os.makedirs(out_dir, exist_ok=True)
    final, partial = os.path.join(out_dir, "embeddings.npy"), os.path.join(out_dir, "embeddings.npy.partial")
    dim = embedding_width(embedder, dataset)
    if rank == 0:
        for stale in (os.path.join(out_dir, "meta.json"), final):
            if os.path.exists(stale):
                os.remove(stale)
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(len(dataset), 2, dim)).flush()
    if is_distributed():
        dist.barrier()
    array = np.load(partial, mmap_mode="r+")
    mine = np.arange(rank, len(dataset), world)
    for chunk, plain, flipped in embed_pairs(embedder, dataset, mine, batch_size, "caching teacher embeddings",
                                             progress and rank == 0):
        array[chunk, 0] = plain.cpu().numpy().astype(np.float16)
        array[chunk, 1] = flipped.cpu().numpy().astype(np.float16)
    array.flush()
    del array
    if is_distributed():
        dist.barrier()
    if rank == 0:
        os.replace(partial, final)
        norm = getattr(embedder, "normalization", None)
        meta = {"format": FORMAT, "version": 1, "teacher": teacher, "num_images": len(dataset),
                "embedding_size": dim, "dtype": "float16", "layout": "(index, flip, dim); flip 0 = as stored",
                "normalization": None if norm is None else {"mean": norm.mean, "std": norm.std, "bgr": norm.bgr},
                "dataset": dataset_fingerprint(dataset), "ranks": world}
        write_json(meta, os.path.join(out_dir, "meta.json"), indent=1)
    if is_distributed():
        dist.barrier()
    return final


class TeacherCache:
    """Cached teacher embeddings; `get(indices, flipped)` returns float32 (n, d). Opened lazily in each process."""

    def __init__(self, directory: str, meta: dict) -> None:
        self.directory, self.meta = directory, meta
        self.teacher = meta["teacher"]
        self.num_images, self.embedding_size = int(meta["num_images"]), int(meta["embedding_size"])
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}  # never pickle the mapped data into a worker

    def _data(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(os.path.join(self.directory, "embeddings.npy"), mmap_mode="r")
        return self._array

    def get(self, indices, flipped) -> torch.Tensor:
        """Teacher embeddings of samples `indices` (flipped where `flipped` is true), as float32."""
        idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        flip = np.broadcast_to(np.asarray(torch.as_tensor(flipped).cpu(), dtype=np.int64).reshape(-1), idx.shape)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"{self.directory}: sample index out of range 0..{self.num_images - 1}")
        return torch.from_numpy(self._data()[idx, flip].astype(np.float32))

    def check(self, dataset: FaceDataset | None = None, teacher: str | None = None,
              augmentation: str | None = "flip") -> None:
        """Refuse a cache made for another dataset or teacher, or used with augmentation other than the flip."""
        where = os.path.join(self.directory, "meta.json")
        if augmentation not in CACHEABLE_AUGMENTATIONS:
            raise KDPluginError(f"{where}: the cache holds teacher embeddings of each image and its flip only; with "
                                f"augmentation {augmentation!r} the teacher must run online — drop the teacher cache")
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


def load_cache(directory: str, dataset: FaceDataset | None = None, teacher: str | None = None,
               augmentation: str | None = "flip") -> TeacherCache:
    """Open a cache written by `kd-plugin cache`, checked against the dataset/teacher/augmentation when given."""
    where = os.path.join(directory, "meta.json")
    if not os.path.isfile(where):
        partial = os.path.isfile(os.path.join(directory, "embeddings.npy.partial"))
        raise KDPluginError(f"{directory}: no complete teacher cache here ("
                            + ("an interrupted build left embeddings.npy.partial" if partial else "meta.json missing")
                            + "); build it with kd-plugin cache --teacher SPEC --data DATA --out DIR")
    with open(where, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise KDPluginError(f"{where}: not a kd_plugin teacher cache (format {meta.get('format')!r})")
    cache = TeacherCache(directory, meta)
    shape = cache._data().shape
    if shape != (cache.num_images, 2, cache.embedding_size):
        raise KDPluginError(f"{directory}/embeddings.npy: shape {shape} does not match meta.json "
                            f"({cache.num_images}, 2, {cache.embedding_size}); rebuild the cache")
    cache.check(dataset, teacher, augmentation)
    return cache
