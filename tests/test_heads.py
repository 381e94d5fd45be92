"""Margins and the partial-FC head: naive-reference gradients, frozen centres, sampling, and 1 vs 2/3 gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distributed_helpers import run_ranks
from kd_plugin.distributed import class_range
from kd_plugin.errors import KDPluginError
from kd_plugin.methods.heads import CombinedMarginLoss, PartialFCHead, class_draw

MARGINS = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4), "combined": (0.9, 0.4, 0.15)}


def naive_loss(emb, labels, centres, margin, s=64.0, classes=None):
    """Full softmax written out with plain autograd: cos(m1*acos(c) + m2) - m3 on the target, times s.
    `classes` restricts the softmax to a subset of classes (must hold every label)."""
    cos = F.normalize(emb, dim=1) @ F.normalize(centres, dim=1).T
    if classes is not None:
        cos, labels = cos[:, classes], torch.searchsorted(classes, labels)
    m1, m2, m3 = margin
    target = torch.cos(m1 * torch.acos(cos.gather(1, labels[:, None]).clamp(-1, 1)) + m2) - m3
    return F.cross_entropy(cos.scatter(1, labels[:, None], target) * s, labels)


@pytest.mark.parametrize("name", list(MARGINS))
def test_loss_and_gradient_equal_naive_full_softmax(name):
    torch.manual_seed(0)
    centres, emb, labels = torch.randn(40, 8), torch.randn(10, 8, requires_grad=True), torch.randint(0, 40, (10,))
    head = PartialFCHead(CombinedMarginLoss(64, *MARGINS[name]), 8, 40, centres=centres)
    loss = head(emb, labels)
    (grad,) = torch.autograd.grad(loss, emb)
    ref = naive_loss(emb, labels, centres, MARGINS[name])
    (ref_grad,) = torch.autograd.grad(ref, emb)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-6)


def test_margin_is_finite_at_theta_zero_and_pi_and_filters_interclass():
    margin = CombinedMarginLoss(64, 1.0, 0.5, 0.0)
    cos = torch.tensor([[1.0, -1.0, 0.2], [-1.0, 1.0, 0.3]], requires_grad=True)
    out = margin(cos, torch.tensor([0, 0]))
    # theta = 0: cos(0.5); theta = pi lies past the turn at pi - 0.5: the continuing line -1 + (c - cos(pi - 0.5))
    assert torch.allclose(out[:, 0], 64 * torch.tensor([math.cos(0.5), -2.0 - math.cos(math.pi - 0.5)]), atol=1e-4)
    out.sum().backward()
    assert torch.isfinite(cos.grad).all()
    filtering = CombinedMarginLoss(64, 1.0, 0.0, 0.4, interclass_filtering_threshold=0.25)
    out = filtering(torch.tensor([[0.9, 0.2, 0.3], [0.5, 0.5, 0.1]]), torch.tensor([0, -1]))
    expected = 64 * torch.tensor([[0.5, 0.2, 0.0], [0.0, 0.0, 0.1]])  # target keeps its value; negatives > 0.25 -> 0
    assert torch.allclose(out, expected)


MONOTONE_MARGINS = {**MARGINS, "combined_m1": (1.2, 0.4, 0.1), "arcface_large": (1.0, 0.8, 0.0)}


@pytest.mark.parametrize("name", list(MONOTONE_MARGINS))
def test_margin_pulls_every_sample_towards_its_centre_for_every_cosine(name):
    """The target logit rises with cos everywhere in [-1, 1] (so the loss never pushes a sample away from its own
    centre) and has no jump; the exact derivative is kept before the turn at theta = (pi - m2) / m1."""
    margin = CombinedMarginLoss(64, *MONOTONE_MARGINS[name])
    target = torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64)
    others = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64).expand(len(target), 3)
    cos = torch.cat([target[:, None], others], dim=1).requires_grad_(True)
    labels = torch.zeros(len(target), dtype=torch.long)
    logits = margin(cos, labels)
    (slope,) = torch.autograd.grad(logits[:, 0].sum(), cos, retain_graph=True)
    m1, m2, m3 = MONOTONE_MARGINS[name]
    c_turn = math.cos(min(math.pi, (math.pi - m2) / m1))
    away_from_turn = (target - c_turn).abs() > 1e-9
    assert (slope[away_from_turn, 0] > 0).all(), target[away_from_turn][slope[away_from_turn, 0] <= 0][:5]
    before = (target > c_turn) & (target < 1)
    exact = m1 * torch.sin(m1 * torch.acos(target[before]) + m2) / torch.sqrt(1 - target[before] ** 2)
    assert torch.allclose(slope[before, 0], 64 * exact, rtol=1e-6, atol=1e-9)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), cos)
    assert (grad[:, 0] <= 0).all()  # the loss pulls (or, fully classified, is flat)
    step = (logits[1:, 0] - logits[:-1, 0]).abs() / 64
    assert step.max() < 0.05  # continuous: neighbouring cosines 5e-4 apart never jump
    assert (logits[1:, 0] >= logits[:-1, 0] - 1e-12).all()  # the target logit never falls as cos rises


def test_inherited_centres_stay_bit_identical_and_outside_the_optimizer():
    torch.manual_seed(1)
    backbone = torch.nn.Linear(6, 8)
    head = PartialFCHead(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 30, centres=torch.randn(30, 8))
    assert "weight" in dict(head.named_buffers()) and not list(head.parameters())
    assert not head.weight.requires_grad
    before = head.weight.clone()
    opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}], lr=0.1, momentum=0.9,
                          weight_decay=5e-4)
    for _ in range(10):
        loss = head(backbone(torch.randn(12, 6)), torch.randint(0, 30, (12,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(head.weight, before)
    assert all(p is not head.weight for group in opt.param_groups for p in group["params"])
    assert set(opt.state) == set(backbone.parameters())  # momentum for the backbone only
    assert "weight" in head.state_dict()  # centres travel with checkpoints, like PartialFC_V2's shard


def test_trainable_mode_learns_like_partial_fc():
    head = PartialFCHead(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 30)
    assert isinstance(head.weight, torch.nn.Parameter) and head.weight.shape == (30, 8)
    head(torch.randn(5, 8), torch.randint(0, 30, (5,))).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_low_precision_centres_are_close_to_fp32():
    torch.manual_seed(2)
    centres, emb, labels = torch.randn(300, 16), torch.randn(9, 16), torch.randint(0, 300, (9,))
    margin = CombinedMarginLoss(64, 1.0, 0.5, 0.0)
    full = PartialFCHead(margin, 16, 300, centres=centres)(emb, labels)
    for dtype in (torch.float16, torch.bfloat16):
        head = PartialFCHead(margin, 16, 300, centres=centres, centre_dtype=dtype)
        assert head.weight.dtype == dtype
        assert head(emb, labels).item() == pytest.approx(full.item(), rel=2e-2)


def test_sampling_keeps_positives_and_matches_the_subset_reference():
    torch.manual_seed(3)
    centres, emb, labels = torch.randn(200, 8), torch.randn(16, 8, requires_grad=True), torch.randint(0, 200, (16,))
    head = PartialFCHead(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 200, sample_rate=0.3, centres=centres, seed=5)
    kept = class_draw(5, 0, 200) < 0.3
    kept[labels] = True
    subset = torch.nonzero(kept).squeeze(1)
    assert 40 < len(subset) < 100
    loss = head(emb, labels)
    ref = naive_loss(emb, labels, centres, MARGINS["arcface"], classes=subset)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert int(head.sample_step) == 1
    assert head(emb, labels).item() != pytest.approx(loss.item())  # the next step samples other negatives


def test_centre_shape_mismatch_names_both_shapes():
    with pytest.raises(KDPluginError, match=r"\(91180, 512\).*\(93431, 512\)"):
        PartialFCHead(CombinedMarginLoss(), 512, 93431, centres=torch.zeros(91180, 512))


def test_class_range_matches_partial_fc_v2_sharding():
    for classes, world in ((10, 3), (93431, 8), (5, 8)):
        ranges = [class_range(classes, r, world) for r in range(world)]
        assert sum(n for _, n in ranges) == classes
        assert all(ranges[r][0] == ranges[r - 1][0] + ranges[r - 1][1] for r in range(1, world))
        assert ranges[0][1] - ranges[-1][1] in (0, 1)


# --- distributed: each rank holds its class slice and part of the batch; results must equal one process ---------

SIZES = (5, 3, 4)  # per-rank batch sizes differ on purpose
CONFIGS = [(1.0, False), (0.5, False), (0.5, True)]  # (sample_rate, trainable)


def _two_steps(world, rank, sample_rate, trainable):
    """Loss and gradients (embeddings, and weights when trainable) of two steps; rank None = one process."""
    torch.manual_seed(4)
    emb_all, labels_all, centres = torch.randn(sum(SIZES), 8), torch.randint(0, 23, (sum(SIZES),)), torch.randn(23, 8)
    sizes = SIZES[:world]
    start, stop = (0, sum(sizes)) if rank is None else (sum(sizes[:rank]), sum(sizes[:rank + 1]))
    emb = emb_all[start:stop].clone().requires_grad_(True)
    head = PartialFCHead(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 23, sample_rate=sample_rate, seed=9,
                         centres=centres, trainable=trainable)
    results = []
    for _ in range(2):  # the second step checks that sampling moves on identically
        loss = head(emb, labels_all[start:stop])
        grads = torch.autograd.grad(loss, [emb] + ([head.weight] if trainable else []))
        results.append((loss.item(), [g.detach() for g in grads]))
    return results


def _ranked(rank, world):
    return [_two_steps(world, rank, *config) for config in CONFIGS]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_head_equals_one_process(world):
    ranks = run_ranks(_ranked, world)
    for c, config in enumerate(CONFIGS):
        single = _two_steps(world, None, *config)
        for step in range(2):
            ref_loss, ref_grads = single[step]
            for rank in range(world):
                loss, grads = ranks[rank][c][step]
                assert loss == pytest.approx(ref_loss, abs=1e-5), (config, rank)
                start = sum(SIZES[:rank])
                assert torch.allclose(grads[0], ref_grads[0][start:start + SIZES[rank]], atol=1e-5), (config, rank)
                if config[1]:  # trainable: each rank's weight gradient is its slice of the full one
                    c0, nc = class_range(23, rank, world)
                    assert torch.allclose(grads[1], ref_grads[1][c0:c0 + nc], atol=1e-5), (config, rank)


def test_bench_counts_classifier_memory_of_each_mode():
    """The benchmark's accounting (figures are printed by `kd-plugin bench head`, not asserted on timing here)."""
    from kd_plugin.benchmarks.head import run_one
    runs = {(m, s): run_one(m, 2000, s, 1.0, 64, 16, 1, "cpu") for m, s in
            (("trainable", "fp32"), ("inherited", "fp32"), ("inherited", "fp16"))}
    elements = 2000 * 64
    assert runs["trainable", "fp32"]["classifier_bytes"] == 3 * 4 * elements  # weight + grad + momentum
    assert runs["inherited", "fp32"]["classifier_bytes"] == 4 * elements  # the buffer only
    assert runs["inherited", "fp16"]["classifier_bytes"] == 2 * elements
    assert all(r["step_seconds"] > 0 and r["peak_bytes"] >= 0 for r in runs.values())


