"""A head added by one module: trainable centres that each step also move a little towards the mean teacher
embedding of their class in the batch (it reads the teacher), declared with register_head."""

from __future__ import annotations

import torch

from kd_plugin.methods.heads import PartialFCHead, head_arguments
from kd_plugin.methods.registry import register_head


class TeacherPullHead(PartialFCHead):
    reads_teacher = True

    def __init__(self, *args, pull: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pull, self.observed = float(pull), []

    @torch.no_grad()
    def observe(self, student, teacher, labels) -> None:
        self.observed.append((len(labels), None if teacher is None else tuple(teacher.shape)))
        local = labels - self.class_start
        owned = (local >= 0) & (local < self.num_local)
        target = torch.zeros_like(self.weight).index_add_(0, local[owned], teacher[owned].to(self.weight.dtype))
        counts = torch.zeros(self.num_local, device=self.weight.device).index_add_(
            0, local[owned], torch.ones(int(owned.sum()), device=self.weight.device))
        seen = counts > 0
        self.weight[seen] += self.pull * (target[seen] / counts[seen, None] - self.weight[seen])


def build(cfg, centres):
    return TeacherPullHead(*head_arguments(cfg), seed=cfg.seed, pull=cfg.kd.teacher_pull["pull"])


register_head("teacher_pull", build, defaults={"pull": 0.1}, needs=("teacher", "labels"), title="teacher pull",
              summary="trainable centres pulled towards the class's teacher embeddings each step")
