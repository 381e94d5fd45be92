"""Where a training step's time goes: the step code of both ways in marks its parts (`with parts.span("teacher"):`),
and a caller that wants the split sets a `PartClock` (`Trainer.time_parts`; `kd-plugin bench step` does). By default
the parts are `NO_PARTS`, whose spans do nothing: a run pays nothing for them.

The parts: student_forward, teacher, head, term_<name> (each distillation term), backward, optimizer (unscale, clip,
step, the scaler's update and zero_grad). A PartClock reads perf_counter on a CPU and records CUDA events on a GPU,
read after the step (`take`), outside the timed region: it adds no host synchronisation to the step."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class StepParts:
    """The parts not timed: every span is a no-op."""

    def span(self, name: str):
        return contextlib.nullcontext()


NO_PARTS = StepParts()


class PartClock(StepParts):
    """Seconds spent in each named part during a step; `take()` returns {part: seconds} of the spans since the last
    take (CUDA: waits for the device, so call it after the step)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list = []

    @contextlib.contextmanager
    def span(self, name: str):
        start = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            start.record()
        try:
            yield
        finally:
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.spans.append((name, start, end))
            else:
                self.spans.append((name, start, time.perf_counter()))

    def take(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        parts: dict[str, float] = defaultdict(float)
        for name, start, end in self.spans:
            parts[name] += start.elapsed_time(end) / 1000 if self.cuda else end - start
        self.spans = []
        return dict(parts)
