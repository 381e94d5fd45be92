"""Consistent views (`kd.views`): student and teacher see exactly the same flipped, cropped and mixed image; a view
is a function of (views seed, epoch, sample), so a teacher-view cache keyed by (sample, epoch) serves every run that
repeats them — other methods and training seeds — with the same figures as the run that filled it."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

from conftest import assert_within_one_float16_unit
from distributed_helpers import run_ranks
from kd_plugin.run.config import check_hook_keys, resolve
from kd_plugin.data.datasets import UNLABELED, open_dataset
from kd_plugin.data.views import ViewSettings, draw_view, render_view
from kd_plugin.errors import KDPluginError
from test_train import _config, _losses, _registered_for_this_module, _teacher, ensure_registered, make_faces  # noqa: F401


@pytest.fixture()
def faces(tmp_path):
    return str(make_faces(tmp_path / "faces", identities=8, per_identity=6))


def _views_config(faces, teacher, output, views=None, **overrides):
    kd = {"method": "proxyless+l2", "teacher": teacher, "proxyless": {"centres": "estimate"},
          "sampler": {"identities_per_batch": 1, "images_per_identity": 2, "balanced": True},
          "views": dict({"enabled": True, "crop": 0.7, "mixup": 0.5, "mixed_labels": "drop"}, **(views or {}))}
    kd.update(overrides.pop("kd", {}))
    if "proxyless" not in kd["method"]:  # the head's block only where the head runs (config.kd refuses it elsewhere)
        del kd["proxyless"]
    return _config(faces, output, kd=kd, **overrides)


def test_a_view_is_a_function_of_its_seed_epoch_and_sample():
    settings = ViewSettings(crop=0.7, mixup=0.5, seed=3)
    assert draw_view(settings, 2, 17, 100) == draw_view(settings, 2, 17, 100)
    views = [draw_view(settings, epoch, index, 100) for epoch in range(5) for index in range(100)]
    assert all(len(set(views[i::100])) == 5 for i in range(100))  # ever-new: a sample's view changes every epoch
    areas = [v.box.height * v.box.width / 112 ** 2 for v in views]
    assert 0.65 < min(areas) < 0.75 and max(areas) <= 1.0  # the kept area: U(0.7, 1), up to rounding
    mixed = [v for v in views if v.partner >= 0]
    assert 0.42 < len(mixed) / len(views) < 0.58  # half of the samples, within 4 standard deviations
    assert all(v.partner != i % 100 for v, i in zip(views, range(500)) if v.partner >= 0)
    assert 0.4 < np.mean([v.lam for v in mixed]) < 0.6 and 0.35 < np.mean([v.box.flip for v in views]) < 0.65
    assert all(draw_view(ViewSettings(1.0, 0.0, 3), 0, i, 100).box.height * 100 == 11200 for i in range(20))
    assert draw_view(ViewSettings(0.7, 0.5, 4), 2, 17, 100) != draw_view(settings, 2, 17, 100)


def test_the_student_and_the_teacher_are_given_the_same_view(faces, tmp_path):
    from kd_plugin.run.train import Trainer

    trainer = Trainer(resolve(_views_config(faces, _teacher(tmp_path), tmp_path / "run", max_steps=2)))
    seen = {}
    embed, norm = trainer.teacher.embedder.embed, trainer.student_norm.torch
    trainer.teacher.embedder.embed = lambda images: (seen.setdefault("teacher", images.clone()), embed(images))[1]
    trainer.student_norm = type("Spy", (), {"torch": staticmethod(
        lambda images: (seen.setdefault("student", images.clone()), norm(images))[1])})()
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.loader))
    images, labels, indices = batch.images, batch.labels, batch.indices
    assert not batch.flips.any()  # the view decides the flip
    trainer.step(batch)
    assert torch.equal(seen["teacher"], seen["student"])  # every row, mixed or not: l2 needs no labels

    plain = open_dataset(faces)
    settings = ViewSettings(0.7, 0.5, 0)
    for image, label, index in zip(images, labels, indices.tolist()):
        view = draw_view(settings, 0, index, len(plain))
        partner = plain[(view.partner, False)][0] if view.partner >= 0 else None
        assert torch.equal(image, render_view(plain[(index, False)][0], view, partner))
        assert int(label) == (UNLABELED if view.partner >= 0 else int(plain.labels[index]))
    assert any(not torch.equal(image, plain[(i, False)][0]) for image, i in zip(images, indices.tolist()))
    assert (labels == UNLABELED).any() and (labels >= 0).any()


def test_a_batch_of_mixed_images_only_trains_the_label_free_terms(faces, tmp_path):
    from kd_plugin.run.train import Trainer

    config = _views_config(faces, _teacher(tmp_path), tmp_path / "run", kd={"method": "proxyless+ekd+l2"})
    trainer = Trainer(resolve(config))
    student = torch.randn(8, 16, requires_grad=True)
    loss, stats = trainer.objective(student, torch.full((8,), UNLABELED), torch.randn(8, 16))
    loss.backward()
    assert torch.isfinite(loss) and float(stats["loss_head"]) == 0.0 and "loss_ekd" not in stats
    assert float(loss.detach()) == pytest.approx(float(stats["loss_l2"]) * trainer.objective.weights["l2"])
    assert student.grad.abs().sum() > 0  # from the label-free term alone


def _run(config):
    from kd_plugin.run.train import Trainer

    trainer = Trainer(resolve(config))
    trainer.run()
    return trainer.teacher.teacher_rows


def test_the_view_cache_serves_other_runs_identically_and_the_teacher_runs_once_per_view(faces, tmp_path):
    teacher, cache = _teacher(tmp_path), str(tmp_path / "views")
    filling = _run(_views_config(faces, teacher, tmp_path / "first", {"cache": cache}))
    assert filling > 0
    again = _run(_views_config(faces, teacher, tmp_path / "again", {"cache": cache}))
    assert again == 0  # every view came from the cache
    first, second = _losses(tmp_path / "first"), _losses(tmp_path / "again")
    assert len(first) == 16 and [e["loss"] for e in first] == [e["loss"] for e in second]  # identical, to the bit
    # another method and another training seed show the same views: the teacher is not run again
    other = _views_config(faces, teacher, tmp_path / "other", {"cache": cache}, seed=11, kd={"method": "cosine"})
    assert _run(other) == 0
    # without a cache the teacher runs on every row, and the figures are those of the cached runs up to float16
    online = _run(_views_config(faces, teacher, tmp_path / "online"))
    assert online == 16 * 8
    for a, b in zip(first, _losses(tmp_path / "online")):
        assert b["loss_l2"] == pytest.approx(a["loss_l2"], rel=1e-2)
    # the filling run embedded each (sample, epoch) view once: a sample shown twice in an epoch came from the cache
    flags = sorted(glob.glob(f"{cache}/epoch_*.filled.npy"))  # one part per epoch: only the filling run wrote
    assert [os.path.basename(f).split(".")[0] for f in flags] == ["epoch_0000", "epoch_0001"]
    assert filling == sum(int(np.load(f).sum()) for f in flags) < online


def test_a_view_cache_made_with_other_settings_is_refused(faces, tmp_path):
    teacher, cache = _teacher(tmp_path), str(tmp_path / "views")
    _run(_views_config(faces, teacher, tmp_path / "first", {"cache": cache}, max_steps=1))
    with pytest.raises(KDPluginError, match=r"meta.json: the cache holds views made with views = .*'crop': 0.7.*"
                                            r"use another kd.views.cache folder"):
        _run(_views_config(faces, teacher, tmp_path / "second", {"cache": cache, "crop": 0.9}, max_steps=1))


MIXED = {"mixed_labels": "mix", "crop": 1.0, "shift": 3}  # mixup with labels on aligned, translated views


@pytest.mark.parametrize("views", [{}, MIXED], ids=["drop", "mix"])
def test_a_resume_mid_epoch_on_views_is_exact(faces, tmp_path, views):
    teacher = _teacher(tmp_path)
    _run(_views_config(faces, teacher, tmp_path / "straight", views, max_steps=8))
    _run(_views_config(faces, teacher, tmp_path / "resumed", views, max_steps=3))  # 8 steps an epoch: mid-epoch 0
    _run(_views_config(faces, teacher, tmp_path / "resumed", views, max_steps=8, resume=True))
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert [e["step"] for e in resumed] == list(range(1, 9))
    assert [e["loss"] for e in straight] == [e["loss"] for e in resumed]


def _in_group(rank, world, config):
    ensure_registered()
    _run(config)


@pytest.mark.parametrize("views", [{}, MIXED], ids=["drop", "mix"])
def test_two_gloo_ranks_on_views_with_one_shared_cache_train_like_one_process(faces, tmp_path, views):
    teacher = _teacher(tmp_path)
    kd = {"sampler": {"identities_per_batch": 2, "images_per_identity": 2, "balanced": True}}
    one = _views_config(faces, teacher, tmp_path / "one", {"cache": str(tmp_path / "cache_one"), **views},
                        batch_size=16, max_steps=4, kd=kd)
    two = _views_config(faces, teacher, tmp_path / "two", {"cache": str(tmp_path / "cache_two"), **views},
                        batch_size=8, max_steps=4)
    run_ranks(_in_group, 1, one)
    run_ranks(_in_group, 2, two)
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two"), strict=True):
        for key in ("loss", "loss_head", "loss_l2"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    # each rank wrote its own part; together they hold the views one process stored, each within one float16 unit
    # (the teacher's fp16 output may move by one unit with the batch it was computed in)
    one_parts, two_parts = (sorted(glob.glob(str(tmp_path / c / "epoch_0000.*.filled.npy")))
                            for c in ("cache_one", "cache_two"))
    assert len(one_parts) == 1 and len(two_parts) == 2
    one_rows, one_filled = _view_part(one_parts[0])
    two = [_view_part(p) for p in two_parts]
    assert np.array_equal(one_filled, np.logical_or(two[0][1], two[1][1]))
    for rows, filled in two:
        assert_within_one_float16_unit(rows[filled], one_rows[filled])


def _view_part(flags_path):
    return np.load(flags_path.replace(".filled.npy", ".npy")), np.load(flags_path).astype(bool)


@pytest.mark.parametrize("views, kd, message", [
    ({"enabled": False, "crop": 0.5}, {}, r"kd.views.crop = 0.5: applies only with kd.views.enabled = True"),
    ({"crop": 0.0}, {}, r"kd.views.crop = 0.0: expected the smallest share"),
    ({"mixup": 1.5}, {}, r"kd.views.mixup = 1.5: expected the share"),
    ({}, {"method": "proxyless+ekd"}, (r"kd.views.mixup = 0.5: a mixed image has no single identity .* "
                                       r"'proxyless\+ekd' has none: add one \(.*l2.*\) or set kd.views.mixup = 0")),
    ({}, {"cache": "cache_dir"}, (r"kd.cache = 'cache_dir': the cache holds the teacher's embeddings of each image "
                                  r"and its flip.*remove kd.cache")),
    ({}, {"margin_on_random_part": True}, r"kd.views.mixup = 0.5: kd.margin_on_random_part"),
    ({"cache": "v", "mixup": 0.0}, {"method": "none"}, r"kd.views.cache = 'v': method 'none' does not use the teacher"),
    ({"shift": 2.5}, {}, r"kd.views.shift = 2.5: expected the largest translation in pixels, an integer in \[0, 16\]"),
    ({"shift": 40}, {}, r"kd.views.shift = 40: expected"),
    ({"mixed_labels": "keep"}, {}, r"kd.views.mixed_labels = 'keep': expected 'drop' .* or 'mix'"),
    ({"enabled": False, "crop": 0.8, "mixed_labels": "drop"}, {}, r"kd.views.mixed_labels = 'drop': applies only with"),
])
def test_views_settings_that_would_not_be_honoured_are_refused(faces, views, kd, message):
    config = _views_config(faces, "t.onnx", "out", views, kd=kd)
    with pytest.raises(KDPluginError, match=message):
        resolve(config)


def test_the_train_v2_hook_refuses_views(faces):
    cfg = resolve(_views_config(faces, "t.onnx", "out"))
    with pytest.raises(KDPluginError, match=r"kd.views.enabled = True: under train_v2 upstream's data loader"):
        check_hook_keys(cfg)


def test_with_mixed_labels_a_mixed_image_feeds_the_head_and_the_views_need_no_label_free_term(faces):
    cfg = resolve(_views_config(faces, "t.onnx", "out", {"mixed_labels": "mix"}, kd={"method": "proxyless+ekd"}))
    assert cfg.kd.views.mixed_labels == "mix"
    # "mix" is the default: views with mixup and no label-free term need no setting beyond enabling them
    cfg = resolve(_views_config(faces, "t.onnx", "out", kd={"method": "proxyless+ekd", "views": {"enabled": True}}))
    assert (cfg.kd.views.mixed_labels, cfg.kd.views.mixup) == ("mix", 0.5)


def test_a_shift_translates_the_view_and_blackens_the_uncovered_border():
    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).reshape(3, 8, 8)
    from kd_plugin.data.views import Box, View

    moved = render_view(image, View(Box(0, 0, 8, 8, False, down=2, right=-1)))
    assert torch.equal(moved[:, 2:, :7], image[:, :6, 1:])
    assert moved[:, :2].eq(0).all() and moved[:, :, 7].eq(0).all()
    settings = ViewSettings(crop=1.0, mixup=0.0, seed=1, shift=3)
    boxes = [draw_view(settings, 0, i, 50).box for i in range(50)]
    assert {b.down for b in boxes} == set(range(-3, 4)) and {b.right for b in boxes} == set(range(-3, 4))
    assert all((b.top, b.left, b.height, b.width) == (0, 0, 112, 112) for b in boxes)  # aligned: no crop
    assert ViewSettings(0.8, 0.5, 0).as_dict() == {"crop": 0.8, "mixup": 0.5, "seed": 0}  # older caches stay valid


class _Rows(torch.nn.Module):
    """A term that needs labels and records the rows it was given."""

    def forward(self, student, teacher, labels):
        self.seen = labels.clone()
        return student.sum() * 0.0, {}


def test_the_lambda_weighted_head_loss_equals_the_hand_computed_mix():
    import torch.nn.functional as F

    from kd_plugin.methods.heads import CombinedMarginLoss, PartialFCHead
    from kd_plugin.host_syncs import count_host_syncs
    from kd_plugin.methods.objective import KDObjective

    torch.manual_seed(0)
    classes, dim, s, m = 6, 8, 64.0, 0.5
    centres = torch.randn(classes, dim)
    head = PartialFCHead(CombinedMarginLoss(s, 1.0, m, 0.0), dim, classes, centres=centres, rank=0, world_size=1)
    spy = _Rows()
    objective = KDObjective(head, {"pairs": (spy, 1.0)}, needs_teacher=False, unlabeled_rows=True,
                            mixed_labels=True)
    labels = torch.tensor([0, 1, 2, -1, 4, 5, 3])
    partners = torch.tensor([-1, 3, -1, 2, 5, 0, -1])  # row 2: mixed with an image without identity
    lam = torch.tensor([1.0, 0.7, 0.4, 0.25, 1.0, 0.1, 1.0])
    student = torch.randn(len(labels), dim, requires_grad=True)
    with count_host_syncs() as seen:
        loss, stats = objective(student, labels, mix=(partners, lam))
    assert dict(seen.by_call) == {"tolist": 1}  # the budget's one read for rows some terms skip
    loss.backward()

    reference = student.detach().clone().requires_grad_(True)
    cos = F.normalize(reference, dim=1) @ F.normalize(centres, dim=1).T

    def ce(row, label):
        logits = s * cos[row].clone()
        logits[label] = s * torch.cos(torch.acos(cos[row, label].clamp(-1, 1)) + m)
        return torch.logsumexp(logits, 0) - logits[label]

    terms, total = [], 0.0
    for row in range(len(labels)):
        mixed = bool(lam[row] < 1)
        if labels[row] >= 0:
            terms.append(lam[row] * ce(row, labels[row]))
            total += float(lam[row])
        if mixed and partners[row] >= 0:
            terms.append((1 - lam[row]) * ce(row, partners[row]))
            total += float(1 - lam[row])
    expected = torch.stack(terms).sum() / total
    expected.backward()
    assert float(stats["loss_head"]) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert torch.allclose(student.grad, reference.grad, rtol=1e-4, atol=1e-5 * float(reference.grad.abs().max()))
    assert spy.seen.tolist() == [0, 4, 3]  # the terms that need labels: unmixed labelled rows only
