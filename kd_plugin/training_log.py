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
        """Every mean, read in one host synchronisation (one `.tolist()` of the stacked device sums)."""
        tensors = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        means = {k: v / self.counts[k] for k, v in self.sums.items() if k not in tensors}
        if tensors:
            means.update(zip(tensors, torch.stack([self.sums[k] / self.counts[k] for k in tensors]).tolist()))
        order = list(self.sums)
        self.sums, self.counts = {}, {}
        return {k: means[k] for k in order}


class StepLog:
    """The trainer's step scalars between two logging steps: summed on the device (no host synchronisation), then read
    every `frequent` steps in ONE synchronisation together with the stop request (SIGTERM on any rank) and the count of
    non-finite losses since the last read, after one all-reduce over the ranks so that every rank takes the same
    decision. The logged figures are the means over those steps and over the ranks (every rank computes the loss of
    the global batch, so this is rank 0's figure up to rounding)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.nonfinite = torch.zeros((), device=device)

    def add(self, stats: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        for key, value in stats.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.nonfinite = self.nonfinite + (~torch.isfinite(loss.detach())).float()
        self.steps += 1

    def read(self, stop_requested: bool, current: dict[str, torch.Tensor] | None = None
             ) -> tuple[dict[str, float], bool, int]:
        """(means since the last read, whether any rank asked to stop, non-finite losses on any rank since then);
        `current`: device scalars read as they are now (the GradScaler's scale), averaged over ranks only."""
        from kd_plugin.distributed import all_reduce_, collective_device, get_world_size

        keys, now = list(self.sums), dict(current or {})
        flags = torch.stack([torch.full((), float(stop_requested), device=self.device), self.nonfinite])
        vector = torch.cat([flags] + [self.sums[k].reshape(1) for k in keys]
                           + [now[k].float().reshape(1).to(self.device) for k in now]).to(collective_device())
        values = all_reduce_(vector, "sum").tolist()  # the one synchronisation
        world = get_world_size()
        scale = 1.0 / (max(1, self.steps) * world)
        means = {k: v * scale for k, v in zip(keys, values[2:2 + len(keys)])}
        means.update({k: v / world for k, v in zip(now, values[2 + len(keys):])})
        self.sums, self.steps = {}, 0
        self.nonfinite = torch.zeros((), device=self.device)
        return means, values[0] > 0, int(values[1])


def console_figures(figures: dict[str, float], skip: tuple[str, ...] = ()) -> str:
    """The scalars for a console and training.log line: the loss terms and EKD's pair counts, not its twelve per-FPR
    thresholds (those go to train_log.jsonl and tensorboard only; the line stays readable)."""
    return " ".join(f"{k}={v:.4g}" for k, v in figures.items()
                    if k not in skip and not k.startswith("ekd_threshold_"))


class SpeedLine:
    """arcface_torch's CallBackLogging line, written by rank 0 at each logging step, with the KD scalars after it."""

    def __init__(self, total_steps: int, global_batch: int, start_step: int) -> None:
        self.total_steps, self.global_batch = total_steps, global_batch
        self.start_step, self.start = start_step, time.time()
        self.tic, self.last_step = self.start, start_step

    def __call__(self, step: int, epoch: int, means: dict[str, float], lr: float,
                 grad_scale: float | None = None) -> None:
        now = time.time()
        speed = (step - self.last_step) * self.global_batch / max(now - self.tic, 1e-9)
        per_step = (now - self.start) / max(step - self.start_step, 1)
        hours = per_step * (self.total_steps - step) / 3600
        scale = f"Fp16 Grad Scale: {grad_scale:2.0f}   " if grad_scale is not None else ""
        LOG.info(f"Speed {speed:.2f} samples/sec   Loss {means.get('loss', float('nan')):.4f}   LearningRate "
                 f"{lr:.6f}   Epoch: {epoch}   Global Step: {step}   {scale}Required: {hours:.1f} hours   "
                 + console_figures(means, skip=("loss",)))
        self.last_step, self.tic = step, now
