"""The composed KD objective: one gather, head + weighted terms, the same on 2 gloo ranks as on one process."""

from __future__ import annotations

import pytest
import torch

from distributed_helpers import run_ranks
from kd_plugin.methods.heads import AdaDistillHead, CombinedMarginLoss, PartialFCHead
from kd_plugin.methods.losses import CCKDLoss, EKDLoss, L2Loss, LogitKDLoss
from kd_plugin.methods.objective import KDObjective

SIZES = (8, 8)


def _objective(kind):
    torch.manual_seed(0)
    centres = torch.randn(10, 16)
    margin = CombinedMarginLoss(64, 1.0, 0.4, 0.0)
    if kind == "adadistill":
        return KDObjective(AdaDistillHead(margin, 16, 10, seed=1), {"l2": (L2Loss(), 100.0)})
    head = PartialFCHead(margin, 16, 10, centres=centres)
    terms = {"ekd": (EKDLoss(top_k=50), 1.0), "l2": (L2Loss(), 100.0), "cckd": (CCKDLoss(), 2.0),
             "logit": (LogitKDLoss(), 0.5)}
    return KDObjective(head, terms, margin_random_rows=4 if kind == "random_part" else None)


def _steps(world, rank, kind):
    torch.manual_seed(1)
    student_all, teacher_all = torch.randn(sum(SIZES), 16), torch.randn(sum(SIZES), 16)
    labels_all = torch.arange(sum(SIZES)) // 2 % 10
    start, stop = (0, sum(SIZES[:world])) if rank is None else (sum(SIZES[:rank]), sum(SIZES[:rank + 1]))
    objective = _objective(kind)
    out = []
    for step in range(2):
        local = (student_all[start:stop] + 0.1 * step).clone().requires_grad_(True)
        loss, stats = objective(local, labels_all[start:stop], teacher_all[start:stop])
        (grad,) = torch.autograd.grad(loss, local)
        out.append((loss.item(), grad, {k: float(v) for k, v in stats.items()}))
    return out


KINDS = ["terms", "adadistill"]


def _ranked(rank, world):
    return {kind: _steps(world, rank, kind) for kind in KINDS}


def test_objective_on_two_ranks_equals_one_process():
    ranks = run_ranks(_ranked, 2)
    for kind in KINDS:
        single = _steps(2, None, kind)
        for step in range(2):
            for rank in range(2):
                loss, grad, stats = ranks[rank][kind][step]
                assert loss == pytest.approx(single[step][0], rel=1e-5), kind
                start = sum(SIZES[:rank])
                assert torch.allclose(grad, single[step][1][start:start + SIZES[rank]], atol=1e-5), kind
                assert stats.keys() == single[step][2].keys()


def test_objective_sums_weighted_terms_and_needs_the_teacher():
    objective = _objective("terms")
    torch.manual_seed(2)
    student, teacher, labels = torch.randn(8, 16), torch.randn(8, 16), torch.arange(8) // 2
    loss, stats = objective(student, labels, teacher)
    expected = stats["loss_head"] + stats["loss_ekd"] + 100 * stats["loss_l2"] + 2 * stats["loss_cckd"] \
        + 0.5 * stats["loss_logit"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert "ekd_threshold_student@1e-01" in stats
    with pytest.raises(ValueError, match="need teacher embeddings"):
        objective(student, labels)


def test_margin_loss_on_the_random_part_only():
    torch.manual_seed(3)
    student, teacher, labels = torch.randn(8, 16), torch.randn(8, 16), torch.arange(8) // 2
    objective = _objective("random_part")  # each rank's first 4 rows are its random part
    loss, stats = objective(student, labels, teacher)
    reference = _objective("terms")
    head_only = reference.head.global_loss(student[:4], labels[:4])
    assert stats["loss_head"].item() == pytest.approx(head_only.item(), rel=1e-6)
    _, full = reference(student, labels, teacher)  # the terms still see all 8 rows
    assert stats["loss_l2"].item() == pytest.approx(full["loss_l2"].item(), rel=1e-6)
