"""EKD, evaluation-oriented distillation (Huang et al., CVPR 2022), as a critical-pair miner (ekd_miner.py) plus a
rank loss (here).

Per step, over the global batch's pairs i < j: each model reads thresholds at the FPRs (1e-1 ... 1e-6) from its own
negative-pair similarities (the floor(L * FPR)-th largest of its L negatives, 0-based), smoothed by momentum 0.01 in
buffers that start at 0. The critical pairs are all positive pairs and the top-k (2000) negatives by student
similarity. A pair's soft rank is r(v) = sum_k sigmoid((v - A_k) / tau), tau = 0.01, in fp32; the loss is
0.02 * mean over positives of (r_s - r_t)^2 + 0.01 * the same over the selected negatives.

Cost: one top-k per model gives all six thresholds and the selected negatives (the thresholds are the same values
torch.kthvalue gave, one call per FPR); nothing is read on the host (no .item(), no nonzero): the step keeps the
device busy. Memory: selection runs without gradient and holds one N x N similarity matrix at a time (the student's,
then the teacher's) and a top-k of at most max(top_k, pairs / 10) entries; the loss keeps the student's N x N
similarity matrix for the backward and ranks the positive pairs in blocks of rows that are recomputed in the
backward, so nothing of size pairs x FPRs is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kd_plugin.evaluation.fprs import DEFAULT_FPRS
from kd_plugin.methods.losses.ekd_miner import CriticalPairMiner, check_settings
from kd_plugin.methods.losses.precision import at_least_fp32
from kd_plugin.methods.memory import LEGACY_NAMES, CrossBatchMemory
from kd_plugin.methods.registry import register_term

def soft_rank(values: torch.Tensor, anchors: torch.Tensor, tau: float,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Soft count of the anchors each value exceeds: sum_k w_k sigmoid(clamp((v - A_k) / tau, -50, 50)), for values
    of any shape; `weights` (1 or 0 per anchor, default all 1) leaves anchors out without reading them on the host."""
    z = ((at_least_fp32(values)[..., None] - at_least_fp32(anchors)) / tau).clamp(-50.0, 50.0)
    ranks = torch.sigmoid(z)
    return (ranks if weights is None else ranks * weights).sum(dim=-1)


def _positive_gap(student_sim, teacher_keys, teacher_unit, mask, a_s, a_t, weights, tau):
    """sum over the masked pairs of (student rank - teacher rank)^2, for a block of rows (recomputed in backward)."""
    teacher_sim = teacher_keys @ teacher_unit.T
    gap = soft_rank(student_sim, a_s, tau, weights) - soft_rank(teacher_sim, a_t, tau, weights)
    return (gap.square() * mask).sum()


def _sides_differ(s, t, a_s, a_t, weights) -> torch.Tensor:
    """Whether the two models place a pair on different sides of at least one of their (active) thresholds."""
    return (((s[..., None] > a_s) != (t[..., None] > a_t)) & (weights > 0)).any(dim=-1)


ROW_BLOCK_ELEMENTS = 1 << 24  # positive pairs are ranked in blocks of rows of at most this many (pair, anchor) values


def _check_config(kd: dict) -> None:
    block = kd["ekd"]
    check_settings("config.kd.ekd.", **{key: block[key] for key in ("fprs", "unresolvable", "anchor_init",
                                                                     "bias_correction", "memory")})


@register_term("ekd", title="EKD", needs=("teacher", "labels", "balanced"), baseline=False, check=_check_config,
               summary="evaluation-oriented KD (CVPR 2022): the student's soft ranks of the pairs that decide TPR at "
                       "low FPR pulled to the teacher's", _builtin=True)
