"""EKD's cross-batch memory and first-batch anchors (kd_plugin's extensions): the first step equals plain EKD, later
steps pair each row with the remembered rows, the memory is a ring that resumes from the checkpoint. 2 and 3 gloo
ranks against one process: `test_losses.test_relational_terms_across_ranks_equal_one_process` ("ekd_memory")."""

from __future__ import annotations

import pytest
import torch

from kd_plugin.run.config import resolve
from kd_plugin.errors import KDPluginError
from kd_plugin.methods.losses import EKDLoss


def _batch(step, n=24, dim=12):
    torch.manual_seed(100 + step)
    return torch.randn(n, dim), torch.randn(n, 20), torch.randint(0, 6, (n,))


def _step(term, step):
    student, teacher, labels = _batch(step)
    student.requires_grad_(True)
    loss, stats = term(student, teacher, labels)
    (grad,) = torch.autograd.grad(loss, student)
    return loss.detach(), grad, stats


def test_the_first_step_with_a_memory_equals_plain_ekd():
    plain, remembering = EKDLoss(top_k=50), EKDLoss(top_k=50, memory=64)
    loss, grad, stats = _step(plain, 0)
    loss_m, grad_m, stats_m = _step(remembering, 0)
    assert torch.equal(loss, loss_m) and torch.equal(grad, grad_m)
    assert stats_m.pop("ekd_negative_pairs").item() > 0
    assert stats.keys() == stats_m.keys() and all(torch.equal(stats[k], stats_m[k]) for k in stats)
    assert int(remembering.memory_rows) == 24 and int(plain.memory_rows) == 0


def test_later_steps_pair_each_row_with_the_remembered_rows_and_the_ring_keeps_the_newest():
    term = EKDLoss(top_k=50, memory=40)
    _step(term, 0)
    _, grad, stats = _step(term, 1)
    _, _, labels0 = _batch(0)
    _, _, labels1 = _batch(1)
    within = sum(int(labels1[i] != labels1[j]) for i in range(24) for j in range(i + 1, 24))
    across = int((labels0[:, None] != labels1[None, :]).sum())  # all 24 rows of step 0 are remembered
    assert stats["ekd_negative_pairs"].item() == within + across
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # 48 rows went in, 40 fit: the ring holds step 1's 24 rows and the last 16 of step 0
    assert int(term.memory_rows) == 40 and int(term.memory_next) == 8
    kept = torch.sort(term.memory_labels).values
    assert torch.equal(kept, torch.sort(torch.cat([labels0[8:], labels1])).values)


def test_the_memory_resumes_from_the_state_dict():
    straight = EKDLoss(top_k=50, memory=30, anchor_init="first")
    for step in range(2):
        _step(straight, step)
    resumed = EKDLoss(top_k=50, memory=30, anchor_init="first")
    resumed.load_state_dict(straight.state_dict())  # its memory buffers take the saved shape
    a, b = _step(straight, 2), _step(resumed, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_first_batch_anchors_start_at_the_batch_thresholds():
    reference, first = EKDLoss(top_k=50), EKDLoss(top_k=50, anchor_init="first")
    student, teacher, labels = _batch(0)
    reference(student, teacher, labels)
    first(student, teacher, labels)
    # the reference moves 1% of the way from 0; "first" takes the batch's thresholds, so it is 100x the reference's
    assert torch.allclose(first.miner.student_anchors, reference.miner.student_anchors / 0.01, atol=1e-6)
    assert torch.allclose(first.miner.teacher_anchors, reference.miner.teacher_anchors / 0.01, atol=1e-6)


@pytest.mark.parametrize("ekd, message", [
    ({"memory": -1}, r"config.kd.ekd.memory = -1: expected a number of rows >= 0"),
    ({"anchor_init": "mean"}, r"config.kd.ekd.anchor_init = 'mean': allowed: 'zero', 'first'"),
    ({"anchor_init": "first", "bias_correction": True}, r"config.kd.ekd.bias_correction = True: with anchor_init"),
])
def test_bad_memory_settings_are_refused(ekd, message):
    with pytest.raises(KDPluginError, match=message):
        resolve({"rec": "x", "num_classes": 2, "kd": {"method": "ekd", "teacher": "t.onnx", "ekd": ekd}})


def test_after_the_ring_wraps_the_remembered_rows_are_read_before_they_are_overwritten():
    import copy

    term = EKDLoss(top_k=50, memory=40)
    for step in range(2):  # 48 rows into 40: the ring has wrapped
        _step(term, step)
    reference = copy.deepcopy(term)  # the same state, reading copies of the remembered rows
    reference._remembered = lambda: tuple(x.clone() for x in EKDLoss._remembered(reference))
    a, b = _step(term, 2), _step(reference, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_checkpoint_from_before_the_memory_loads_into_ekd_without_one():
    old = {k: v for k, v in EKDLoss(top_k=50).state_dict().items() if not k.startswith("memory")}
    EKDLoss(top_k=50).load_state_dict(old)  # strict: no missing keys
