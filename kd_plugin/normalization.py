"""Per-model input normalisation of uint8 RGB batches: mean/std in pixel units, optional RGB->BGR swap."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ARCFACE_MEAN = (127.5, 127.5, 127.5)
ARCFACE_STD = (127.5, 127.5, 127.5)
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def parse_triplet(text: str | float | tuple | list, name: str = "value") -> tuple[float, float, float]:
    """Parse `"a,b,c"`, a single number, or a sequence into three floats (one per RGB channel)."""
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", "").split(",") if p]
    elif isinstance(text, (int, float)):
        parts = [text]
    else:
        parts = list(text)
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{name}: expected one number or three comma-separated numbers, got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise ValueError(f"{name}: expected one number or three comma-separated numbers (R,G,B), got {text!r}")
    return values[0], values[1], values[2]


@dataclass(frozen=True)
class InputNormalization:
    """`(x - mean) / std` per channel in pixel units (0..255), channels RGB unless `bgr` (then the model sees BGR)."""

    mean: tuple[float, float, float] = ARCFACE_MEAN
    std: tuple[float, float, float] = ARCFACE_STD
    bgr: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", parse_triplet(self.mean, "mean"))
        object.__setattr__(self, "std", parse_triplet(self.std, "std"))
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive per channel, got {self.std}")

    def numpy(self, images: np.ndarray) -> np.ndarray:
        """Normalise an (N, 3, H, W) uint8 RGB array to float32 model input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {images.shape}")
        x = images.astype(np.float32)
        if self.bgr:
            x = x[:, ::-1]
        mean = np.asarray(self.mean[::-1] if self.bgr else self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.std[::-1] if self.bgr else self.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((x - mean) / std)

    def torch(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise a uint8 (N, 3, H, W) RGB tensor to float32 model input on the same device."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {tuple(images.shape)}")
        x = images.float()
        mean, std = self._constants(x.device)
        x = (x - mean) / std
        return x.flip(1) if self.bgr else x

    def __getstate__(self) -> dict:  # the device copies stay in this process (DataLoader workers get the numbers)
        return {k: v for k, v in self.__dict__.items() if k != "_on_device"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as (1, 3, 1, 1) tensors on `device`, copied there once (a copy per batch would wait for the
        device each step)."""
        cache = self.__dict__.setdefault("_on_device", {})
        if device not in cache:
            cache[device] = (torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1).to(device),
                             torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1).to(device))
        return cache[device]


def given_normalization(mean=None, std=None, bgr: bool = False) -> InputNormalization | None:
    """A model's normalisation as a command line or config.kd gives it: None (the model's own convention, see
    `kd_plugin.teachers.spec.default_normalization`) unless mean, std or bgr is given; a missing half is 127.5."""
    if mean is None and std is None and not bgr:
        return None
    return InputNormalization(ARCFACE_MEAN if mean is None else mean, ARCFACE_STD if std is None else std, bgr)