def test_float16_centres_give_the_float32_embedding_gradient_at_scale():
    """N = 1024 rows, 50k classes: the embedding gradient through fp16 inherited centres (upcast chunk by chunk, the
    one path on every device) is the fp32 centres' gradient up to the centres' own fp16 rounding — including the
    negative classes' tiny contributions, which a gradient cast down to fp16 would flush to zero."""
    torch.manual_seed(11)
    classes, n, dim = 50_000, 1024, 128
    centres = torch.nn.functional.normalize(torch.randn(classes, dim), dim=1)
    labels = torch.randint(0, classes, (n,))
    grads = []
    for dtype in (torch.float32, torch.float16):
        head = PartialFCHead(CombinedMarginLoss(64, 1.0, 0.5, 0.0), dim, classes, centres=centres, centre_dtype=dtype)
        assert head.weight.dtype == dtype
        embeddings = torch.randn(n, dim, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        (grad,) = torch.autograd.grad(head(embeddings, labels), embeddings)
        grads.append(grad)
    error = ((grads[1] - grads[0]).norm(dim=1) / grads[0].norm(dim=1)).max().item()
    assert error < 2e-3, error
    # late in training a negative class's probability is 1e-8 and below: its gradient through the fp16 centres keeps
    # fp32 precision (cast down to fp16 it would be a subnormal, rounded to a multiple of 6e-8, or zero)
    from kd_plugin.methods.heads import _FrozenCosine
    tiny = torch.rand(n, classes, generator=torch.Generator().manual_seed(5)) * 2e-8
    through = []
    for dtype in (torch.float32, torch.float16):
        embeddings = torch.zeros(n, dim, requires_grad=True)
        _FrozenCosine.apply(embeddings, centres.to(dtype)).backward(tiny)
        through.append(embeddings.grad)
    rounding = ((through[1] - through[0]).norm(dim=1) / through[0].norm(dim=1)).max().item()
    assert rounding < 2e-3, rounding
