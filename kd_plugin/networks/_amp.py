"""Mixed-precision switch shared by the built-in networks."""

from __future__ import annotations

import contextlib

import torch


def cuda_autocast(x: torch.Tensor, enabled: bool) -> contextlib.AbstractContextManager:
    """CUDA autocast turned on or off for a CUDA tensor; a no-op context for a tensor on any other device."""
    # arcface_torch enters torch.cuda.amp.autocast(flag) unconditionally. On CUDA that also switches an enclosing
    # autocast *off* when flag is False, so the CUDA branch must be entered for both values; on other devices CUDA
    # autocast changes nothing, and skipping it avoids torch's "CUDA is not available" warning.
    if x.is_cuda:
        return torch.autocast("cuda", enabled=enabled)
    return contextlib.nullcontext()
