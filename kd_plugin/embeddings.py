"""Helpers on embeddings that several parts of kd_plugin share."""

from __future__ import annotations

import torch

from kd_plugin.errors import DimensionMismatch


def check_same_dims(student: torch.Tensor, teacher: torch.Tensor, methods: str) -> None:
    """The one equal-dimensions check: `methods` (their names) compare student and teacher embeddings directly, so
    both must have the same size; relational terms do not. Run by KDObjective for the plan's `equal_dims` methods on
    every batch, and by these terms and AdaDistill's update when used on their own."""
    if student.shape[1] != teacher.shape[1]:
        raise DimensionMismatch(f"{methods}: the student's embeddings have {student.shape[1]} dims, the teacher's "
                                f"{teacher.shape[1]}; these compare embeddings directly and need equal dims: set "
                                f"embedding_size = {teacher.shape[1]} or use a relational term (ekd, cckd, sp, rkd)")
