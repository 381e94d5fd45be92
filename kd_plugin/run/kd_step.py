"""One KD step, the same for both ways in (`kd-plugin train`'s Trainer and the train_v2 hook's KD head): the teacher
for the epoch (multi-step KD switches it, and the switch is logged), the batch's teacher rows (from the rows the
loader read with the images, the teacher cache, the view cache or the frozen teacher on the very images the student
saw), the student's embeddings scaled for DDP's averaging, the KD objective, and the step's scalars summed on the
device (`log`, a StepLog, read every `frequent` steps by the caller, which `publish`es the means).

What stays with each way in: the student's forward and the optimizer (the Trainer's, or train_v2's own loop), and what
the logging step also reads (the Trainer: its stop request, GradScaler's scale and the speed line).

Host syncs per step: none here (the objective's own are kd_plugin.host_syncs's budget); the rows move to the device
`non_blocking` from the loader's pinned memory."""

from __future__ import annotations

from typing import Callable

import torch

from kd_plugin.data.batches import Batch
from kd_plugin.distributed import get_world_size, scale_grad
from kd_plugin.step_parts import NO_PARTS
from kd_plugin.training_log import RunLog, StepLog


class KDStep:
    """`objective`: the KDObjective; `teacher`: the run's TeacherFeed (None when no method needs the teacher);
    `records`: rank 0's RunLog; `device`: where the step's scalars are summed."""

    def __init__(self, objective, teacher, records: RunLog, device: torch.device) -> None:
        self.objective, self.teacher, self.records = objective, teacher, records
        self.world = get_world_size()
        self.log = StepLog(device)
        self.parts = NO_PARTS  # the step's parts a caller may time (kd_plugin.step_parts): "teacher"

    def switch_teacher(self, epoch: int, step: int) -> None:
        """Multi-step KD: the teacher of `epoch`, loaded (on every rank) and logged (rank 0) when it changes."""
        spec = None if self.teacher is None else self.teacher.set_epoch(epoch)
        if spec:
            self.records.write({"step": step, "epoch": epoch, "teacher": spec},
                               f"multi-step KD: epoch {epoch} learns from {spec}")

    def teacher_rows(self, batch: Batch | None, images: torch.Tensor | Callable[[], torch.Tensor],
                     device: torch.device, epoch: int, step: int) -> torch.Tensor | None:
        """The batch's float32 teacher embeddings on `device`, or None when no term needs them (e.g. ProxylessKD
        alone: the teacher only estimated the centres). `images`: the uint8 images the student saw, or a function
        returning them (called only when the teacher runs). `batch` None: a batch without side information (no
        cache rows, no indices), for which only the frozen teacher can run."""
        if not self.objective.needs_teacher:
            return None
        self.switch_teacher(epoch, step)
        with self.parts.span("teacher"):
            if batch is None:
                return self.teacher.embeddings(None, None, images, device, epoch=epoch)
            loaded = () if batch.rows is None else ((batch.rows,) if batch.known is None else (batch.rows, batch.known))
            return self.teacher.embeddings(batch.indices, batch.flips, images, device, epoch=epoch, loaded=loaded)

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor, batch: Batch | None,
                 images: torch.Tensor | Callable[[], torch.Tensor], epoch: int,
                 step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of this rank's rows (its gradient: the one-process gradient of the global batch, times W for DDP's
        averaging) and its scalars, added to `log`. `labels` on the embeddings' device."""
        device = embeddings.device
        teacher = self.teacher_rows(batch, images, device, epoch, step)
        mix = None
        if batch is not None and batch.mix is not None:
            mix = tuple(t.to(device, non_blocking=True) for t in batch.mix)
        # each rank's gradient is the one-process gradient of its rows; DDP averages over ranks: multiply by W once.
        # Every rank's batch holds batch_size rows (kd_plugin's sampler; train_v2's loader drops the last incomplete
        # batch), so the sizes need no exchange
        loss, stats = self.objective(scale_grad(embeddings.float(), self.world), labels.view(-1), teacher,
                                     sizes=[len(labels)] * self.world, mix=mix)
        self.log.add(stats, loss)
        return loss, stats

    def publish(self, step: int, epoch: int, means: dict[str, float], extra: dict | None = None,
                message: str | None = None) -> None:
        """A logging step's means (StepLog.read) on rank 0: one train_log.jsonl record and tensorboard scalars."""
        extra = extra or {}
        self.records.write({"step": step, "epoch": epoch, **extra, **means}, message)
        self.records.scalars({**means, **extra}, step)
