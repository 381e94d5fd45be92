"""Embedding-matching baselines: L2 (PocketNet's MSE of normalised embeddings) and cosine distance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_plugin.embeddings import check_same_dims
from kd_plugin.methods.losses.precision import at_least_fp32
from kd_plugin.methods.registry import register_term


@register_term("l2", weight=100.0, title="L2", needs=("teacher", "equal_dims"),
               summary="mean squared error of the L2-normalised embeddings (PocketNet's, weight 100)", _builtin=True)
class L2Loss(nn.Module):
    """mean((f̂_s - f̂_t)^2) over batch and dims (PocketNet: weight 100)."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None):
        check_same_dims(student, teacher, "l2")
        loss = F.mse_loss(F.normalize(at_least_fp32(student), dim=1), F.normalize(at_least_fp32(teacher), dim=1))
        return loss, {"l2": loss.detach()}


@register_term("cosine", title="cosine", needs=("teacher", "equal_dims"),
               summary="mean cosine distance between student and teacher embeddings", _builtin=True)
class CosineLoss(nn.Module):
    """mean(1 - cos(f_s, f_t))."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None):
        check_same_dims(student, teacher, "cosine")
        cos = F.cosine_similarity(at_least_fp32(student), at_least_fp32(teacher), dim=1)
        loss = (1.0 - cos).mean()
        return loss, {"cosine_distance": loss.detach(), "cosine_similarity": cos.detach().mean()}
