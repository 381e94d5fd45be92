"""Class centres estimated from a teacher's embeddings, for teachers released without a classifier.

Per class: the mean of the L2-normalised teacher embeddings of every image and of its horizontal flip (each normalised
on its own), then L2-normalised. Under torchrun every rank embeds its share of the images; sums and counts are
all-reduced (in float64, so the result does not depend on the number of ranks beyond rounding)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kd_plugin.data.datasets import FaceDataset
from kd_plugin.distributed import all_reduce_, get_rank, get_world_size
from kd_plugin.errors import KDPluginError
from kd_plugin.progress import Progress


def embed_pairs(embedder, dataset: FaceDataset, indices: np.ndarray, batch_size: int = 256,
                desc: str = "embedding", progress: bool = True, workers: int = 1):
    """Yield (indices, embeddings of the images, embeddings of their flips) for `indices`, in chunks; images are
    decoded by DataLoader workers while the teacher runs."""
    bar = Progress(len(indices), f"{desc} ({dataset.source})", "img", enabled=progress)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=[int(i) for i in indices],
                                         num_workers=workers if len(indices) > batch_size else 0)
    for images, _, chunk in loader:
        chunk = chunk.numpy()
        plain = torch.as_tensor(embedder.embed(images)).float()
        flipped = torch.as_tensor(embedder.embed(images.flip(3))).float()
        yield chunk, plain, flipped
        bar.update(len(chunk))


def estimate_centers(embedder, dataset: FaceDataset, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """The (num_classes, d) float32 unit-norm centre matrix; runs on every rank of a process group."""
    rank, world = get_rank(), get_world_size()
    mine = np.arange(rank, len(dataset), world)
    sums, counts = None, torch.zeros(dataset.num_classes, dtype=torch.float64)
    for chunk, plain, flipped in embed_pairs(embedder, dataset, mine, batch_size, "estimating centres",
                                             progress and rank == 0):
        both = (F.normalize(plain, dim=1) + F.normalize(flipped, dim=1)).double()
        if sums is None:
            sums = torch.zeros(dataset.num_classes, both.shape[1], dtype=torch.float64)
        labels = torch.from_numpy(dataset.labels[chunk])
        sums.index_add_(0, labels, both)
        counts.index_add_(0, labels, torch.full((len(chunk),), 2.0, dtype=torch.float64))
    if sums is None:  # this rank had no image: learn the width from one embedding
        sums = torch.zeros(dataset.num_classes, torch.as_tensor(embedder.embed(dataset[0][0][None])).shape[1],
                           dtype=torch.float64)
    device = _collective_device()
    sums, counts = all_reduce_(sums.to(device)).cpu(), all_reduce_(counts.to(device)).cpu()
    empty = torch.nonzero(counts == 0).squeeze(1)
    if len(empty):
        raise KDPluginError(f"{dataset.source}: {len(empty)} classes have no image (first: class {int(empty[0])}); a "
                            f"centre cannot be estimated for them. Relabel the dataset so classes are 0..C-1 without gaps")
    return F.normalize(sums / counts[:, None], dim=1).float()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo and no process group use the CPU."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def centers_from_cache(cache, labels: np.ndarray, num_classes: int, chunk: int = 65536) -> torch.Tensor:
    """The same estimate from a teacher-embedding cache (each image and its flip, normalised), without the teacher."""
    sums = None
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for start in range(0, len(labels), chunk):
        idx = np.arange(start, min(start + chunk, len(labels)))
        both = (F.normalize(cache.get(idx, False), dim=1) + F.normalize(cache.get(idx, True), dim=1)).double()
        if sums is None:
            sums = torch.zeros(num_classes, both.shape[1], dtype=torch.float64)
        lab = torch.from_numpy(np.asarray(labels[idx], dtype=np.int64))
        sums.index_add_(0, lab, both)
        counts.index_add_(0, lab, torch.full((len(idx),), 2.0, dtype=torch.float64))
    empty = torch.nonzero(counts == 0).squeeze(1)
    if len(empty):
        raise KDPluginError(f"{len(empty)} classes have no image in the cached dataset (first: class {int(empty[0])})")
    return F.normalize(sums / counts[:, None], dim=1).float()
