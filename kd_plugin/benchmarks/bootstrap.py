"""Paired identity-bootstrap intervals for verification figures: resample the evaluation identities with replacement,
the same resample for every model, and read each model's TPR at a fixed FPR on the resampled set of pairs.

A resample draws identity i c_i times. Its pairs are those of the drawn copies: a positive pair of identity i counts
c_i times, a negative pair between identities i and j counts c_i x c_j times (two copies of the same identity are the
same person, so no pair is formed between them). TPR at FPR f then follows the evaluation's definition with those
multiplicities: the threshold is the floor(f x L)-th largest negative (0-based, counting multiplicities, L their
total), and a positive pair is accepted when it scores strictly above it — with every c_i = 1 this is
`kd_plugin.evaluation`'s figure exactly."""

from __future__ import annotations

import numpy as np


class PairScores:
    """All pairs of one model's embeddings of an identity-labelled set, arranged for fast weighted resampling."""

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray) -> None:
        unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        labels = np.asarray(labels)
        i, j = np.triu_indices(len(labels), k=1)
        scores = np.einsum("nd,nd->n", unit[i], unit[j]).astype(np.float64)
        same = labels[i] == labels[j]
        self.pos_scores, self.pos_ids = scores[same], labels[i][same]
        order = np.argsort(-scores[~same], kind="stable")  # negatives, largest first
        self.neg_scores = scores[~same][order]
        self.neg_a, self.neg_b = labels[i][~same][order], labels[j][~same][order]

    def tpr(self, counts: np.ndarray, fpr: float) -> float:
        """TPR at `fpr` on the resample that draws identity k `counts[k]` times; nan where it cannot be resolved."""
        neg_w = counts[self.neg_a] * counts[self.neg_b]
        total = neg_w.sum()
        k = np.floor(fpr * total)
        if total == 0 or k < 1:
            return float("nan")
        threshold = self.neg_scores[np.searchsorted(np.cumsum(neg_w), k, side="right")]
        pos_w = counts[self.pos_ids]
        return float(pos_w[self.pos_scores > threshold].sum() / pos_w.sum())


def paired_bootstrap(models: dict[str, list[PairScores]], identities: int, fpr: float = 1e-3,
                     resamples: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """{model: its TPR at `fpr` on each resample, the mean over its seeds}: every model sees the same resamples."""
    rng = np.random.default_rng(seed)
    out = {name: np.empty(resamples) for name in models}
    for r in range(resamples):
        counts = np.bincount(rng.integers(0, identities, identities), minlength=identities).astype(np.float64)
        for name, seeds in models.items():
            out[name][r] = float(np.mean([s.tpr(counts, fpr) for s in seeds]))
    return out


def difference_interval(method: np.ndarray, reference: np.ndarray, level: float = 0.95) -> list[float]:
    """The percentile interval of the paired per-resample differences method - reference."""
    diff = method - reference
    diff = diff[np.isfinite(diff)]
    tail = (1.0 - level) / 2 * 100
    return [float(np.percentile(diff, tail)), float(np.percentile(diff, 100 - tail))]
