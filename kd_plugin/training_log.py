"""A run's logging, the same for `kd-plugin train` and the train_v2 hook: `RunLog` (rank 0 writes
`<output>/train_log.jsonl`, tensorboard and a line on the `kd_plugin` logger), `StepLog` (the step scalars summed on
the device and read every `frequent` steps in one host synchronisation) and `console_figures` (what the line shows).
Under `kd-plugin train`, `training_log` attaches arcface_torch's handlers (`<output>/training.log` and the console,
`Training: <time>-<message>` as upstream's init_logging; other ranks show warnings only) and `SpeedLine` writes
upstream's speed line; under train_v2 the `kd_plugin` logger reaches upstream's own handlers."""

from __future__ import annotations

import contextlib
import json
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
        for key, value in stats.items():  # a figure computed on the host (a CPU scalar) joins the others' device
            value = value.detach().float().to(self.device, non_blocking=True)
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.nonfinite = self.nonfinite + (~torch.isfinite(loss.detach().to(self.device))).float()
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


class RunLog:
    """Where a run's records go, written by rank 0 (the other ranks' calls do nothing): one JSON object per line in
    `<output>/train_log.jsonl`, tensorboard scalars in `<output>/tensorboard` (tagged `<prefix>/<name>`), and a message
    on the `kd_plugin` logger (training.log and the console)."""

    def __init__(self, output: str, rank: int, prefix: str) -> None:
        self.output, self.rank, self.prefix = output, rank, prefix
        self.path = os.path.join(output, "train_log.jsonl")
        self._writer, self._opened = None, False

    def write(self, record: dict, message: str | None = None) -> None:
        """Append `record` to train_log.jsonl; log `message` when given."""
        if self.rank != 0:
            return
        if message:
            LOG.info(message)
        os.makedirs(self.output, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def scalars(self, figures: dict[str, float], step: int, prefix: str | None = None) -> None:
        """Each figure as a tensorboard scalar at `step` (tag `<prefix>/<name>`; prefix "" for the name alone)."""
        writer = self._tensorboard()
        if writer is None:
            return
        prefix = self.prefix if prefix is None else prefix
        for key, value in figures.items():
            writer.add_scalar(f"{prefix}/{key}" if prefix else key, value, step)
        writer.flush()

    def _tensorboard(self):
        if self.rank != 0:
            return None
        if not self._opened:
            self._opened = True
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; a broken install should not stop training
                return None
            self._writer = SummaryWriter(os.path.join(self.output, "tensorboard"))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer, self._opened = None, False
