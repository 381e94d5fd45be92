"""EKD's critical-pair miner (Huang et al., CVPR 2022): each model's thresholds at several FPRs, read from its own
negative-pair similarities and smoothed by momentum in buffers, and the critical pairs of a batch (every positive pair
and the top-k negatives by student similarity). EKD's rank loss (kd_plugin.methods.losses.ekd) reads them.

Cost: one top-k per model gives all the thresholds and the selected negatives; nothing is read on the host."""

from __future__ import annotations

import torch
from torch import nn

from kd_plugin.errors import SettingError
from kd_plugin.evaluation.fprs import DEFAULT_FPRS

UNRESOLVABLE = ("reference", "hold")
ANCHOR_INITS = ("zero", "first")


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
