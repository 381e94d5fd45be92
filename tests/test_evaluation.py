"""Verification metrics against brute-force references, and the real teacher against the published figures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import TEACHER_DIR, shared
from kd_plugin.evaluation import (best_threshold, fpr_key, kfold_accuracy, pair_score_blocks, roc_summary)


def _brute_tpr(pos, neg, fpr):
    """Reference: the threshold is the floor(fpr*L)-th largest negative; accept strictly above it."""
    if fpr * len(neg) < 1:
        return None
    t = np.sort(neg)[::-1][int(np.floor(fpr * len(neg)))]
    return float(np.mean(pos > t))


def _brute_auc(pos, neg):
    """Mann-Whitney: P(pos > neg) + P(tie)/2, exactly, by counting against the sorted negatives."""
    neg = np.sort(neg)
    below, upto = np.searchsorted(neg, pos, "left"), np.searchsorted(neg, pos, "right")
    return float(np.sum(below + 0.5 * (upto - below)) / (len(pos) * len(neg)))


def test_best_threshold_and_kfold_match_brute_force():
    rng = np.random.default_rng(0)
    issame = rng.random(200) < 0.5
    scores = np.round(rng.normal(issame * 0.6, 0.4), 2)  # rounded: many ties
    t = best_threshold(scores, issame)
    grid = np.concatenate([np.unique(scores) - 1e-9, [scores.max() + 1]])
    best = max(np.mean((scores > g) == issame) for g in grid)
    assert np.mean((scores > t) == issame) == pytest.approx(best)
    acc, std, per_fold = kfold_accuracy(scores, issame)
    folds = np.array_split(np.arange(200), 10)
    expected = []
    for test in folds:
        train = np.setdiff1d(np.arange(200), test)
        cands = np.concatenate([np.unique(scores[train]) - 1e-9, [scores.max() + 1]])
        accs = [np.mean((scores[train] > g) == issame[train]) for g in cands]
        # any accuracy-maximising cut on the train folds is fine; check ours is one of them
        assert np.mean((scores[train] > best_threshold(scores[train], issame[train])) == issame[train]) == pytest.approx(max(accs))
        expected.append(np.mean((scores[test] > best_threshold(scores[train], issame[train])) == issame[test]))
    assert acc == pytest.approx(np.mean(expected)) and std == pytest.approx(np.std(expected))
    assert len(per_fold) == 10


def test_roc_summary_exact_thresholds_with_ties_and_nulls():
    rng = np.random.default_rng(1)
    pos = np.round(rng.normal(0.5, 0.2, 3000), 3).astype(np.float32)
    neg = np.round(rng.normal(0.0, 0.2, 20000), 3).astype(np.float32)
    chunks = [(pos[:1000], neg[:7000]), (pos[1000:], neg[7000:])]
    got = roc_summary(lambda: iter(chunks), fprs=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5))
    for fpr in (1e-1, 1e-2, 1e-3, 1e-4):
        assert got["tpr_at_fpr"][fpr_key(fpr)] == pytest.approx(_brute_tpr(pos, neg, fpr), abs=1e-12)
    assert got["tpr_at_fpr"]["1e-05"] is None  # 20000 negatives cannot resolve 1e-5
    assert got["auc"] == pytest.approx(_brute_auc(pos, neg), abs=2e-5)
    assert (got["num_pos"], got["num_neg"]) == (3000, 20000)


@pytest.mark.parametrize("cross", [False, True])
def test_blockwise_all_pairs_equal_brute_force(cross):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 30, 300)
    centres = rng.normal(size=(30, 16))
    emb = centres[labels] + rng.normal(scale=1.0, size=(300, 16))
    other = emb + rng.normal(scale=0.3, size=emb.shape) if cross else None
    q = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    g = q if other is None else other / np.linalg.norm(other, axis=1, keepdims=True)
    s = q @ g.T
    i, j = np.meshgrid(np.arange(300), np.arange(300), indexing="ij")
    keep = (j != i) if cross else (j > i)
    same = labels[:, None] == labels[None, :]
    pos, neg = s[keep & same], s[keep & ~same]
    got = roc_summary(lambda: pair_score_blocks(emb, labels, other, block=64), fprs=(1e-1, 1e-2, 1e-3, 1e-4))
    assert (got["num_pos"], got["num_neg"]) == (len(pos), len(neg))
    for fpr in (1e-1, 1e-2, 1e-3, 1e-4):
        assert got["tpr_at_fpr"][fpr_key(fpr)] == pytest.approx(_brute_tpr(pos, neg, fpr), abs=1e-3)
    assert got["auc"] == pytest.approx(_brute_auc(pos, neg), abs=1e-4)


def test_the_all_pairs_benchmark_runs_from_kd_plugin_bench(capsys):
    from kd_plugin.cli import main

    assert main(["bench", "all_pairs", "--n", "400", "--dim", "8", "--images-per-identity", "10", "--block", "64"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 40 identities of 10: 40 x 45 positive pairs of the 400 x 399 / 2
    assert figures["n"] == 400 and figures["pairs"] == 400 * 399 // 2 and figures["seconds"] >= 0
    assert 0.0 < figures["tpr_at_fpr"]["1e-01"] <= 1.0


def _eval_cli(*args):
    """Run `kd-plugin eval` as a user would and parse the JSON on its last stdout line."""
    proc = subprocess.run([sys.executable, "-m", "kd_plugin", "eval", *args, "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


IMAGENET = ["--mean", "123.675,116.28,103.53", "--std", "58.395,57.12,57.375"]


@pytest.mark.parametrize("onnx_file", ["mobilefacenet_dynamic.onnx", "mobilefacenet_b1.onnx"])
def test_real_teacher_reproduces_reference_figures(onnx_file):
    model = str(shared("teachers", "mobilefacenet_ms1m", onnx_file))
    result = _eval_cli("--model", model, *IMAGENET, "--bin", str(shared("celeba", "celeba_val.bin")))
    assert result["accuracy"] == pytest.approx(0.935, abs=0.01)
    assert result["accuracy_std"] == pytest.approx(0.057, abs=0.01)
    assert (result["num_pos"], result["num_neg"], result["num_images"]) == (300, 300, 1200)
    result = _eval_cli("--model", model, *IMAGENET, "--pairs-from", str(shared("celeba", "val.rec")))
    reference = {"1e-01": 0.927, "1e-02": 0.865, "1e-03": 0.779, "1e-04": 0.355}
    for key, value in reference.items():
        assert result["tpr_at_fpr"][key] == pytest.approx(value, abs=0.01), key
    assert result["tpr_at_fpr"]["1e-06"] is None  # 566k negatives cannot resolve 1e-6
    assert result["num_images"] == 1077 and result["num_neg"] > 500_000 and result["num_pos"] > 10_000


def test_cross_model_bin_evaluation():
    dynamic = str(shared("teachers", "mobilefacenet_ms1m", "mobilefacenet_dynamic.onnx"))
    fixed = str(shared("teachers", "mobilefacenet_ms1m", "mobilefacenet_b1.onnx"))
    data = str(shared("celeba", "celeba_val.bin"))
    cross = _eval_cli("--model", dynamic, *IMAGENET, "--bin", data, "--gallery-model", fixed)
    assert cross["accuracy"] == pytest.approx(0.935, abs=0.01)  # the two files are the same network
    # the gallery side fed with the wrong normalisation is a different, worse "model"
    mismatched = _eval_cli("--model", dynamic, *IMAGENET, "--bin", data, "--gallery-model", fixed,
                           "--gallery-mean", "0", "--gallery-std", "1")
    assert mismatched["accuracy"] < cross["accuracy"] - 0.05


def test_bad_fprs_and_too_few_pairs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        roc_summary(lambda: [(np.ones(3), np.zeros(3))], fprs=(1.0,))
    with pytest.raises(ValueError, match="at least 10 pairs"):
        kfold_accuracy(np.ones(8), np.ones(8, bool))
    proc = subprocess.run([sys.executable, "-m", "kd_plugin", "eval", "--model", "m.onnx", "--bin", "x.bin",
                           "--fprs", "1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--fprs" in proc.stderr


def test_eval_explains_bad_model_specs(tmp_path):
    for spec, message in (("r100:missing/backbone.pth", "checkpoint not found: missing/backbone.pth"),
                          ("r101:x.pth", "unknown network 'r101'")):
        proc = subprocess.run([sys.executable, "-m", "kd_plugin", "eval", "--model", spec, "--bin", "x.bin"],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
