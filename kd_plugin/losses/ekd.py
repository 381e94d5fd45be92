"""EKD, evaluation-oriented distillation (Huang et al., CVPR 2022), as a critical-pair miner plus a rank loss.

Per step, over the global batch's pairs i < j: each model reads thresholds at the FPRs (1e-1 ... 1e-6) from its own
negative-pair similarities (the floor(L * FPR)-th largest of its L negatives, 0-based), smoothed by momentum 0.01 in
buffers that start at 0. The critical pairs are all positive pairs and the top-k (2000) negatives by student
similarity. A pair's soft rank is r(v) = sum_k sigmoid((v - A_k) / tau), tau = 0.01, in fp32; the loss is
0.02 * mean over positives of (r_s - r_t)^2 + 0.01 * the same over the selected negatives.

Memory: selection runs without gradient and holds one N x N similarity matrix at a time (the student's, then the
teacher's); the gradient flows only through the selected pairs, recomputed as row dot products, so the autograd graph
is O(#selected pairs x d), not O(N^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_plugin.errors import KDPluginError
from kd_plugin.fprs import DEFAULT_FPRS
from kd_plugin.losses.precision import at_least_fp32
from kd_plugin.registry import register_term

UNRESOLVABLE = ("reference", "hold")
ANCHOR_INITS = ("zero", "first")


def soft_rank(values: torch.Tensor, anchors: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft count of the anchors each value exceeds: sum_k sigmoid(clamp((v - A_k) / tau, -50, 50))."""
    z = ((at_least_fp32(values)[:, None] - at_least_fp32(anchors)[None, :]) / tau).clamp(-50.0, 50.0)
    return torch.sigmoid(z).sum(dim=1)


