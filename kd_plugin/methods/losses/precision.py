"""Precision policy of the distillation terms: never below fp32 (they run outside autocast), float64 kept as is."""

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 tensors become fp32; fp32 and fp64 stay as they are (float64 gradchecks need that)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
