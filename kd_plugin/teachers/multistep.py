"""PocketNet's multi-step distillation: the student learns from the teacher "at the same maturity" — at student epoch e
(0-based) the teacher checkpoint saved after the teacher's own epoch e + 1. The teacher run must have kept a
checkpoint per epoch (arcface_torch overwrites model.pt: save them, e.g. as `{step}backbone.pth` like PocketNet, or one
folder per epoch)."""

from __future__ import annotations

import os

from kd_plugin.errors import KDPluginError
from kd_plugin.losses.embedding import L2Loss
from kd_plugin.registry import add_term


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


class MultiStepTeacher:
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


def _check_config(kd: dict) -> None:
    """Multi-step KD: kd.teacher names the teacher's network, kd.multistep.checkpoints its per-epoch weights."""
    block = kd["multistep"]
    if not block["checkpoints"]:
        raise KDPluginError("config.kd.multistep.checkpoints = None: multi-step KD needs the teacher's per-epoch "
                            "checkpoints (a pattern with {epoch} or {step}, or a list)")
    from kd_plugin.networks import network_names

    if kd["teacher"] not in network_names():
        raise KDPluginError(f"config.kd.teacher = {kd['teacher']!r}: with multistep, kd.teacher is the teacher's "
                            f"network name (r100, mbf, ...; the weights come from kd.multistep.checkpoints)")
    if kd["cache"]:
        raise KDPluginError(f"config.kd.cache = {kd['cache']!r}: a cache holds one fixed teacher; multi-step KD "
                            f"changes the teacher every epoch: remove kd.cache")
    from kd_plugin.teachers.centres import DERIVED_CENTRES

    if kd["centres"] in DERIVED_CENTRES:
        raise KDPluginError(f"config.kd.centres = {kd['centres']!r}: with multistep the teacher changes every epoch: "
                            f"give a centres file or the teacher's classifier shards instead")
    try:
        MultiStepTeacherSchedule(kd["teacher"], block["checkpoints"], block["steps_per_epoch"])
    except ValueError as exc:
        raise KDPluginError(f"config.kd.multistep = {dict(block)!r}: {exc}") from None


def _teacher(kd, normalization, device, amp_dtype) -> MultiStepTeacher:
    schedule = MultiStepTeacherSchedule(kd.teacher, kd.multistep.checkpoints, kd.multistep.steps_per_epoch)
    return MultiStepTeacher(schedule, normalization, str(device), kd.teacher_batch_size, amp_dtype=amp_dtype)


def _term(checkpoints: str | list[str] | None = None, steps_per_epoch: int | None = None) -> L2Loss:
    """PocketNet's loss against the teacher of the same maturity: the L2 term (the block configures the teacher)."""
    return L2Loss()


add_term("multistep", _term, weight=100.0, title="PocketNet multi-step", needs=("teacher", "equal_dims"),
         check=_check_config, teacher=_teacher, _builtin=True,
         summary="PocketNet: the L2 term against the teacher checkpoint of the same maturity, switched every epoch "
                 "(weight 100)")
