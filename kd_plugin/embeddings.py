"""Helpers on embeddings that several parts of kd_plugin share: the one equal-dimensions check, a model's embedding
width, and a dataset's images and flips embedded chunk by chunk."""

from __future__ import annotations

import numpy as np
import torch

from kd_plugin.data.datasets import FaceDataset
from kd_plugin.errors import DimensionMismatch
from kd_plugin.progress import Progress


def check_same_dims(student: torch.Tensor, teacher: torch.Tensor, methods: str) -> None:
    """The one equal-dimensions check: `methods` (their names) compare student and teacher embeddings directly, so
    both must have the same size; relational terms do not. Run by KDObjective for the plan's `equal_dims` methods on
    every batch, and by these terms and AdaDistill's update when used on their own."""
    if student.shape[1] != teacher.shape[1]:
        raise DimensionMismatch(f"{methods}: the student's embeddings have {student.shape[1]} dims, the teacher's "
                                f"{teacher.shape[1]}; these compare embeddings directly and need equal dims: set "
                                f"embedding_size = {teacher.shape[1]} or use a relational term (ekd, cckd, sp, rkd)")


def embedding_width(embedder, dataset: FaceDataset) -> int:
    """The teacher's embedding size, from one embedding of the dataset's first image."""
    return int(torch.as_tensor(embedder.embed(dataset[0][0][None])).shape[1])


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
        bar.update(len(chunk))  # before the yield: a caller may never resume the generator after its last chunk
        yield chunk, plain, flipped
