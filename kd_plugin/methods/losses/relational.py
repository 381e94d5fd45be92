"""Relational baselines: CCKD (correlation congruence), SP (similarity preserving), RKD (distance + angle).
They compare relations within each model, so teacher and student dims may differ. CCKD and SP relate each row of the
batch to `earlier` rows too when given them (a cross-batch memory: kd_plugin.methods.memory.RememberingTerm); RKD's
angle term is cubic in the rows, so it takes none."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd_plugin.methods.losses.precision import at_least_fp32
from kd_plugin.methods.registry import register_term


@register_term("cckd", title="CCKD", needs=("teacher",), summary="correlation congruence: the Taylor-expanded Gaussian-RBF correlations "
                                             "of the batch matched to the teacher's", _builtin=True)
class CCKDLoss(nn.Module):
    """Correlation congruence: Gaussian-RBF correlations of unit embeddings by a Taylor expansion of order `order`
    (terms 0..order inclusive), k(x, y) ~ sum_p e^{-2 gamma} (2 gamma)^p / p! (x.y)^p; loss = mean over the N x N
    matrix of (C_s - C_t)^2. Order 2 by default, as TFace's EKD code at 82c9cbb (its b3dad95 sums p < 2: order 1,
    which `order=1` reproduces)."""

    def __init__(self, gamma: float = 0.4, order: int = 2) -> None:
        super().__init__()
        if order < 1:
            raise ValueError(f"cckd order must be >= 1, got {order}")
        self.gamma, self.order = float(gamma), int(order)

    def correlation(self, emb: torch.Tensor, earlier: torch.Tensor | None = None) -> torch.Tensor:
        """The N x N Taylor-approximated RBF correlation matrix of L2-normalised rows; with `earlier` rows (E), the
        N x (E + N) one of the batch against [earlier; batch]."""
        unit = F.normalize(at_least_fp32(emb), dim=1)
        keys = unit if earlier is None else torch.cat([F.normalize(at_least_fp32(earlier), dim=1), unit])
        cos = unit @ keys.T
        coeffs = [math.exp(-2 * self.gamma) * (2 * self.gamma) ** p / math.factorial(p) for p in range(self.order + 1)]
        out, power = torch.full_like(cos, coeffs[0]), torch.ones_like(cos)
        for p in range(1, self.order + 1):
            power = power * cos
            out = out + coeffs[p] * power
        return out

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None,
                earlier: tuple | None = None):
        """`earlier`: (student rows, teacher rows, labels) that precede the batch, without gradient."""
        s_keys, t_keys = (None, None) if earlier is None else earlier[:2]
        loss = F.mse_loss(self.correlation(student, s_keys), self.correlation(teacher, t_keys).detach())
        return loss, {"cckd": loss.detach()}


@register_term("sp", title="SP", needs=("teacher",), summary="similarity preserving: the row-normalised Gram matrix of the batch matched "
                                         "to the teacher's", _builtin=True)
class SPLoss(nn.Module):
    """Similarity preserving: row-normalised Gram matrices G = f f^T; loss = ||G_s - G_t||_F^2 / N^2 (with E earlier
    rows: G = f [earlier; f]^T, over N x (E + N))."""

    @staticmethod
    def gram(emb: torch.Tensor, earlier: torch.Tensor | None = None) -> torch.Tensor:
        """Row-L2-normalised Gram matrix of the raw embeddings (against [earlier; emb] when given)."""
        emb = at_least_fp32(emb)
        keys = emb if earlier is None else torch.cat([at_least_fp32(earlier), emb])
        return F.normalize(emb @ keys.T, dim=1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None,
                earlier: tuple | None = None):
        """`earlier`: (student rows, teacher rows, labels) that precede the batch, without gradient."""
        s_keys, t_keys = (None, None) if earlier is None else earlier[:2]
        g_s, g_t = self.gram(student, s_keys), self.gram(teacher, t_keys).detach()
        loss = (g_s - g_t).pow(2).sum() / g_s.numel()
        return loss, {"sp": loss.detach()}


@register_term("rkd", title="RKD", needs=("teacher",), summary="relational KD: pairwise distances (weight 25) and triplet angles (weight "
                                          "50) matched to the teacher's", _builtin=True)
class RKDLoss(nn.Module):
    """Relational KD: distance term (pairwise distances over their mean, smooth-L1, weight 25) and angle term (cosine of
    the angle at each anchor j between i and k, smooth-L1, weight 50). The angle term builds an N x N x d tensor and
    N^3 angles: keep the global batch moderate (N = 512 at d = 512 takes about 0.5 GB)."""

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    @staticmethod
    def distances(emb: torch.Tensor) -> torch.Tensor:
        """Pairwise Euclidean distances divided by their mean over i != j."""
        emb = at_least_fp32(emb)
        sq = (emb * emb).sum(1)
        d2 = (sq[:, None] + sq[None, :] - 2 * emb @ emb.T).clamp_min(1e-12)
        off = ~torch.eye(len(emb), dtype=torch.bool, device=emb.device)
        d = torch.where(off, d2.sqrt(), torch.zeros_like(d2))  # sqrt only where it is differentiable
        return d / d[off].mean()

    @staticmethod
    def angles(emb: torch.Tensor) -> torch.Tensor:
        """cos of the angle at j between i and k: <unit(e_i - e_j), unit(e_k - e_j)>, flattened (N^3)."""
        emb = at_least_fp32(emb)
        diff = F.normalize(emb[None, :, :] - emb[:, None, :], dim=2)  # [j, i] = unit(e_i - e_j)
        return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None):
        with torch.no_grad():
            t_dist, t_angle = self.distances(teacher), self.angles(teacher)
        distance = F.smooth_l1_loss(self.distances(student), t_dist)
        angle = F.smooth_l1_loss(self.angles(student), t_angle)
        loss = self.distance_weight * distance + self.angle_weight * angle
        return loss, {"rkd_distance": distance.detach(), "rkd_angle": angle.detach()}
