"""Hinton logit KD over sharded inherited centres, and PocketNet's multi-step teacher schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed_helpers import run_ranks
from kd_plugin.distributed import gather_no_grad
from kd_plugin.errors import KDPluginError
from kd_plugin.methods.heads import CombinedMarginLoss, PartialFCHead
from kd_plugin.methods.losses import logit as logit_module
from kd_plugin.methods.losses.logit import LogitKDLoss, _BlockedLogitKL
from kd_plugin.teachers.multistep import MultiStepTeacherSchedule


def _problem():
    torch.manual_seed(0)
    return torch.randn(11, 8), torch.randn(11, 8), torch.randint(0, 13, (11,)), torch.randn(13, 8)


def test_logit_kd_equals_kl_of_tempered_softmax():
    student, teacher, labels, centres = _problem()
    head = PartialFCHead(CombinedMarginLoss(), 8, 13, centres=centres)
    student = student.requires_grad_(True)
    loss, _ = LogitKDLoss(temperature=4.0, scale=64.0)(student, teacher, labels, head)
    unit = F.normalize(centres, dim=1)
    z_s, z_t = 16 * F.normalize(student, dim=1) @ unit.T, 16 * F.normalize(teacher, dim=1) @ unit.T
    ref = F.kl_div(F.log_softmax(z_s, 1), F.softmax(z_t, 1), reduction="batchmean") * 16
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    (g,), (g_ref,) = torch.autograd.grad(loss, student), torch.autograd.grad(ref, student)
    assert torch.allclose(g, g_ref, atol=1e-5)


def test_blocked_logit_kl_gradcheck_float64():
    unit = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1).requires_grad_(True)
    teacher = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    centres = F.normalize(torch.randn(7, 4, dtype=torch.float64), dim=1)
    for rows in (5, 2):  # one block, and three blocks of at most 2 rows
        assert torch.autograd.gradcheck(lambda u: _BlockedLogitKL.apply(u, teacher, centres, None, 3.0, rows), (unit,))


def test_logit_kd_memory_is_bounded_by_its_blocks_and_its_values_do_not_change(monkeypatch):
    """N = 64 rows, 5000 classes, blocks of 1000 logits (3 rows): what the autograd graph keeps is the embeddings,
    not N x C matrices; loss and gradient equal the plain computation."""
    torch.manual_seed(4)
    classes, n = 5000, 64
    head = PartialFCHead(CombinedMarginLoss(), 16, classes, centres=torch.randn(classes, 16))
    student, teacher = torch.randn(n, 16, requires_grad=True), torch.randn(n, 16)
    plain = 16 * F.normalize(student, dim=1) @ F.normalize(head.weight, dim=1).T, \
        16 * F.normalize(teacher, dim=1) @ F.normalize(head.weight, dim=1).T
    ref = F.kl_div(F.log_softmax(plain[0], 1), F.softmax(plain[1], 1), reduction="batchmean") * 16
    (g_ref,) = torch.autograd.grad(ref, student)
    monkeypatch.setattr(logit_module, "LOGIT_BLOCK_ELEMENTS", 1000)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        loss, _ = LogitKDLoss()(student, teacher, torch.zeros(n, dtype=torch.long), head)
    assert max(kept) <= classes * 16  # the centres themselves; no n x classes (320,000) logits
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.allclose(grad, g_ref, atol=1e-6)


SIZES = (6, 5)


def _step(world, rank):
    student_all, teacher_all, labels_all, centres = _problem()
    start, stop = (0, sum(SIZES)) if rank is None else (sum(SIZES[:rank]), sum(SIZES[:rank + 1]))
    head = PartialFCHead(CombinedMarginLoss(), 8, 13, centres=centres)
    local = student_all[start:stop].clone().requires_grad_(True)
    student, labels = head.gather(local, labels_all[start:stop])
    loss, _ = LogitKDLoss()(student, gather_no_grad(teacher_all[start:stop]), labels, head)
    (grad,) = torch.autograd.grad(loss, local)
    return loss.item(), grad


def _ranked(rank, world):
    return _step(world, rank)


def test_sharded_logit_kd_equals_one_process():
    single = _step(2, None)
    for rank, (loss, grad) in enumerate(run_ranks(_ranked, 2)):
        assert loss == pytest.approx(single[0], rel=1e-6)  # T^2 = 16 scales the float32 rounding
        assert torch.allclose(grad, single[1][sum(SIZES[:rank]):sum(SIZES[:rank + 1])], atol=1e-5)


def test_multistep_schedule_maps_student_epoch_to_teacher_epoch_plus_one(tmp_path):
    for step in (11372, 22744):
        (tmp_path / f"{step}backbone.pth").write_bytes(b"")
    schedule = MultiStepTeacherSchedule("r100", str(tmp_path / "{step}backbone.pth"), steps_per_epoch=11372)
    assert schedule.spec_for_epoch(0) == f"r100:{tmp_path / '11372backbone.pth'}"
    assert schedule.checkpoint_for_epoch(1) == str(tmp_path / "22744backbone.pth")
    with pytest.raises(KDPluginError, match="student epoch 2 needs the teacher checkpoint .*34116backbone.pth"):
        schedule.checkpoint_for_epoch(2)
    listed = MultiStepTeacherSchedule("r100", [str(tmp_path / "11372backbone.pth")])
    assert listed.checkpoint_for_epoch(0).endswith("11372backbone.pth")
    with pytest.raises(KDPluginError, match="only 1 teacher checkpoints"):
        listed.checkpoint_for_epoch(1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        MultiStepTeacherSchedule("r100", "x/{step}backbone.pth")
