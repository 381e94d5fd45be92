"""Distillation terms: hand-computed cases, float64 gradchecks, EKD selection and state, 1 vs 2/3 gloo ranks."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from distributed_helpers import run_ranks
from kd_plugin.distributed import gather_no_grad, gather_with_grad, replicated_loss
from kd_plugin.methods.losses import CCKDLoss, CosineLoss, EKDLoss, L2Loss, RKDLoss, SPLoss
from kd_plugin.methods.losses.ekd import soft_rank


def test_hand_computed_embedding_terms():
    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    assert L2Loss()(s, t)[0].item() == pytest.approx(1.0)  # normalised (1,0) vs (0,1): mean of 1 and 1
    assert CosineLoss()(s, t)[0].item() == pytest.approx(1.0)
    assert CosineLoss()(s, s * 5)[0].item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="128 dims, the teacher's 512"):
        L2Loss()(torch.zeros(2, 128), torch.zeros(2, 512))


def test_hand_computed_cckd_and_sp():
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # identical rows: every cosine 1
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # orthogonal rows: off-diagonal cosine 0
    # k(1) = e^-0.8 (1 + 0.8 + 0.32); k(0) = e^-0.8; two off-diagonal entries differ by e^-0.8 * 1.12; mean over 4
    expected = 2 * (math.exp(-0.8) * 1.12) ** 2 / 4
    assert CCKDLoss(gamma=0.4, order=2)(s, t)[0].item() == pytest.approx(expected, rel=1e-6)
    assert CCKDLoss(gamma=0.4, order=1)(s, t)[0].item() == pytest.approx(2 * (math.exp(-0.8) * 0.8) ** 2 / 4, rel=1e-6)
    # SP: G_s = [[1,1],[1,1]] row-normalised -> 1/sqrt2 everywhere; G_t = I; ||.||^2 = 2((1-r)^2 + r^2) / 4
    r = 1 / math.sqrt(2)
    assert SPLoss()(s, t)[0].item() == pytest.approx(2 * ((1 - r) ** 2 + r ** 2) / 4, rel=1e-6)


def test_hand_computed_rkd():
    s = torch.tensor([[0.0], [1.0], [3.0]])  # distances 1, 3, 2 -> mean 2 -> 0.5, 1.5, 1.0
    t = torch.tensor([[0.0], [1.0], [2.0]])  # distances 1, 2, 1 -> mean 4/3 -> 0.75, 1.5, 0.75
    # smooth-L1 (beta 1) of 0.25 is 0.03125, for pairs (0,1) and (1,2), both orders, mean over 9 entries; the angles
    # of collinear points in the same order agree, so only the distance term (weight 25) remains
    loss, stats = RKDLoss()(s, t)
    assert stats["rkd_distance"].item() == pytest.approx(4 * 0.03125 / 9, rel=1e-5)
    assert stats["rkd_angle"].item() == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(25 * 4 * 0.03125 / 9, rel=1e-5)


def _unit(angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_ekd_hand_computed_selection_anchors_and_loss():
    labels = torch.tensor([0, 0, 1, 1])
    student = _unit([0.0, 10.0, 60.0, 100.0])  # negatives (0,2) cos60 (0,3) cos100 (1,2) cos50 (1,3) cos90
    teacher = _unit([0.0, 20.0, 40.0, 120.0])  # negatives (0,2) cos40 (0,3) cos120 (1,2) cos20 (1,3) cos100
    ekd = EKDLoss(fprs=(0.5, 0.25), top_k=2, tau=0.1)
    loss, stats = ekd(student, teacher, labels)
    picked = ekd.miner(_unit([0.0, 10.0, 60.0, 100.0]), teacher, labels)  # a second look at the same batch
    negatives = picked["negative_index"][picked["negative_valid"]]
    assert sorted(zip((negatives // 4).tolist(), (negatives % 4).tolist())) == [(0, 2), (1, 2)]  # student's top 2
    assert picked["positive"].nonzero().tolist() == [[0, 1], [2, 3]]
    cos = lambda d: math.cos(math.radians(d))  # noqa: E731
    # L = 4 negatives: FPR 0.5 -> index 2 of the descending list, 0.25 -> index 1
    s_batch, t_batch = [cos(90), cos(60)], [cos(100), cos(40)]  # student desc: 50,60,90,100; teacher desc: 20,40,100,120
    a_s = torch.tensor([0.01 * v for v in s_batch], dtype=torch.float64)  # first update of zero-initialised anchors
    a_t = torch.tensor([0.01 * v for v in t_batch], dtype=torch.float64)
    rank = lambda v, a: sum(1 / (1 + math.exp(-max(-50, min(50, (v - ak) / 0.1)))) for ak in a.tolist())  # noqa: E731
    pos = ((rank(cos(10), a_s) - rank(cos(20), a_t)) ** 2 + (rank(cos(40), a_s) - rank(cos(80), a_t)) ** 2) / 2
    neg = ((rank(cos(60), a_s) - rank(cos(40), a_t)) ** 2 + (rank(cos(50), a_s) - rank(cos(20), a_t)) ** 2) / 2
    assert loss.item() == pytest.approx(0.02 * pos + 0.01 * neg, rel=1e-6)
    assert stats["ekd_threshold_student@5e-01"].item() == pytest.approx(a_s[0].item())


def test_ekd_is_zero_for_identical_models_and_counts_critical_pairs():
    torch.manual_seed(0)
    emb, labels = torch.randn(48, 16), torch.arange(48) // 4
    loss, stats = EKDLoss()(emb.clone().requires_grad_(True), emb, labels)
    assert loss.item() == pytest.approx(0.0, abs=1e-9)
    assert stats["ekd_critical_positive"] == 0 and stats["ekd_critical_negative"] == 0
    ekd = EKDLoss(momentum=1.0)  # anchors = this batch's thresholds, to count sides directly
    _, stats = ekd(emb, -emb.flip(0), labels)
    assert stats["ekd_critical_negative"] > 0


def test_ekd_guards():
    torch.manual_seed(1)
    emb = torch.randn(6, 8, requires_grad=True)
    loss, stats = EKDLoss()(emb, torch.randn(6, 8), torch.arange(6))  # no positive pair: that term is 0, not NaN
    assert torch.isfinite(loss) and stats["ekd_positive"] == 0 and stats["ekd_positive_pairs"] == 0
    loss, stats = EKDLoss()(emb, torch.randn(6, 8), torch.zeros(6, dtype=torch.long))  # one identity: skipped
    assert loss.item() == 0 and stats["ekd_skipped"] == 1
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() == 0


def test_unresolvable_thresholds_and_bias_correction():
    torch.manual_seed(2)
    emb, teacher, labels = torch.randn(12, 8), torch.randn(12, 8), torch.arange(12) // 3  # 54 negative pairs
    reference, hold = EKDLoss(fprs=(1e-1, 1e-2)), EKDLoss(fprs=(1e-1, 1e-2), unresolvable="hold")
    for _ in range(3):
        reference(emb, teacher, labels)
        hold(emb, teacher, labels)
    # 1e-2 needs 100 negatives: the reference reads the hardest negative; "hold" leaves it out until resolved
    assert hold.miner.anchor_updates.tolist() == [3, 0] and hold.miner.active().tolist() == [True, False]
    assert hold.miner.student_anchors[1].item() == 0.0
    assert reference.miner.anchor_updates.tolist() == [3, 3] and reference.miner.active().all()
    hardest = (torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(emb, dim=1).T)[
        torch.triu(labels[:, None] != labels[None, :], 1)].max()
    assert reference.miner.student_anchors[1].item() == pytest.approx((1 - 0.99 ** 3) * hardest.item(), rel=1e-5)
    corrected = EKDLoss(fprs=(1e-1,), bias_correction=True)
    corrected(emb, teacher, labels)
    assert corrected.miner.anchors()[0].item() == pytest.approx(corrected.miner.student_anchors.item() / 0.01, rel=1e-5)


def test_anchors_survive_a_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    batches = [(torch.randn(16, 8), torch.randn(16, 8), torch.arange(16) // 4) for _ in range(4)]
    ekd = EKDLoss()
    for b in batches[:2]:
        ekd(*b)
    torch.save({"kd": ekd.state_dict()}, tmp_path / "checkpoint_gpu_0.pt")
    resumed = EKDLoss()
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint_gpu_0.pt", weights_only=True)["kd"])
    assert torch.equal(resumed.miner.student_anchors, ekd.miner.student_anchors)
    for b in batches[2:]:
        assert resumed(*b)[0].item() == ekd(*b)[0].item()


def _stateless(term):
    """A function of the student embeddings alone, with any running state reset before every call."""
    def fn(student, teacher, labels):
        return copy.deepcopy(term)(student, teacher, labels)[0]
    return fn


# EKD's thresholds and pair selection are constants of the step (no gradient flows through them): with momentum 0
# the anchors stay put and with top_k above the pair count the selection is fixed, so the rank loss is smooth
@pytest.mark.parametrize("term", [L2Loss(), CosineLoss(), CCKDLoss(), SPLoss(), RKDLoss(),
                                  EKDLoss(tau=0.5, momentum=0.0, top_k=1000)],
                         ids=["l2", "cosine", "cckd", "sp", "rkd", "ekd"])
def test_gradcheck_float64(term):
    torch.manual_seed(4)
    student = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    teacher, labels = torch.randn(8, 6, dtype=torch.float64), torch.arange(8) // 2
    fn = _stateless(term)
    assert torch.autograd.gradcheck(lambda s: fn(s, teacher, labels), (student,), eps=1e-6, atol=1e-5)


def _kthvalue_thresholds(values, fprs):
    """The reference's thresholds: per FPR, torch.kthvalue of the floor(L * FPR)-th largest (0-based)."""
    count = values.numel()
    return [torch.kthvalue(values, count - count // round(1 / f)).values.item() for f in fprs]


@pytest.mark.parametrize("n, labels_mod, memory", [(40, 5, 0), (64, 64, 0), (24, 3, 48), (7, 7, 0)])
def test_ekd_thresholds_from_one_topk_equal_the_kthvalue_of_each_fpr(n, labels_mod, memory):
    """The anchors after one step (momentum 1: the batch's thresholds) equal torch.kthvalue's per FPR, for batches
    that resolve some FPRs and not others, with and without remembered rows."""
    from kd_plugin.evaluation.fprs import DEFAULT_FPRS

    torch.manual_seed(n)
    ekd = EKDLoss(momentum=1.0, memory=memory, top_k=30)
    if memory:
        ekd(torch.randn(memory, 8), torch.randn(memory, 12), torch.arange(memory) % 11)
    student, teacher, labels = torch.randn(n, 8), torch.randn(n, 12), torch.arange(n) % labels_mod
    earlier = ekd._remembered()
    earlier = None if earlier is None else [x.clone() for x in earlier]  # the step overwrites the ring
    ekd(student, teacher, labels)
    for unit, mine, old in ((student, ekd.miner.student_anchors, 0), (teacher, ekd.miner.teacher_anchors, 1)):
        unit = torch.nn.functional.normalize(unit, dim=1)
        keys = unit if earlier is None else torch.cat([earlier[old], unit])
        key_labels = labels if earlier is None else torch.cat([earlier[2], labels])
        p = len(keys) - n
        before = torch.ones(p + n, n, dtype=torch.bool).triu_(1 - p)
        negatives = (keys @ unit.T)[before & (key_labels[:, None] != labels[None, :])]
        assert mine.tolist() == pytest.approx(_kthvalue_thresholds(negatives, DEFAULT_FPRS), abs=1e-6)


def test_soft_rank_counts_anchors_exceeded():
    r = soft_rank(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.0, 1.0]), tau=0.001)
    assert torch.allclose(r, torch.tensor([1.0, 0.0, 2.0]))


