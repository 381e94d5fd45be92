"""Plain-text progress lines on stderr for long work: count, rate and ETA, at most one line every few seconds."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """`update(n)` as work completes; prints `desc: done/total (pct) rate unit/s ETA` now and then, and at the end."""

    def __init__(self, total: int, desc: str, unit: str = "it", interval: float = 5.0,
                 stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.interval = int(total), desc, unit, interval
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self.start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        """Record `n` more units of finished work."""
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.interval or self.done >= self.total):
            self._last = now
            elapsed = max(now - self.start, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            pct = 100.0 * self.done / self.total if self.total else 100.0
            print(f"{self.desc}: {self.done}/{self.total} ({pct:.0f}%) {rate:.1f} {self.unit}/s "
                  f"elapsed {elapsed:.0f}s ETA {eta:.0f}s", file=self.stream, flush=True)
