"""A torch network as an embedder: its own input normalisation, no gradient, optional autocast — a frozen teacher, or
a student still training (embedded in eval mode, then put back as it was)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kd_plugin.normalization import InputNormalization
from kd_plugin.teachers.formats import Embedder


class TorchEmbedder(Embedder):
    """`embed(uint8 (N,3,H,W) RGB) -> float32 (N, d)`; numpy in gives numpy out, a tensor gives a tensor on its device.

    `freeze=True` (a teacher): the module is moved to `device`, put in eval mode and its parameters frozen for good.
    `freeze=False` (the student during training, already on `device`): it is left as it is, switched to eval mode for
    each `embed` and back afterwards."""

    def __init__(self, module: nn.Module, normalization: InputNormalization | None = None,
                 device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None, batch_size: int = 256,
                 spec: str = "", freeze: bool = True, raw_uint8: bool = False) -> None:
        self.module = module.to(device).eval().requires_grad_(False) if freeze else module
        self.normalization = normalization or InputNormalization()
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.batch_size = batch_size
        self.spec = spec
        self.raw_uint8 = raw_uint8  # a graph that normalises its uint8 input itself is fed the images as they are

    @torch.inference_mode()
    def embed(self, images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Raw (not L2-normalised) float32 embeddings of uint8 RGB images."""
        as_numpy = isinstance(images, np.ndarray)
        batch = torch.from_numpy(images) if as_numpy else images
        if batch.dtype != torch.uint8:
            raise TypeError(f"{self.spec or 'teacher'}: embed() takes uint8 images, got {batch.dtype}")
        was_training = self.module.training
        self.module.eval()
        try:
            out = []
            for start in range(0, len(batch), self.batch_size):
                x = batch[start:start + self.batch_size].to(self.device, non_blocking=True)
                x = x if self.raw_uint8 else self.normalization.torch(x)
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float16,
                                    enabled=self.amp_dtype is not None):
                    out.append(self.module(x).float())
        finally:
            self.module.train(was_training)
        result = torch.cat(out) if out else torch.zeros(0, 0)
        return result.cpu().numpy() if as_numpy else result.to(images.device)
