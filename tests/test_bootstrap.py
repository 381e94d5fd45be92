"""The paired identity bootstrap of the CelebA benchmark: its TPR is the evaluation's on the original set, equal models
differ by exactly 0 on every resample, and a clearly better model's interval lies above 0."""

from __future__ import annotations

import numpy as np
import pytest

from kd_plugin.benchmarks.bootstrap import PairScores, difference_interval, paired_bootstrap
from kd_plugin.benchmarks.celeba_rows import parse_row, seeded_rows
from kd_plugin.errors import KDPluginError
from kd_plugin.evaluation import fpr_key, pair_score_blocks, roc_summary


def _embeddings(separation, seed, identities=30, per_identity=12, dim=32):
    g = np.random.default_rng(seed)
    labels = np.repeat(np.arange(identities), per_identity)
    centres = g.normal(size=(identities, dim))
    return (g.normal(size=(len(labels), dim)) + separation * centres[labels]).astype(np.float32), labels


def test_with_every_identity_drawn_once_it_is_the_evaluations_figure():
    emb, labels = _embeddings(0.5, 0)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    reference = roc_summary(lambda: pair_score_blocks(unit, labels), (1e-2, 1e-3))["tpr_at_fpr"]
    scores = PairScores(emb, labels)
    for fpr in (1e-2, 1e-3):
        assert scores.tpr(np.ones(30), fpr) == pytest.approx(reference[fpr_key(fpr)], abs=1e-12)


def test_paired_differences_are_exactly_zero_for_one_model_and_positive_for_a_better_one():
    emb, labels = _embeddings(0.45, 1)
    better, _ = _embeddings(0.9, 1)
    same = PairScores(emb, labels)
    tpr = paired_bootstrap({"a": [same], "b": [PairScores(emb, labels)], "better": [PairScores(better, labels)]},
                           identities=30, fpr=1e-2, resamples=200)
    assert np.array_equal(tpr["a"], tpr["b"])  # the same resamples for every model
    assert difference_interval(tpr["b"], tpr["a"]) == [0.0, 0.0]
    low, high = difference_interval(tpr["better"], tpr["a"])
    assert 0 < low < high
    assert tpr["a"].std() > 0  # the resamples differ from each other


def test_rows_and_their_settings_are_checked_against_the_registry():
    assert parse_row("proxyless+ekd@fit@memory") == ("proxyless+ekd", ("fit", "memory"))
    assert parse_row("student") == ("student", ())
    with pytest.raises(KDPluginError, match=r"'@memory' needs a method with ekd"):
        parse_row("l2@memory")
    with pytest.raises(KDPluginError, match=r"'@utk' needs a method with label-free"):
        parse_row("proxyless+ekd@utk")
    with pytest.raises(KDPluginError, match=r"unknown settings \['warp'\]"):
        parse_row("l2@warp")
    with pytest.raises(KDPluginError, match=r"unknown \['ekdd'\]"):
        parse_row("ekdd")
    rows = ["student", "l2", "proxyless", "proxyless@fit", "ekd", "ekd@memory", "proxyless+ekd",
            "proxyless+ekd@fit@memory", "l2@utk"]
    assert seeded_rows(rows) == ["student", "proxyless+ekd@fit@memory"]  # the headline: ProxylessKD+EKD, most settings
    # with the adaptive head among the rows, that is the headline; neither student nor headline: none
    assert seeded_rows(rows + ["proxyless_adaptive+ekd", "proxyless_adaptive+ekd@fit"]) == [
        "student", "proxyless_adaptive+ekd@fit"]
    assert seeded_rows(["l2", "ekd@memory"]) == []
