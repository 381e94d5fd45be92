"""The cross-batch memory as its own piece (kd_plugin.methods.memory): the ring, a pair-based term wrapped with it
(SP, CCKD), and EKD's memory held in it (with a checkpoint of the layout before, when the ring's buffers were EKD's)."""

import pytest
import torch

from kd_plugin.errors import SettingError
from kd_plugin.methods.losses import CCKDLoss, EKDLoss, SPLoss
from kd_plugin.methods.memory import CrossBatchMemory, RememberingTerm


def _batch(seed, n=6, ds=8, dt=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, ds, generator=g), torch.randn(n, dt, generator=g), torch.arange(n) % 3 + seed


def test_the_ring_keeps_the_newest_rows_and_says_none_while_empty():
    ring = CrossBatchMemory(10)
    assert ring.earlier() is None
    for seed in range(3):  # 18 rows into 10
        ring.add(*_batch(seed))
    student, teacher, labels = ring.earlier()
    newest = [_batch(1), _batch(2)]
    expected = torch.cat([newest[0][0][-4:], newest[1][0]])
    assert int(ring.rows) == 10 and int(ring.next) == 8 and student.shape == (10, 8) and teacher.shape == (10, 12)
    assert torch.equal(torch.sort(student, dim=0).values, torch.sort(expected, dim=0).values)
    assert sorted(labels.tolist()) == sorted(newest[0][2][-4:].tolist() + newest[1][2].tolist())
    with pytest.raises(SettingError, match="CrossBatchMemory size = 0: expected a number of rows >= 1"):
        CrossBatchMemory(0)


@pytest.mark.parametrize("term", [SPLoss, CCKDLoss])
def test_a_wrapped_pair_term_relates_each_batch_row_to_the_remembered_rows(term):
    wrapped, plain = RememberingTerm(term(), 16), term()
    first, second = _batch(0), _batch(1)
    assert torch.equal(wrapped(*first)[0], plain(*first)[0])  # nothing remembered yet: the plain term
    student = second[0].clone().requires_grad_(True)
    loss, _ = wrapped(student, second[1], second[2])
    by_hand, _ = plain(student, second[1], second[2], earlier=(first[0], first[1], first[2]))
    assert torch.allclose(loss, by_hand, rtol=1e-6, atol=0) and not torch.allclose(loss, plain(*second)[0])
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def _ekd_steps(term, seeds):
    return [term(*_batch(seed, n=12))[0] for seed in seeds]


def test_ekd_keeps_its_memory_in_the_ring_and_reads_a_checkpoint_of_the_layout_before():
    term = EKDLoss(top_k=20, memory=30, anchor_init="first")
    _ekd_steps(term, range(3))
    state = term.state_dict()
    assert {"bank.student", "bank.teacher", "bank.labels", "bank.rows", "bank.next"} <= set(state)
    legacy = {k.replace("bank.", "memory_"): v for k, v in state.items()}  # what kd_plugin 0.5 wrote
    resumed = EKDLoss(top_k=20, memory=30, anchor_init="first")
    resumed.load_state_dict(legacy)  # strict
    assert int(resumed.memory_rows) == 30 and int(resumed.memory_next) == int(term.memory_next)
    assert torch.equal(_ekd_steps(resumed, [3])[0], _ekd_steps(term, [3])[0])
    plain = EKDLoss(top_k=20)
    plain.load_state_dict({**plain.state_dict(), "memory_student": torch.zeros(0, 0)})  # 0.5's memory-less layout
    assert int(plain.memory_rows) == 0
