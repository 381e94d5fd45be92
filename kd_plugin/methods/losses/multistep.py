"""PocketNet's multi-step distillation as a term: the L2 term against the teacher checkpoint of the student's epoch
(its schedule and the switching teacher: kd_plugin.teachers.multistep)."""

from __future__ import annotations

from kd_plugin.errors import KDPluginError
from kd_plugin.methods.losses.embedding import L2Loss
from kd_plugin.methods.registry import register_term
from kd_plugin.methods.heads import derives_centres
from kd_plugin.teachers.multistep import MultiStepTeacher, MultiStepTeacherSchedule


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
    if derives_centres(kd):
        head = kd["plan"].head
        raise KDPluginError(f"config.kd.{head}.centres = {kd[head]['centres']!r}: with multistep the teacher changes "
                            f"every epoch: give a centres file or the teacher's classifier shards instead")
    try:
        MultiStepTeacherSchedule(kd["teacher"], block["checkpoints"], block["steps_per_epoch"])
    except ValueError as exc:
        raise KDPluginError(f"config.kd.multistep = {dict(block)!r}: {exc}") from None


def _teacher(kd, normalization, device, amp_dtype) -> MultiStepTeacher:
    schedule = MultiStepTeacherSchedule(kd.teacher, kd.multistep.checkpoints, kd.multistep.steps_per_epoch)
    return MultiStepTeacher(schedule, normalization, str(device), kd.teacher_batch_size, amp_dtype=amp_dtype)


@register_term("multistep", weight=100.0, title="PocketNet multi-step", needs=("teacher", "equal_dims"),
               check=_check_config, teacher=_teacher, _builtin=True,
               summary="PocketNet: the L2 term against the teacher checkpoint of the same maturity, switched every "
                       "epoch (weight 100)")
class MultiStepLoss(L2Loss):
    """PocketNet's loss against the teacher of the same maturity: the L2 term. Its block says where the teacher run's
    per-epoch weights are — `checkpoints` (a list, or a pattern with {epoch} or {step}) and `steps_per_epoch` (for
    {step}) —, read by the teacher the run builds for it (`_teacher`), not by the loss."""

    def __init__(self, checkpoints: str | list[str] | None = None, steps_per_epoch: int | None = None) -> None:
        super().__init__()
        self.checkpoints, self.steps_per_epoch = checkpoints, steps_per_epoch
