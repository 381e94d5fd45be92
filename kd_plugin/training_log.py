"""arcface_torch's logging for `kd-plugin train`: rank 0 writes `<output>/training.log` and the console through stdlib
logging (`Training: <time>-<message>`, as upstream's init_logging), other ranks show warnings only; and upstream's
speed line every `frequent` steps, followed by every loss term and EKD diagnostic averaged over those steps.
Under train_v2 the hook logs to the same `kd_plugin` logger, which reaches upstream's own handlers."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Iterator

import torch

LOG = logging.getLogger("kd_plugin")
FORMAT = "Training: %(asctime)s-%(message)s"


@contextlib.contextmanager
def training_log(rank: int, output: str) -> Iterator[logging.Logger]:
    """Attach the handlers for one training run (rank 0: training.log + stdout at INFO; others: stderr, warnings),
    and take them off afterwards, so runs in one process never write into each other's files."""
    handlers: list[logging.Handler] = []
    if rank == 0:
        os.makedirs(output, exist_ok=True)
        handlers = [logging.FileHandler(os.path.join(output, "training.log")), logging.StreamHandler(sys.stdout)]
    else:
        handlers = [logging.StreamHandler(sys.stderr)]
        handlers[0].setLevel(logging.WARNING)
    for handler in handlers:
        handler.setFormatter(logging.Formatter(FORMAT))
        LOG.addHandler(handler)
    level, propagate = LOG.level, LOG.propagate
    LOG.setLevel(logging.INFO)
    LOG.propagate = False  # a program that embeds the trainer keeps its own root handlers out of it
    try:
        yield LOG
    finally:
        for handler in handlers:
            LOG.removeHandler(handler)
            handler.close()
        LOG.setLevel(level)
        LOG.propagate = propagate


class ScalarMeans:
    """Named scalars summed step by step, each averaged over the steps it appeared in (a figure may be absent on some
    steps). Tensors are summed on `device` where given (no host sync per step; some figures are CPU scalars), numbers
    as numbers; `pop()` reads every mean at once — one sync — and starts again."""

    def __init__(self) -> None:
        self.sums: dict = {}
        self.counts: dict[str, int] = {}

    def add(self, stats: dict, device=None) -> None:
        for key, value in stats.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().to(device or value.device)
            self.sums[key] = self.sums[key] + value if key in self.sums else (
                value.clone() if isinstance(value, torch.Tensor) else float(value))
            self.counts[key] = self.counts.get(key, 0) + 1

    def pop(self) -> dict[str, float]:
        tensors = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        means = {k: v / self.counts[k] for k, v in self.sums.items() if k not in tensors}
        if tensors:
            counts = torch.tensor([float(self.counts[k]) for k in tensors], device=self.sums[tensors[0]].device)
            means.update(zip(tensors, (torch.stack([self.sums[k] for k in tensors]) / counts).tolist()))
        order = list(self.sums)
        self.sums, self.counts = {}, {}
        return {k: means[k] for k in order}


class SpeedLine:
    """arcface_torch's CallBackLogging line, every `frequent` steps on rank 0, with the KD scalars after it."""

    def __init__(self, frequent: int, total_steps: int, global_batch: int, start_step: int) -> None:
        self.frequent, self.total_steps, self.global_batch = frequent, total_steps, global_batch
        self.start_step, self.start = start_step, time.time()
        self.tic = self.start
        self.means = ScalarMeans()
        self.steps = 0

    def __call__(self, step: int, epoch: int, stats: dict[str, float], lr: float,
                 grad_scale: float | None = None) -> None:
        self.means.add(stats)
        self.steps += 1
        if step % self.frequent and step != self.total_steps:
            return
        now = time.time()
        speed = self.steps * self.global_batch / max(now - self.tic, 1e-9)
        per_step = (now - self.start) / max(step - self.start_step, 1)
        hours = per_step * (self.total_steps - step) / 3600
        means = {k: v for k, v in self.means.pop().items() if k != "grad_scale"}
        scale = f"Fp16 Grad Scale: {grad_scale:2.0f}   " if grad_scale is not None else ""
        LOG.info(f"Speed {speed:.2f} samples/sec   Loss {means.get('loss', float('nan')):.4f}   LearningRate "
                 f"{lr:.6f}   Epoch: {epoch}   Global Step: {step}   {scale}Required: {hours:.1f} hours   "
                 + " ".join(f"{k}={v:.4g}" for k, v in means.items() if k != "loss"))
        self.steps, self.tic = 0, now
