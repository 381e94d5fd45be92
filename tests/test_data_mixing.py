"""Training data as a list: several labelled sets in one class space, plus unlabelled images that only label-free
terms see, in a fixed number per batch — deterministic, split over ranks like one process, resumed exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import jpeg_bytes
from distributed_helpers import run_ranks
from kd_plugin.methods import registry
from kd_plugin.run.config import resolve
from kd_plugin.data.datasets import UNLABELED, open_training_data
from kd_plugin.data.sampler import IdentityBalancedBatchSampler
from kd_plugin.errors import KDPluginError
from kd_plugin.methods.registry import register_term
from test_train import _config, _losses, _registered_for_this_module, _teacher, make_faces  # noqa: F401


def flat_folder(root, count, offset=50_000):
    """Images without identity: one flat folder, as UTKFace's."""
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        (root / f"face_{i:03d}.jpg").write_bytes(jpeg_bytes(offset + i))
    return root


@pytest.fixture()
def sets(tmp_path):
    first = make_faces(tmp_path / "first", identities=8, per_identity=6)
    second = make_faces(tmp_path / "second", identities=5, per_identity=4)
    return str(first), str(second), str(flat_folder(tmp_path / "unlabelled", 20))


def test_labeled_sets_share_one_class_space_and_unlabeled_images_have_no_label(sets):
    first, second, unlabeled = sets
    data = open_training_data([first, second], unlabeled)
    assert (len(data), data.num_classes, data.num_labeled) == (48 + 20 + 20, 13, 68)
    assert np.array_equal(data.labels[:48], np.repeat(np.arange(8), 6))
    assert np.array_equal(data.labels[48:68], np.repeat(np.arange(8, 13), 4))  # offset by the first set's classes
    assert (data.labels[68:] == UNLABELED).all()
    image, label, index = data[(70, True)]
    assert image.shape == (3, 112, 112) and int(label) == UNLABELED and int(index) == 70
    assert "face_002.jpg" in data.where(70)
    assert data.class_counts().sum() == 68


