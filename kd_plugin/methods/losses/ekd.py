"""EKD, evaluation-oriented distillation (Huang et al., CVPR 2022), as a critical-pair miner plus a rank loss.

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

from kd_plugin.errors import SettingError
from kd_plugin.evaluation.fprs import DEFAULT_FPRS
from kd_plugin.methods.losses.precision import at_least_fp32
from kd_plugin.methods.registry import register_term

UNRESOLVABLE = ("reference", "hold")
ANCHOR_INITS = ("zero", "first")


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
        check_settings("", fprs=fprs, unresolvable=unresolvable, anchor_init=anchor_init,
                       bias_correction=bias_correction)
        self.anchor_init = anchor_init
        self.inverse_fprs = [int(round(1.0 / f)) for f in fprs]  # integer division keeps floor(L / A) exact
        self.register_buffer("_inverse", torch.tensor(self.inverse_fprs, dtype=torch.int64), persistent=False)
        self.momentum, self.top_k = float(momentum), int(top_k)
        self.unresolvable, self.bias_correction = unresolvable, bool(bias_correction)
        self.register_buffer("student_anchors", torch.zeros(len(fprs)))
        self.register_buffer("teacher_anchors", torch.zeros(len(fprs)))
        self.register_buffer("anchor_updates", torch.zeros(len(fprs), dtype=torch.int64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def _update(self, name: str, batch: torch.Tensor, resolved: torch.Tensor, first: torch.Tensor,
                measured: torch.Tensor) -> None:
        anchors = getattr(self, name)
        new = (1 - self.momentum) * anchors + self.momentum * batch
        if self.anchor_init == "first":  # an anchor's first update takes the batch's threshold, not 1% of it
            new = torch.where(first, batch, new)
        if self.unresolvable == "hold":
            new = torch.where(resolved, new, anchors)
        anchors.copy_(torch.where(measured, new, anchors))  # a batch without negatives changes nothing

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

    def _thresholds(self, descending: torch.Tensor, negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per FPR, from one model's negatives sorted in descending order (at least the first L // min(A) + 1 of
        them): the floor(L / A)-th largest (0-based) and whether the batch resolves it (L >= A). `negatives` (L) is a
        device tensor: nothing is read on the host."""
        index = negatives // self._inverse
        picked = descending.gather(0, index.clamp(max=len(descending) - 1))
        return picked, index >= 1

    @torch.no_grad()
    def forward(self, student_unit: torch.Tensor, teacher_unit: torch.Tensor, labels: torch.Tensor,
                earlier: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Update the anchors from this batch and select its critical pairs.

        The pairs are each row of the batch with every row before it, in the order [earlier rows; batch]: `earlier`
        (student rows, teacher rows, labels; EKD's cross-batch memory) precede the batch, so without them the pairs
        are the batch's i < j. Returns `positive` (the (P + N) x N mask of positive pairs), `negative_index` (the top_k
        negatives by student similarity, as flat indices into that matrix; `negative_valid` marks the real ones when
        there are fewer than top_k), `measured` (whether the batch has a negative pair at all: else the step is
        skipped), the counts, and the batch thresholds for the diagnostics.

        Without a host synchronisation: every count stays on the device and the shapes depend only on the batch size
        and the memory. Memory: one (P + N) x N fp32 similarity matrix at a time (the student's, then the teacher's),
        the pair masks, and one top-k of min(pairs, max(top_k, pairs // 10 + 1)) values and int64 indices per model —
        at a global batch of 4096 without memory, 8.4M pairs: 67 MB per matrix and 10 MB per top-k."""
        n = len(labels)
        keys_l = labels if earlier is None else torch.cat([earlier[2], labels])
        p = len(keys_l) - n
        before = torch.ones(p + n, n, dtype=torch.bool, device=labels.device).triu_(1 - p)  # a < p + b
        same = keys_l[:, None] == labels[None, :]
        negative = before & ~same
        count = negative.sum()  # L, on the device
        measured = count > 0
        pairs = (p + n) * n - n * (n + 1) // 2  # every pair a < p + b: known on the host from the shapes
        needed = min(pairs, pairs // min(self.inverse_fprs) + 1)  # the deepest threshold position, +1
        take = min(pairs, max(self.top_k, needed))
        keys_s = student_unit if earlier is None else torch.cat([earlier[0], student_unit])
        sim = (keys_s @ student_unit.T).masked_fill_(~negative, -float("inf")).view(-1)
        values, flat = torch.topk(sim, take)  # one top-k gives every threshold and the selected negatives
        student_batch, resolved = self._thresholds(values, count)
        k = min(self.top_k, pairs)
        negative_index, negative_valid = flat[:k], values[:k] > -float("inf")
        del sim
        keys_t = teacher_unit if earlier is None else torch.cat([earlier[1], teacher_unit])
        sim = (keys_t @ teacher_unit.T).masked_fill_(~negative, -float("inf")).view(-1)
        teacher_batch, _ = self._thresholds(torch.topk(sim, needed).values, count)
        teacher_neg = sim[negative_index]  # the selected negatives' teacher similarities (-inf where not valid)
        del sim
        first = self.anchor_updates == 0  # before this update: anchors no batch has set yet
        self._update("student_anchors", student_batch, resolved, first, measured)
        self._update("teacher_anchors", teacher_batch, resolved, first, measured)
        gained = (resolved & measured) if self.unresolvable == "hold" else measured.expand_as(resolved)
        self.anchor_updates += gained.long()
        self.steps += measured.long()
        return {"positive": before & same, "negative_index": negative_index, "negative_valid": negative_valid,
                "teacher_neg": teacher_neg, "student_batch": student_batch, "teacher_batch": teacher_batch,
                "resolved": resolved, "negatives": count, "measured": measured}


def check_settings(where: str, **settings) -> None:
    """EKD's settings, checked in one place: at config time (`where` = "config.kd.ekd.", before anything is built)
    and when EKDLoss / CriticalPairMiner are built directly (`where` = ""). Checks the settings given."""
    def fail(key: str, expected: str) -> None:
        raise SettingError(f"{where}{key} = {settings[key]!r}: {expected}")

    if "fprs" in settings and not all(0 < f < 1 for f in settings["fprs"]):
        fail("fprs", "EKD's FPRs must lie strictly between 0 and 1")
    if "unresolvable" in settings and settings["unresolvable"] not in UNRESOLVABLE:
        fail("unresolvable", f"allowed: {', '.join(repr(u) for u in UNRESOLVABLE)}")
    if "anchor_init" in settings and settings["anchor_init"] not in ANCHOR_INITS:
        fail("anchor_init", f"allowed: {', '.join(repr(a) for a in ANCHOR_INITS)}")
    if settings.get("anchor_init") == "first" and settings.get("bias_correction"):
        fail("bias_correction", "with anchor_init = 'first' the anchors start at a batch's thresholds, so there is no "
                                "zero start to correct: remove one of the two")
    if "memory" in settings and (isinstance(settings["memory"], bool) or not isinstance(settings["memory"], int)
                                 or settings["memory"] < 0):
        fail("memory", "expected a number of rows >= 0 (0: no cross-batch memory, the reference)")


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
        check_settings("", memory=memory)  # the miner checks the others
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
        self._filled, self._next = 0, 0  # the same two numbers on the host

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
        rows = self._filled
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
            self._filled = self._next = 0
        s_unit, t_unit, labels = s_unit[-self.memory:], t_unit[-self.memory:], labels[-self.memory:]
        at = (self._next + torch.arange(len(labels), device=labels.device)) % self.memory
        self.memory_student[at], self.memory_teacher[at], self.memory_labels[at] = s_unit, t_unit, labels
        # the ring's position is kept on the host (it follows from the batch sizes alone) and mirrored in the
        # buffers for the checkpoint: reading the buffers each step would stall the device
        self._next = (self._next + len(labels)) % self.memory
        self._filled = min(self._filled + len(labels), self.memory)
        self.memory_next.fill_(self._next)
        self.memory_rows.fill_(self._filled)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("memory_student", "memory_teacher", "memory_labels"):  # sized at the first step: take the saved
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        if self.memory == 0:  # a checkpoint from before the memory existed resumes: no memory is an empty memory
            for name in ("memory_student", "memory_teacher", "memory_labels", "memory_rows", "memory_next"):
                state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._filled, self._next = int(self.memory_rows), int(self.memory_next)  # read once, at load