class CriticalPairMiner(nn.Module):
    """Thresholds at several FPRs for both models (momentum-smoothed buffers) and the critical pairs of a batch.

    `unresolvable`: what a threshold does when the batch has fewer negatives than 1/FPR — "reference" reads index
    floor(L * FPR) = 0 (the hardest negative), as TFace does; "hold" leaves that anchor unchanged (the batch cannot
    measure it), and an anchor no batch has resolved yet takes no part in the soft ranks.
    `bias_correction`: divide the anchors by 1 - (1 - momentum)^steps (zero-initialised EMA made unbiased); off by
    default, as the reference. `anchor_init`: "zero" (the reference: anchors start at 0 and move 1% per step) or
    "first" (kd_plugin's option: an anchor's first update sets it to that batch's threshold — in "hold" mode the first
    batch that resolves it — and the EMA continues from there)."""

    def __init__(self, fprs=DEFAULT_FPRS, momentum: float = 0.01, top_k: int = 2000, unresolvable: str = "reference",
                 bias_correction: bool = False, anchor_init: str = "zero") -> None:
        super().__init__()
        if unresolvable not in UNRESOLVABLE:
            raise ValueError(f"unresolvable must be 'reference' or 'hold', got {unresolvable!r}")
        if anchor_init not in ANCHOR_INITS:
            raise ValueError(f"anchor_init must be one of {ANCHOR_INITS}, got {anchor_init!r}")
        if anchor_init == "first" and bias_correction:
            raise ValueError("anchor_init='first' starts the anchors at a batch's thresholds, so there is no zero "
                             "start to correct: drop bias_correction")
        self.anchor_init = anchor_init
        if not all(0 < f < 1 for f in fprs):
            raise ValueError(f"EKD FPRs must lie strictly between 0 and 1, got {list(fprs)}")
        self.inverse_fprs = [int(round(1.0 / f)) for f in fprs]  # integer division keeps floor(L / A) exact
        self.momentum, self.top_k = float(momentum), int(top_k)
        self.unresolvable, self.bias_correction = unresolvable, bool(bias_correction)
        self.register_buffer("student_anchors", torch.zeros(len(fprs)))
        self.register_buffer("teacher_anchors", torch.zeros(len(fprs)))
        self.register_buffer("anchor_updates", torch.zeros(len(fprs), dtype=torch.int64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def _batch_thresholds(self, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per FPR: the floor(L / A)-th largest negative (0-based) and whether the batch resolves it (L >= A)."""
        count = neg.numel()
        values, resolved = [], []
        for a in self.inverse_fprs:
            index = count // a
            values.append(torch.kthvalue(neg, count - index).values)  # (count - index)-th smallest, 1-based
            resolved.append(index >= 1)
        return torch.stack(values), torch.tensor(resolved, device=neg.device)

    def _update(self, name: str, batch: torch.Tensor, resolved: torch.Tensor, first: torch.Tensor) -> None:
        anchors = getattr(self, name)
        new = (1 - self.momentum) * anchors + self.momentum * batch
        if self.anchor_init == "first":  # an anchor's first update takes the batch's threshold, not 1% of it
            new = torch.where(first, batch, new)
        if self.unresolvable == "hold":
            new = torch.where(resolved, new, anchors)
        anchors.copy_(new)

    def active(self) -> torch.Tensor:
        """Which anchors take part in the soft ranks (all of them, except never-resolved ones in "hold" mode)."""
        if self.unresolvable == "hold":
            return self.anchor_updates > 0
        return torch.ones_like(self.anchor_updates, dtype=torch.bool)

    def anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (student, teacher) anchors the loss uses now."""
        if not self.bias_correction:
            return self.student_anchors, self.teacher_anchors
        n = self.anchor_updates.clamp_min(1).float()
        scale = 1.0 / (1.0 - (1.0 - self.momentum) ** n)
        return self.student_anchors * scale, self.teacher_anchors * scale

    @torch.no_grad()
    def forward(self, student_unit: torch.Tensor, teacher_unit: torch.Tensor, labels: torch.Tensor,
                earlier: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict | None:
        """Update the anchors from this batch and select its critical pairs; None when there is no negative pair.

        The pairs are each row of the batch with every row before it, in the order [earlier rows; batch]: `earlier`
        (student rows, teacher rows, labels; EKD's cross-batch memory) precede the batch, so without them the pairs
        are the batch's i < j. Returns the pair indices (pos_i, pos_j, neg_i, neg_j: the first into [earlier; batch],
        the second into the batch), the teacher similarities of those pairs, and the batch thresholds for the
        diagnostics."""
        n = len(labels)
        keys_s, keys_t, keys_l = (student_unit, teacher_unit, labels) if earlier is None else (
            torch.cat([earlier[0], student_unit]), torch.cat([earlier[1], teacher_unit]), torch.cat([earlier[2], labels]))
        p = len(keys_l) - n
        before = torch.ones(p + n, n, dtype=torch.bool, device=labels.device).triu_(1 - p)  # a < p + b
        same = keys_l[:, None] == labels[None, :]
        negative = before & ~same
        if not negative.any():
            return None
        pos_i, pos_j = torch.nonzero(before & same, as_tuple=True)
        sim = keys_s @ student_unit.T  # the student's matrix first, then the teacher's: never both
        student_batch, resolved = self._batch_thresholds(sim[negative])
        negatives = int(negative.sum())
        k = min(self.top_k, negatives)
        flat = torch.topk(sim.masked_fill_(~negative, -float("inf")).view(-1), k).indices
        neg_i, neg_j = flat // n, flat % n
        del sim
        sim = keys_t @ teacher_unit.T
        teacher_batch, _ = self._batch_thresholds(sim[negative])
        teacher_pos, teacher_neg = sim[pos_i, pos_j], sim[neg_i, neg_j]
        del sim
        first = self.anchor_updates == 0  # before this update: anchors no batch has set yet
        self._update("student_anchors", student_batch, resolved, first)
        self._update("teacher_anchors", teacher_batch, resolved, first)
        self.anchor_updates += resolved.long() if self.unresolvable == "hold" else 1
        self.steps += 1
        return {"pos_i": pos_i, "pos_j": pos_j, "neg_i": neg_i, "neg_j": neg_j, "teacher_pos": teacher_pos,
                "teacher_neg": teacher_neg, "student_batch": student_batch, "teacher_batch": teacher_batch,
                "resolved": resolved, "negatives": negatives}


def _check_config(kd: dict) -> None:
    block = kd["ekd"]
    if block["unresolvable"] not in UNRESOLVABLE:
        raise KDPluginError(f"config.kd.ekd.unresolvable = {block['unresolvable']!r}: allowed: "
                            f"{', '.join(repr(u) for u in UNRESOLVABLE)}")
    if block["anchor_init"] not in ANCHOR_INITS:
        raise KDPluginError(f"config.kd.ekd.anchor_init = {block['anchor_init']!r}: allowed: "
                            f"{', '.join(repr(a) for a in ANCHOR_INITS)}")
    if block["anchor_init"] == "first" and block["bias_correction"]:
        raise KDPluginError("config.kd.ekd.bias_correction = True: with anchor_init = 'first' the anchors start at a "
                            "batch's thresholds, so there is no zero start to correct: remove one of the two")
    if not isinstance(block["memory"], int) or block["memory"] < 0:
        raise KDPluginError(f"config.kd.ekd.memory = {block['memory']!r}: expected a number of rows >= 0 (0: no "
                            f"cross-batch memory, the reference)")


@register_term("ekd", title="EKD", needs=("teacher", "labels", "balanced"), baseline=False, check=_check_config,
               summary="evaluation-oriented KD (CVPR 2022): the student's soft ranks of the pairs that decide TPR at "
                       "low FPR pulled to the teacher's", _builtin=True)
class EKDLoss(nn.Module):
    """Evaluation-oriented KD over the global batch: `forward(student, teacher, labels) -> (loss, diagnostics)`.
    Teacher and student dims may differ (only each model's own cosines are compared).

    `memory` (kd_plugin's extension, off by default as the reference): a cross-batch memory (XBM, Wang et al., CVPR
    2020) of the last `memory` rows (student embedding, detached; teacher embedding; label), so the thresholds and the
    critical pairs come from each batch row paired with the memory's rows as well as the batch's own: at a global
    batch of 128 a memory of 4096 gives 532k pairs a step instead of 8,128. Rows enter after their step. Held in
    buffers (in the checkpoint), the same on every rank — EKD is computed identically on each rank from the gathered
    batch — so each rank holds memory x (student dim + teacher dim + 1) numbers: a fixed setting, not growing with the
    dataset or the classes. `anchor_init`: see CriticalPairMiner."""

    def __init__(self, fprs=DEFAULT_FPRS, momentum: float = 0.01, tau: float = 0.01, top_k: int = 2000,
                 positive_weight: float = 0.02, negative_weight: float = 0.01, unresolvable: str = "reference",
                 bias_correction: bool = False, memory: int = 0, anchor_init: str = "zero") -> None:
        super().__init__()
        if int(memory) < 0:
            raise ValueError(f"memory must be >= 0 rows (0: off), got {memory}")
        self.fprs = tuple(fprs)
        self.miner = CriticalPairMiner(fprs, momentum, top_k, unresolvable, bias_correction, anchor_init)
        self.tau, self.positive_weight, self.negative_weight = float(tau), float(positive_weight), float(negative_weight)
        self.memory = int(memory)
        # shaped (memory, dim) at the first step, when the dims are known (a checkpoint brings its own shape back)
        self.register_buffer("memory_student", torch.zeros(0, 0))
        self.register_buffer("memory_teacher", torch.zeros(0, 0))
        self.register_buffer("memory_labels", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("memory_rows", torch.zeros((), dtype=torch.int64))  # filled so far (at most `memory`)
        self.register_buffer("memory_next", torch.zeros((), dtype=torch.int64))  # where the next row goes

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor):
        with torch.autocast(student.device.type, enabled=False):  # tau = 0.01 makes the ranks steep: fp32 throughout
            s_unit = F.normalize(at_least_fp32(student), dim=1)
            t_unit = F.normalize(at_least_fp32(teacher.detach()), dim=1)
            labels = labels.view(-1)
            earlier = self._remembered()
            picked = self.miner(s_unit.detach(), t_unit, labels, earlier)
            if picked is None:  # a single identity: no negative pair, EKD skips the step
                self._remember(s_unit.detach(), t_unit, labels)
                zero = student.sum() * 0.0
                return zero, {"ekd_skipped": torch.ones(())}
            a_s, a_t = self.miner.anchors()
            active = self.miner.active()
            a_s, a_t = a_s[active], a_t[active]
            keys = s_unit if earlier is None else torch.cat([earlier[0], s_unit])  # earlier rows carry no gradient
            # the pairs read from one similarity matrix: each entry is read at most once, so the backward writes each
            # gradient once. Gathering the rows instead (keys[pos_i] * s_unit[pos_j]) sums repeated rows' gradients
            # in an order that varies with thread timing on CPU: runs then differ from the 5th step on.
            sim = keys @ s_unit.T
            s_pos, s_neg = sim[picked["pos_i"], picked["pos_j"]], sim[picked["neg_i"], picked["neg_j"]]
            self._remember(s_unit.detach(), t_unit, labels)  # after the pairs are read: `earlier` views the memory
            rank_pos_s, rank_pos_t = soft_rank(s_pos, a_s, self.tau), soft_rank(picked["teacher_pos"], a_t, self.tau)
            rank_neg_s, rank_neg_t = soft_rank(s_neg, a_s, self.tau), soft_rank(picked["teacher_neg"], a_t, self.tau)
            pos_loss = ((rank_pos_s - rank_pos_t) ** 2).mean() if len(s_pos) else s_unit.sum() * 0.0
            neg_loss = ((rank_neg_s - rank_neg_t) ** 2).mean()
            loss = self.positive_weight * pos_loss + self.negative_weight * neg_loss
        stats = {"ekd_positive": pos_loss.detach(), "ekd_negative": neg_loss.detach(),
                 "ekd_critical_positive": self._critical(s_pos, picked["teacher_pos"], a_s, a_t),
                 "ekd_critical_negative": self._critical(s_neg, picked["teacher_neg"], a_s, a_t),
                 "ekd_positive_pairs": torch.tensor(float(len(s_pos)), device=s_unit.device),
                 "ekd_skipped": torch.zeros((), device=s_unit.device)}
        if self.memory:
            stats["ekd_negative_pairs"] = torch.tensor(float(picked["negatives"]), device=s_unit.device)
        all_s, all_t = self.miner.anchors()
        for k, fpr in enumerate(self.fprs):
            stats[f"ekd_threshold_student@{fpr:.0e}"] = all_s[k].detach()
            stats[f"ekd_threshold_teacher@{fpr:.0e}"] = all_t[k].detach()
        return loss, stats

    def _remembered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        rows = int(self.memory_rows)
        if not self.memory or rows == 0:
            return None
        return self.memory_student[:rows], self.memory_teacher[:rows], self.memory_labels[:rows]

    @torch.no_grad()
    def _remember(self, s_unit: torch.Tensor, t_unit: torch.Tensor, labels: torch.Tensor) -> None:
        """Put this step's rows into the memory (a ring: the oldest rows leave first)."""
        if not self.memory:
            return
        if self.memory_student.shape != (self.memory, s_unit.shape[1]) or \
                self.memory_teacher.shape != (self.memory, t_unit.shape[1]):
            self.memory_student = s_unit.new_zeros(self.memory, s_unit.shape[1])
            self.memory_teacher = t_unit.new_zeros(self.memory, t_unit.shape[1])
            self.memory_labels = labels.new_zeros(self.memory)
            self.memory_rows.zero_()
            self.memory_next.zero_()
        s_unit, t_unit, labels = s_unit[-self.memory:], t_unit[-self.memory:], labels[-self.memory:]
        at = (int(self.memory_next) + torch.arange(len(labels), device=labels.device)) % self.memory
        self.memory_student[at], self.memory_teacher[at], self.memory_labels[at] = s_unit, t_unit, labels
        self.memory_next.fill_((int(self.memory_next) + len(labels)) % self.memory)
        self.memory_rows.fill_(min(int(self.memory_rows) + len(labels), self.memory))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("memory_student", "memory_teacher", "memory_labels"):  # sized at the first step: take the saved
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        if self.memory == 0:  # a checkpoint from before the memory existed resumes: no memory is an empty memory
            for name in ("memory_student", "memory_teacher", "memory_labels", "memory_rows", "memory_next"):
                state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    @torch.no_grad()
    def _critical(s: torch.Tensor, t: torch.Tensor, a_s: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
        """Pairs the two models place on different sides of at least one of their thresholds."""
        if len(s) == 0:
            return torch.zeros((), device=s.device)
        disagree = (s.detach()[:, None] > a_s[None, :]) != (t[:, None] > a_t[None, :])
        return disagree.any(dim=1).sum().float()
