"""A torch network used as a frozen embedder: eval mode, no gradient, its own input normalisation, optional autocast."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kd_plugin.normalization import InputNormalization


class TorchEmbedder:
    """`embed(uint8 (N,3,H,W) RGB) -> float32 (N, d)`; numpy in gives numpy out, a tensor gives a tensor on its device."""

    def __init__(self, module: nn.Module, normalization: InputNormalization | None = None,
                 device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None, batch_size: int = 256,
                 spec: str = "") -> None:
        self.module = module.to(device).eval().requires_grad_(False)
        self.normalization = normalization or InputNormalization()
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.batch_size = batch_size
        self.spec = spec

    @torch.inference_mode()
    def embed(self, images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Raw (not L2-normalised) float32 embeddings of uint8 RGB images."""
        as_numpy = isinstance(images, np.ndarray)
        batch = torch.from_numpy(images) if as_numpy else images
        if batch.dtype != torch.uint8:
            raise TypeError(f"{self.spec or 'teacher'}: embed() takes uint8 images, got {batch.dtype}")
        out = []
        for start in range(0, len(batch), self.batch_size):
            x = self.normalization.torch(batch[start:start + self.batch_size].to(self.device, non_blocking=True))
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float16,
                                enabled=self.amp_dtype is not None):
                out.append(self.module(x).float())
        result = torch.cat(out) if out else torch.zeros(0, 0)
        return result.cpu().numpy() if as_numpy else result.to(images.device)