class EKDLoss(nn.Module):
    """Evaluation-oriented KD over the global batch: `forward(student, teacher, labels) -> (loss, diagnostics)`.
    Teacher and student dims may differ (only each model's own cosines are compared).

    `memory` (kd_plugin's extension, off by default as the reference): a cross-batch memory (XBM, Wang et al., CVPR
    2020, kd_plugin.methods.memory) of the last `memory` rows (student embedding, detached; teacher embedding; label),
    so the thresholds and the critical pairs come from each batch row paired with the memory's rows as well as the
    batch's own: at a global batch of 128 a memory of 4096 gives 532k pairs a step instead of 8,128. Rows enter after
    their step; the budget is the memory's (same on every rank, a fixed size). `anchor_init`: see CriticalPairMiner."""

    def __init__(self, fprs=DEFAULT_FPRS, momentum: float = 0.01, tau: float = 0.01, top_k: int = 2000,
                 positive_weight: float = 0.02, negative_weight: float = 0.01, unresolvable: str = "reference",
                 bias_correction: bool = False, memory: int = 0, anchor_init: str = "zero") -> None:
        super().__init__()
        check_settings("", memory=memory)  # the miner checks the others
        self.fprs = tuple(fprs)
        self.miner = CriticalPairMiner(fprs, momentum, top_k, unresolvable, bias_correction, anchor_init)
        self.tau, self.positive_weight, self.negative_weight = float(tau), float(positive_weight), float(negative_weight)
        self.memory = int(memory)
        # the ring of remembered rows (kd_plugin.methods.memory), holding EKD's form of a row: unit vectors in fp32
        self.bank = CrossBatchMemory(self.memory) if self.memory else None

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor):
        """No host synchronisation: counts stay on the device, a batch without a negative pair gives a zero loss
        (`ekd_skipped` 1) by arithmetic, not by a branch on the host. The positive pairs are ranked over the whole
        pair matrix in blocks of rows (at most ROW_BLOCK_ELEMENTS values each), recomputed in the backward, so the
        autograd graph holds the similarity matrix and one block, not pairs x anchors."""
        with torch.autocast(student.device.type, enabled=False):  # tau = 0.01 makes the ranks steep: fp32 throughout
            s_unit = F.normalize(at_least_fp32(student), dim=1)
            t_unit = F.normalize(at_least_fp32(teacher.detach()), dim=1)
            labels = labels.view(-1)
            earlier = self._remembered()
            if earlier is None and len(labels) < 2:  # no pair at all (known from the shape)
                self._remember(s_unit.detach(), t_unit, labels)
                zero = student.sum() * 0.0
                return zero, self._stats(zero, zero, zero, zero, zero, zero, torch.ones((), device=zero.device))
            picked = self.miner(s_unit.detach(), t_unit, labels, earlier)
            a_s, a_t = self.miner.anchors()
            weights = self.miner.active().float()
            # earlier rows carry no gradient; cat copies them, so the memory may be overwritten before the backward
            keys = s_unit if earlier is None else torch.cat([earlier[0], s_unit])
            keys_t = t_unit if earlier is None else torch.cat([earlier[1], t_unit])
            # the pairs read from one similarity matrix: each entry is read at most once, so the backward writes each
            # gradient once. Gathering the rows instead (keys[pos_i] * s_unit[pos_j]) sums repeated rows' gradients
            # in an order that varies with thread timing on CPU: runs then differ from the 5th step on.
            sim = keys @ s_unit.T
            self._remember(s_unit.detach(), t_unit, labels)
            positive = picked["positive"]
            block = max(1, ROW_BLOCK_ELEMENTS // max(1, positive.shape[1] * len(weights)))
            pos_sum, critical_pos = sim.new_zeros(()), sim.new_zeros(())
            for a in range(0, len(sim), block):
                rows = slice(a, a + block)
                pos_sum = pos_sum + checkpoint(_positive_gap, sim[rows], keys_t[rows], t_unit, positive[rows], a_s,
                                               a_t, weights, self.tau, use_reentrant=False)
                with torch.no_grad():
                    differ = _sides_differ(sim[rows], keys_t[rows] @ t_unit.T, a_s, a_t, weights) & positive[rows]
                    critical_pos = critical_pos + differ.sum()
            positives = positive.sum()
            pos_loss = pos_sum / positives.clamp_min(1)
            valid = picked["negative_valid"]
            s_neg, t_neg = sim.view(-1)[picked["negative_index"]], picked["teacher_neg"]
            gap = soft_rank(s_neg, a_s, self.tau, weights) - soft_rank(t_neg, a_t, self.tau, weights)
            neg_loss = (gap.square() * valid).sum() / valid.sum().clamp_min(1)
            measured = picked["measured"].float()  # 0: a single identity, no negative pair: the step is skipped
            pos_loss, neg_loss = pos_loss * measured, neg_loss * measured
            loss = self.positive_weight * pos_loss + self.negative_weight * neg_loss
            with torch.no_grad():
                critical_neg = (_sides_differ(s_neg, t_neg, a_s, a_t, weights) & valid).sum()
        return loss, self._stats(pos_loss, neg_loss, critical_pos * measured, critical_neg * measured,
                                 positives * measured, picked["negatives"], 1.0 - measured)

    def _stats(self, pos_loss, neg_loss, critical_pos, critical_neg, positives, negatives, skipped) -> dict:
        stats = {"ekd_positive": pos_loss.detach(), "ekd_negative": neg_loss.detach(),
                 "ekd_critical_positive": critical_pos.float(), "ekd_critical_negative": critical_neg.float(),
                 "ekd_positive_pairs": positives.float(), "ekd_skipped": skipped}
        if self.memory:
            stats["ekd_negative_pairs"] = negatives.float()
        all_s, all_t = self.miner.anchors()
        for k, fpr in enumerate(self.fprs):
            stats[f"ekd_threshold_student@{fpr:.0e}"] = all_s[k].detach()
            stats[f"ekd_threshold_teacher@{fpr:.0e}"] = all_t[k].detach()
        return stats

    def _remembered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        return None if self.bank is None else self.bank.earlier()

    def _remember(self, s_unit: torch.Tensor, t_unit: torch.Tensor, labels: torch.Tensor) -> None:
        if self.bank is not None:
            self.bank.add(s_unit, t_unit, labels)

    # the ring as EKDLoss exposed it before it had its own module (what tests and diagnostics read)
    memory_rows = property(lambda self: self._ring("rows"))
    memory_next = property(lambda self: self._ring("next"))
    memory_labels = property(lambda self: self._ring("labels"))

    def _ring(self, name: str) -> torch.Tensor:
        if self.bank is None:
            return torch.zeros((), dtype=torch.int64) if name in ("rows", "next") else torch.zeros(0, dtype=torch.int64)
        return getattr(self.bank, name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in LEGACY_NAMES.items():  # a checkpoint of kd_plugin <= 0.5: the ring's buffers were EKD's own
            if prefix + old in state_dict:
                value = state_dict.pop(prefix + old)
                if self.bank is not None:
                    state_dict.setdefault(f"{prefix}bank.{new}", value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