def _batches(rank, world, labels, per_rank, identities, epochs=2):
    sampler = IdentityBalancedBatchSampler(labels, per_rank, identities, 2, seed=5, rank=rank, world_size=world,
                                           unlabeled_per_batch=per_rank // 4)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out, sampler.steps_per_epoch


def test_every_batch_holds_a_fixed_number_of_unlabeled_images_and_two_ranks_draw_one_process_batch(sets):
    labels = open_training_data(list(sets[:2]), sets[2]).labels
    single, steps = _batches(0, 1, labels, 16, 1)
    assert steps == 7  # an epoch is one pass of the 68 labelled images, 10 random rows a step
    seen = set()
    for batch in single[0]:
        rows = [labels[i] for i, _ in batch]
        assert all(r >= 0 for r in rows[:12]) and all(r == UNLABELED for r in rows[12:])  # 10 + 1 x 2, then 4
        seen |= {i for i, _ in batch[:10]}
    assert seen == set(range(68))  # the random part covers every labelled image in the epoch
    single, steps = _batches(0, 1, labels, 16, 2)  # 8 random + 2 x 2 balanced + 4 unlabelled
    ranks = [_batches(r, 2, labels, 8, 1)[0] for r in range(2)]  # each rank: 4 + 1 x 2 + 2
    for epoch in range(2):
        for step, batch in enumerate(single[epoch]):
            halves = [ranks[r][epoch][step] for r in range(2)]
            # the random, balanced and unlabelled parts of the two ranks together are the one-process parts
            assert sorted(batch[:8]) == sorted(halves[0][:4] + halves[1][:4])
            assert sorted(batch[8:12]) == sorted(halves[0][4:6] + halves[1][4:6])
            assert sorted(batch[12:]) == sorted(halves[0][6:] + halves[1][6:])


def test_unlabeled_settings_that_would_feed_nothing_are_refused(sets):
    base = {"rec": list(sets[:2]), "num_classes": 13}
    with pytest.raises(KDPluginError, match=r"kd.unlabeled = .*feed only the terms that need no labels, and method "
                                            r"'proxyless\+ekd' has none"):
        resolve(dict(base, kd={"method": "proxyless+ekd", "teacher": "t.onnx", "proxyless": {"centres": "c.pt"},
                               "unlabeled": {"data": sets[2], "per_batch": 2}}))
    with pytest.raises(KDPluginError, match="give both data .* and per_batch"):
        resolve(dict(base, kd={"method": "l2", "teacher": "t.onnx", "unlabeled": {"data": sets[2]}}))
    with pytest.raises(KDPluginError, match=r"config.rec = 7: expected a path, or a list of paths"):
        resolve({"rec": 7, "num_classes": 13})


@pytest.fixture()
def row_counters():
    """Two terms that report what they were given: one label-free, one that needs labels."""
    import kd_plugin.methods  # noqa: F401  (the built-ins first)


    class Rows(torch.nn.Module):
        def forward(self, student, teacher, labels):
            loss = (student - teacher).pow(2).mean()
            return loss, {"rows": torch.tensor(float(len(labels))), "lowest_label": labels.min().float()}

    with registry.restored():
        register_term("rows_label_free", needs=("teacher",))(type("RowsLabelFree", (Rows,), {}))
        register_term("rows_labelled", needs=("teacher", "labels"))(type("RowsLabelled", (Rows,), {}))
        yield


def _mixed_config(sets, teacher, output, **overrides):
    kd = {"method": "proxyless+rows_label_free+rows_labelled", "teacher": teacher, "proxyless": {"centres": "estimate"},
          "sampler": {"identities_per_batch": 1, "images_per_identity": 2, "balanced": True},
          "unlabeled": {"data": sets[2], "per_batch": 2}}
    return _config(sets[0], output, rec=list(sets[:2]), num_classes=13, batch_size=8, kd=kd, **overrides)


def test_only_label_free_terms_see_the_unlabeled_images_and_a_resume_mid_epoch_is_exact(sets, tmp_path,
                                                                                            row_counters):
    from kd_plugin.run.train import train

    teacher = _teacher(tmp_path)
    train(resolve(_mixed_config(sets, teacher, tmp_path / "straight", max_steps=6)))
    straight = _losses(tmp_path / "straight")  # per step: 4 random + 1 x 2 balanced labelled rows, 2 unlabelled
    assert all(e["loss_rows_label_free"] > 0 and e["loss_rows_labelled"] > 0 for e in straight)
    train(resolve(_mixed_config(sets, teacher, tmp_path / "resumed", max_steps=3)))  # 17 steps an epoch: mid-epoch
    train(resolve(_mixed_config(sets, teacher, tmp_path / "resumed", max_steps=6, resume=True)))
    resumed = _losses(tmp_path / "resumed")
    assert [e["step"] for e in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        for key in ("loss", "loss_head", "loss_rows_label_free", "loss_rows_labelled"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)


@pytest.mark.parametrize("term, rows, lowest", [("rows_label_free", 8.0, -1.0), ("rows_labelled", 6.0, 0.0)])
def test_what_each_kind_of_term_is_given(sets, tmp_path, row_counters, term, rows, lowest):
    from kd_plugin.run.train import train

    config = _mixed_config(sets, _teacher(tmp_path), tmp_path / term, max_steps=3)
    config["kd"]["method"] = f"proxyless+rows_label_free+{term}" if term == "rows_labelled" else "proxyless+" + term
    train(resolve(config))
    for entry in _losses(tmp_path / term):
        assert entry["rows"] == rows
        assert (entry["lowest_label"] == lowest) if lowest < 0 else (entry["lowest_label"] >= 0)


def _two_rank_losses(rank, world, config):
    from kd_plugin.run.train import train
    from test_train import ensure_registered

    ensure_registered()
    train(resolve(config))
    return None


def test_two_gloo_ranks_train_on_mixed_batches_like_one_process(sets, tmp_path):
    teacher = _teacher(tmp_path)
    kd = {"method": "proxyless+l2", "teacher": teacher, "proxyless": {"centres": "estimate"},
          "sampler": {"identities_per_batch": 1, "images_per_identity": 2, "balanced": True},
          "unlabeled": {"data": sets[2], "per_batch": 2}}
    one = _config(sets[0], tmp_path / "one", rec=list(sets[:2]), num_classes=13, batch_size=16, max_steps=4,
                  kd=dict(kd, sampler=dict(kd["sampler"], identities_per_batch=2), unlabeled=dict(kd["unlabeled"],
                                                                                                 per_batch=4)))
    two = _config(sets[0], tmp_path / "two", rec=list(sets[:2]), num_classes=13, batch_size=8, max_steps=4, kd=kd)
    run_ranks(_two_rank_losses, 1, one)
    run_ranks(_two_rank_losses, 2, two)
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two")):
        for key in ("loss", "loss_head", "loss_l2"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_the_cache_command_caches_the_training_data_as_a_config_lists_it(sets, tmp_path, capsys):
    from kd_plugin.cli import main
    from kd_plugin.teachers import load_cache

    out = tmp_path / "cache"
    assert main(["cache", "--teacher", _teacher(tmp_path), "--data", sets[0], sets[1], "--unlabeled", sets[2],
                 "--out", str(out), "--device", "cpu"]) == 0
    assert "88 images x 2" in capsys.readouterr().out
    cache = load_cache(str(out), open_training_data(list(sets[:2]), sets[2]))  # the run's dataset: accepted
    assert cache.get([87], [True]).shape == (1, 16)