# --- distributed: replicated terms over the gathered batch give each rank the one-process gradient -----------------

SIZES = (10, 6, 8)
TERMS = {"ekd": lambda: EKDLoss(top_k=40), "cckd": CCKDLoss, "sp": SPLoss, "rkd": RKDLoss,
         "ekd_memory": lambda: EKDLoss(top_k=40, memory=16, anchor_init="first")}  # step 2 pairs with step 1's rows


def _data():
    torch.manual_seed(5)
    n = sum(SIZES)
    return torch.randn(n, 12), torch.randn(n, 20), torch.arange(n) // 3  # teacher dims differ on purpose


def _two_steps(world, rank, name):
    student_all, teacher_all, labels_all = _data()
    sizes = SIZES[:world]
    start, stop = (0, sum(sizes)) if rank is None else (sum(sizes[:rank]), sum(sizes[:rank + 1]))
    term = TERMS[name]()
    out = []
    for step in range(2):
        local = (student_all[start:stop] * (1 + step)).clone().requires_grad_(True)
        student = gather_with_grad(local)
        teacher, labels = gather_no_grad(teacher_all[start:stop]), gather_no_grad(labels_all[start:stop])
        loss = replicated_loss(term(student, teacher, labels)[0])
        (grad,) = torch.autograd.grad(loss, local)
        out.append((loss.item(), grad))
    return out


def _ranked(rank, world):
    return {name: _two_steps(world, rank, name) for name in TERMS}


@pytest.mark.parametrize("world", [2, 3])
def test_relational_terms_across_ranks_equal_one_process(world):
    ranks = run_ranks(_ranked, world)
    for name in TERMS:
        single = _two_steps(world, None, name)
        for step in range(2):
            for rank in range(world):
                loss, grad = ranks[rank][name][step]
                start = sum(SIZES[:rank])
                assert loss == pytest.approx(single[step][0], abs=1e-5), (name, rank)
                assert torch.allclose(grad, single[step][1][start:start + SIZES[rank]], atol=1e-5), (name, rank)


def test_ekd_benchmark_runs_and_reports_its_fields():
    """Behaviour only: the figures themselves come from `kd-plugin bench ekd`."""
    from kd_plugin.benchmarks.ekd import time_steps
    timing = time_steps(16, "tiny", 32, steps=1, device="cpu")
    assert timing["plain_seconds"] > 0 and timing["ekd_seconds"] > 0 and "overhead" in timing
