"""AdaDistill's adaptive centres: the update rule by hand, repeated classes in batch order, 1 vs 2/3 gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distributed_helpers import run_ranks
from kd_plugin.methods.heads import AdaDistillHead, CombinedMarginLoss


def _manual_updates(weight, student, teacher, labels, weighted=True):
    """The rule written out sample by sample, in batch order."""
    weight = weight.clone()
    for f_s, f_t, y in zip(student, teacher, labels.tolist()):
        t = f_t / f_t.norm()
        c = torch.dot(f_s / f_s.norm(), t)
        lam = torch.clamp(torch.dot(weight[y], t) / weight[y].norm(), 1e-6, 1.0)
        alpha = torch.clamp(c * lam, 1e-6, 1.0) if weighted else torch.clamp(c, 0.0, 1.0)
        weight[y] = alpha * weight[y] + (1 - alpha) * t
    return weight


def test_single_update_by_hand():
    head = AdaDistillHead(CombinedMarginLoss(64, 1.0, 0.45, 0.0), 2, 3)
    head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    student, teacher = torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 0.0]])  # cos(student, teacher) = 1/sqrt2
    head(student, torch.tensor([2]), teacher)
    # lambda = cos(W_2, f_t) = 1/sqrt2, alpha = (1/sqrt2)^2 = 0.5: W_2 <- 0.5 (1, 1) + 0.5 (1, 0)
    assert torch.allclose(head.weight, torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.5]]))
    poster = AdaDistillHead(CombinedMarginLoss(), 2, 3, weighted_alpha=False)
    poster.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    poster(student, torch.tensor([2]), teacher)
    a = 1 / math.sqrt(2)
    assert torch.allclose(poster.weight[2], torch.tensor([a + (1 - a), a]))


def test_repeated_classes_update_in_batch_order_and_loss_uses_updated_centres():
    torch.manual_seed(0)
    head = AdaDistillHead(CombinedMarginLoss(64, 1.0, 0.45, 0.0), 8, 5, seed=3)
    before = head.weight.clone()
    student, teacher = torch.randn(12, 8, requires_grad=True), torch.randn(12, 8)
    labels = torch.tensor([1, 3, 1, 1, 0, 3, 4, 1, 2, 0, 3, 3])
    loss = head(student, labels, teacher)
    expected = _manual_updates(before, student.detach(), teacher, labels)
    assert torch.allclose(head.weight, expected, atol=1e-6)
    cos = F.normalize(student, dim=1) @ F.normalize(expected, dim=1).T
    target = torch.cos(torch.acos(cos.gather(1, labels[:, None]).clamp(-1, 1)) + 0.45)
    ref = F.cross_entropy(cos.scatter(1, labels[:, None], target) * 64, labels)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert not list(head.parameters())  # nothing for the optimizer


SIZES = (7, 4, 5)


def _steps(world, rank, inherited=False):
    torch.manual_seed(1)
    n = sum(SIZES[:world])
    student_all, teacher_all = torch.randn(16, 8), torch.randn(16, 8)
    labels_all = torch.tensor([1, 3, 1, 1, 0, 3, 4, 1, 2, 0, 3, 3, 5, 6, 1, 6])
    start, stop = (0, n) if rank is None else (sum(SIZES[:rank]), sum(SIZES[:rank + 1]))
    centres = 3 * torch.randn(7, 8, generator=torch.Generator().manual_seed(9)) if inherited else None
    head = AdaDistillHead(CombinedMarginLoss(64, 1.0, 0.45, 0.0), 8, 7, seed=4, centres=centres)
    out = []
    for step in range(2):
        local = (student_all[start:stop] + step).clone().requires_grad_(True)
        loss = head(local, labels_all[start:stop], teacher_all[start:stop] * (1 + step))
        (grad,) = torch.autograd.grad(loss, local)
        out.append((loss.item(), grad, head.class_start, head.weight.clone()))
    return out


def _ranked(rank, world, inherited):
    return _steps(world, rank, inherited)


@pytest.mark.parametrize("inherited", [False, True], ids=["adadistill", "proxyless_adaptive"])
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_centres_equal_one_process(world, inherited):
    """AdaDistill's centres, and ProxylessKD's adaptive inherited centres (the same update from the teacher's
    classifier), on 2 and 3 gloo ranks equal one process."""
    ranks = run_ranks(_ranked, world, inherited)
    single = _steps(world, None, inherited)
    for step in range(2):
        full = torch.cat([ranks[r][step][3] for r in range(world)])  # each rank's slice, in rank order
        assert torch.allclose(full, single[step][3], atol=1e-6)
        for rank in range(world):
            loss, grad, _, _ = ranks[rank][step]
            start = sum(SIZES[:rank])
            assert loss == pytest.approx(single[step][0], abs=1e-5)
            assert torch.allclose(grad, single[step][1][start:start + SIZES[rank]], atol=1e-5)


def test_adaptive_inherited_centres_start_as_the_teachers_and_follow_the_plain_rule():
    """proxyless_adaptive: the head starts from the given (teacher) centres, normalised, then updates by AdaDistill's
    rule, written out sample by sample here."""
    torch.manual_seed(2)
    teacher_centres = 5 * torch.randn(5, 8)
    head = AdaDistillHead(CombinedMarginLoss(64, 1.0, 0.45, 0.0), 8, 5, centres=teacher_centres)
    assert torch.allclose(head.weight, F.normalize(teacher_centres, dim=1), atol=1e-6)
    student, teacher = torch.randn(12, 8), torch.randn(12, 8)
    labels = torch.tensor([1, 3, 1, 1, 0, 3, 4, 1, 2, 0, 3, 3])
    head(student, labels, teacher)
    expected = _manual_updates(F.normalize(teacher_centres, dim=1), student, teacher, labels)
    assert torch.allclose(head.weight, expected, atol=1e-6)


def test_proxyless_adaptive_is_a_head_with_the_teachers_centres_and_refuses_low_precision():
    from kd_plugin.run.config import resolve
    from kd_plugin.errors import KDPluginError

    cfg = resolve({"rec": "x", "num_classes": 4, "kd": {"method": "proxyless_adaptive+ekd", "teacher": "t.onnx",
                                                        "proxyless_adaptive": {"centres": "estimate"},
                                                        "ekd": {"memory": 64}}})
    assert cfg.kd.head == "proxyless_adaptive" and cfg.kd.terms == {"ekd": 1.0}
    with pytest.raises(KDPluginError, match="kd.proxyless_adaptive.centres"):
        resolve({"rec": "x", "num_classes": 4, "kd": {"method": "proxyless_adaptive", "teacher": "t.onnx"}})
    with pytest.raises(KDPluginError, match="kd.proxyless_adaptive.dtype = 'float16': unknown key"):
        resolve({"rec": "x", "num_classes": 4, "kd": {"method": "proxyless_adaptive", "teacher": "t.onnx",
                                                      "proxyless_adaptive": {"centres": "estimate",
                                                                             "dtype": "float16"}}})


def test_proxyless_adaptive_with_ekd_resumes_mid_epoch_exactly(tmp_path):
    """The adaptive inherited centres and EKD's memory are in the checkpoint: 3 steps, then resumed to 6, give the
    losses of 6 straight steps (mid-epoch: 8 steps an epoch)."""
    from kd_plugin.run.config import resolve
    from kd_plugin.run.train import train
    from test_train import _config, _losses, _teacher, ensure_registered, make_faces

    ensure_registered()
    try:
        data = make_faces(tmp_path / "faces", identities=8, per_identity=8)
        kd = {"method": "proxyless_adaptive+ekd", "teacher": _teacher(tmp_path),
              "proxyless_adaptive": {"centres": "estimate"},
              "ekd": {"memory": 32, "anchor_init": "first"},
              "sampler": {"identities_per_batch": 1, "images_per_identity": 2}}
        train(resolve(_config(data, tmp_path / "straight", max_steps=6, kd=kd)))
        train(resolve(_config(data, tmp_path / "resumed", max_steps=3, kd=kd)))
        train(resolve(_config(data, tmp_path / "resumed", max_steps=6, resume=True, kd=kd)))
        straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
        assert [e["step"] for e in resumed] == [1, 2, 3, 4, 5, 6]
        for a, b in zip(straight, resumed):
            for key in ("loss", "loss_head", "loss_ekd"):
                assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
    finally:
        from kd_plugin.networks import unregister_network
        unregister_network("test_tiny")
