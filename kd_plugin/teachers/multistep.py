"""PocketNet's multi-step distillation: the student learns from the teacher "at the same maturity" — at student epoch e
(0-based) the teacher checkpoint saved after the teacher's own epoch e + 1. The teacher run must have kept a
checkpoint per epoch (arcface_torch overwrites model.pt: save them, e.g. as `{step}backbone.pth` like PocketNet, or one
folder per epoch). The schedule and the teacher that follows it live here; the term is declared in
kd_plugin.methods.losses.multistep."""

from __future__ import annotations

import os

from kd_plugin.errors import KDPluginError
from kd_plugin.teachers.formats import Embedder


class MultiStepTeacherSchedule:
    """Which teacher checkpoint a student epoch uses.

    `checkpoints` is a list (entry k = the teacher after its epoch k + 1) or a pattern with `{epoch}` (the teacher's
    1-based epoch) or `{step}` (its global step after that epoch: (e + 1) * steps_per_epoch). The loss is PocketNet's
    L2 term (`l2`, weight 100) against the current teacher."""

    def __init__(self, network: str, checkpoints: str | list[str], steps_per_epoch: int | None = None) -> None:
        self.network, self.checkpoints, self.steps_per_epoch = network, checkpoints, steps_per_epoch
        if isinstance(checkpoints, str) and "{step}" in checkpoints and not steps_per_epoch:
            raise ValueError(f"teacher checkpoints {checkpoints!r} use {{step}}: give steps_per_epoch (the teacher "
                             f"run's steps per epoch, e.g. 11372 for MS1MV2 at global batch 512)")
        if isinstance(checkpoints, str) and "{step}" not in checkpoints and "{epoch}" not in checkpoints:
            raise ValueError(f"teacher checkpoints {checkpoints!r}: a pattern needs {{epoch}} or {{step}}, or pass a list")

    def checkpoint_for_epoch(self, epoch: int) -> str:
        """The teacher checkpoint for student epoch `epoch` (0-based); a missing file stops with its name."""
        if isinstance(self.checkpoints, str):
            path = self.checkpoints.format(epoch=epoch + 1, step=(epoch + 1) * (self.steps_per_epoch or 0))
        elif epoch < len(self.checkpoints):
            path = self.checkpoints[epoch]
        else:
            raise KDPluginError(f"multi-step KD: student epoch {epoch} needs the teacher after its epoch {epoch + 1}, "
                                f"but only {len(self.checkpoints)} teacher checkpoints are listed")
        if not os.path.isfile(path):
            raise KDPluginError(f"multi-step KD: student epoch {epoch} needs the teacher checkpoint {path} (the teacher "
                                f"after its epoch {epoch + 1}), which does not exist; keep one checkpoint per teacher "
                                f"epoch, or use single-step KD with the final teacher")
        return path

    def spec_for_epoch(self, epoch: int) -> str:
        """The teacher's model spec for student epoch `epoch`."""
        return f"{self.network}:{self.checkpoint_for_epoch(epoch)}"


class MultiStepTeacher(Embedder):
    """The teacher of multi-step KD as an embedder: `set_epoch(e)` loads the checkpoint of student epoch `e` (once per
    epoch), `embed` uses the current one. Every KD term sees this teacher."""

    def __init__(self, schedule: MultiStepTeacherSchedule, normalization=None, device: str = "cpu",
                 batch_size: int = 64, embedding_size: int | None = None, amp_dtype=None) -> None:
        self.schedule, self.normalization, self.device = schedule, normalization, device
        self.batch_size, self.embedding_size, self.amp_dtype = batch_size, embedding_size, amp_dtype
        self.epoch: int | None = None
        self.spec: str | None = None
        self._embedder = None

    def set_epoch(self, epoch: int) -> bool:
        """Switch to the teacher of student epoch `epoch`; True when a new checkpoint was loaded."""
        if epoch == self.epoch:
            return False
        from kd_plugin.teachers.spec import load_embedder

        spec = self.schedule.spec_for_epoch(epoch)
        self._embedder = load_embedder(spec, self.normalization, device=self.device, batch_size=self.batch_size,
                                       embedding_size=self.embedding_size, amp_dtype=self.amp_dtype)
        self.epoch, self.spec = epoch, spec
        return True

    def embed(self, images):
        if self._embedder is None:
            self.set_epoch(0)
        return self._embedder.embed(images)
