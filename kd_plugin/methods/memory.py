"""A cross-batch memory for the pair-based terms (XBM, Wang et al., CVPR 2020): the last `size` rows of earlier steps
(student row without gradient, teacher row, label), so a term pairs each row of the batch with them as well as with
the batch's own rows.

    CrossBatchMemory(size)           the ring itself: `earlier()` -> (student, teacher, labels) or None, `add(...)`
    RememberingTerm(term, size)      any term whose forward takes `earlier` (rows that precede the batch) with a ring

EKD holds one (config.kd.ekd.memory); SP and CCKD take `earlier` and so can be wrapped. Budget: the ring is in buffers
(it travels in the checkpoint) and is the same on every rank (the terms compute on the gathered global batch), so a
rank holds size x (student dim + teacher dim + 1) numbers, a fixed setting that does not grow with the dataset or the
classes. Its position is kept on the host (it follows from the batch sizes alone) and mirrored in the buffers for the
checkpoint: no host read in a step.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_plugin.errors import SettingError

# the buffers' names before the ring had its own module (EKDLoss's, kd_plugin <= 0.5): old name -> name in the ring
LEGACY_NAMES = {"memory_student": "student", "memory_teacher": "teacher", "memory_labels": "labels",
                "memory_rows": "rows", "memory_next": "next"}


class CrossBatchMemory(nn.Module):
    """A ring of the last `size` rows; the oldest leave first. Shaped at the first `add`, when the dims are known (a
    checkpoint brings its own shape back)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise SettingError(f"CrossBatchMemory size = {size!r}: expected a number of rows >= 1")
        self.size = size
        self.register_buffer("student", torch.zeros(0, 0))
        self.register_buffer("teacher", torch.zeros(0, 0))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("rows", torch.zeros((), dtype=torch.int64))  # filled so far (at most `size`)
        self.register_buffer("next", torch.zeros((), dtype=torch.int64))  # where the next row goes
        self._filled, self._next = 0, 0  # the same two numbers on the host

    def earlier(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The remembered (student rows, teacher rows, labels), views into the ring (the next `add` overwrites them:
        a term that needs them after it copies them first), or None while empty."""
        rows = self._filled
        if rows == 0:
            return None
        return self.student[:rows], self.teacher[:rows], self.labels[:rows]

    @torch.no_grad()
    def add(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> None:
        """Put a step's rows into the ring (the newest `size` of them when the step has more)."""
        if self.student.shape != (self.size, student.shape[1]) or self.teacher.shape != (self.size, teacher.shape[1]):
            self.student = student.new_zeros(self.size, student.shape[1])
            self.teacher = teacher.new_zeros(self.size, teacher.shape[1])
            self.labels = labels.new_zeros(self.size)
            self.rows.zero_()
            self.next.zero_()
            self._filled = self._next = 0
        student, teacher, labels = student[-self.size:], teacher[-self.size:], labels[-self.size:]
        at = (self._next + torch.arange(len(labels), device=labels.device)) % self.size
        self.student[at], self.teacher[at], self.labels[at] = student, teacher, labels
        self._next = (self._next + len(labels)) % self.size
        self._filled = min(self._filled + len(labels), self.size)
        self.next.fill_(self._next)
        self.rows.fill_(self._filled)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("student", "teacher", "labels"):  # sized at the first step: take the saved shape
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._filled, self._next = int(self.rows), int(self.next)  # read once, at load


class RememberingTerm(nn.Module):
    """`term` with a cross-batch memory of `size` rows: each step the term gets the remembered rows as `earlier`
    (`term.forward(student, teacher, labels, earlier=None)`, the earlier rows without gradient), then the step's rows
    join the ring. `forward(student, teacher, labels) -> (loss, stats)`, like any term."""

    def __init__(self, term: nn.Module, size: int) -> None:
        super().__init__()
        self.term, self.memory = term, CrossBatchMemory(size)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor):
        earlier = self.memory.earlier()
        earlier = None if earlier is None else tuple(x.clone() for x in earlier)  # the add below overwrites the ring
        out = self.term(student, teacher, labels, earlier=earlier)
        self.memory.add(student.detach(), teacher.detach(), labels.view(-1))
        return out
