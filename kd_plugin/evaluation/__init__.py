"""Face-verification evaluation: arcface_torch-style 10-fold accuracy on `.bin` pairs, all-pairs TPR@FPR over an
identity-labelled set (blockwise, so 100k images fit in memory), and cross-model variants (one side embedded by
model A, the other by model B).

Conventions (arcface_torch's): a face's embedding is the raw embedding of the image plus that of its horizontal
flip, then L2-normalised; pairs are scored by cosine similarity. TPR at FPR f uses the threshold t = the
floor(f*L)-th largest of the L negative scores (0-based), so at most f*L negatives score above t; a pair is accepted
when its score is strictly above t. Where L < 1/f the figure is null: the set cannot resolve that FPR.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch

from kd_plugin.data.datasets import FaceDataset, open_dataset
from kd_plugin.data.verification_bin import load_bin
from kd_plugin.evaluation.fprs import DEFAULT_FPRS
from kd_plugin.progress import Progress

HISTOGRAM_BINS = 1 << 20  # negative scores are histogrammed over [-1, 1]; thresholds are then refined exactly


class Embedder(Protocol):
    """Anything that maps uint8 RGB images (N, 3, H, W) to float embeddings (N, d)."""

    def embed(self, images: np.ndarray) -> np.ndarray: ...


def fpr_key(fpr: float) -> str:
    """JSON key of an FPR: 1e-3 -> '1e-03'."""
    return f"{fpr:.0e}"


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def embed_with_flip(model: Embedder, images: np.ndarray) -> np.ndarray:
    """Raw embedding of each image plus that of its horizontal flip (arcface_torch's test-time augmentation)."""
    return model.embed(images) + model.embed(np.ascontiguousarray(images[..., ::-1]))


def embed_images(model: Embedder, images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """L2-normalised flip-summed embeddings of uint8 images (N, 3, H, W), `chunk` images at a time."""
    return l2_normalize(np.concatenate([embed_with_flip(model, images[i:i + chunk])
                                        for i in range(0, len(images), chunk)]))


def bin_accuracy(embeddings: np.ndarray, issame: np.ndarray, folds: int = 10) -> float:
    """10-fold accuracy of a `.bin`'s pairs from the L2-normalised embeddings of its images (pair k: images 2k, 2k+1)."""
    scores = np.sum(embeddings[0::2] * embeddings[1::2], axis=1)
    return kfold_accuracy(scores, np.asarray(issame, bool), folds)[0]


def all_pairs_tpr(query: np.ndarray, labels: np.ndarray, fprs: Sequence[float],
                  gallery: np.ndarray | None = None) -> dict[str, float | None]:
    """TPR at each FPR ({fpr_key: TPR}) over all pairs of an identity-labelled set, from its embeddings (`gallery`: the
    same images embedded by another model, for the cross-model figure)."""
    return roc_summary(lambda: pair_score_blocks(query, labels, gallery), fprs)["tpr_at_fpr"]


def embed_dataset(model: Embedder, dataset: FaceDataset, chunk: int = 256, progress: bool = True) -> np.ndarray:
    """Flip-summed embeddings of every image of a dataset, in index order."""
    bar = Progress(len(dataset), f"embedding {dataset.source}", "img", enabled=progress)
    out = []
    for start in range(0, len(dataset), chunk):
        stop = min(start + chunk, len(dataset))
        images = np.stack([dataset[i][0].numpy() for i in range(start, stop)])
        out.append(embed_with_flip(model, images))
        bar.update(stop - start)
    return np.concatenate(out)


def kfold_accuracy(scores: np.ndarray, issame: np.ndarray, folds: int = 10) -> tuple[float, float, np.ndarray]:
    """10-fold verification accuracy: the threshold maximising accuracy on the other folds is tested on each fold.

    Folds are contiguous, in file order (as arcface_torch's unshuffled KFold). Returns (mean, std, per-fold)."""
    scores, issame = np.asarray(scores, np.float64), np.asarray(issame, bool)
    if len(scores) < folds:
        raise ValueError(f"{folds}-fold accuracy needs at least {folds} pairs, got {len(scores)}")
    parts = np.array_split(np.arange(len(scores)), folds)
    accuracies = []
    for test in parts:
        train = np.setdiff1d(np.arange(len(scores)), test)
        threshold = best_threshold(scores[train], issame[train])
        accuracies.append(np.mean((scores[test] > threshold) == issame[test]))
    acc = np.asarray(accuracies)
    return float(acc.mean()), float(acc.std()), acc


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    """The accuracy-maximising threshold (accept when score > threshold), searched over every distinct cut exactly."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], issame[order]
    # cutting before position k rejects s[:k] and accepts s[k:]
    correct = np.concatenate([[0], np.cumsum(~y)]) + (y.sum() - np.concatenate([[0], np.cumsum(y)]))
    valid = np.concatenate([[True], s[1:] > s[:-1], [True]])
    k = int(np.flatnonzero(valid)[np.argmax(correct[valid])])
    if k == 0:
        return float(s[0] - 1.0)
    if k == len(s):
        return float(s[-1] + 1.0)
    return float((s[k - 1] + s[k]) / 2)


def _score_bins(scores: np.ndarray) -> np.ndarray:
    """Histogram bin of each score; float32 arithmetic, identical in both passes (scaling by 2^19 is exact)."""
    bins = ((np.asarray(scores, np.float32) + np.float32(1.0)) * np.float32(HISTOGRAM_BINS / 2)).astype(np.int32)
    return np.clip(bins, 0, HISTOGRAM_BINS - 1, out=bins)  # truncation is floor here: s + 1 >= 0 up to rounding


ScorePass = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def roc_summary(score_pass: ScorePass, fprs: Sequence[float] = DEFAULT_FPRS) -> dict:
    """TPR at each FPR, ROC AUC and pair counts from a re-iterable stream of (positive, negative) score chunks.

    Positives are kept exactly; negatives are histogrammed, then a second pass collects the negatives that fall
    in the bins holding each threshold, so thresholds are exact. AUC uses the histogram (bin width 2/2^20)."""
    if not all(0.0 < f < 1.0 for f in fprs):
        raise ValueError(f"false-positive rates must lie strictly between 0 and 1, got {list(fprs)}")
    positives, hist, num_neg = [], np.zeros(HISTOGRAM_BINS, np.int64), 0
    for pos, neg in score_pass():
        positives.append(np.asarray(pos, np.float32))
        hist += np.bincount(_score_bins(np.asarray(neg)), minlength=HISTOGRAM_BINS)
        num_neg += len(neg)
    pos_sorted = np.sort(np.concatenate(positives)) if positives else np.zeros(0, np.float32)
    num_pos = len(pos_sorted)
    above = np.concatenate([np.cumsum(hist[::-1])[::-1], [0]])  # above[b] = negatives in bins >= b
    wanted: dict[float, tuple[int, int]] = {}  # fpr -> (bin, rank within the bin, descending)
    for fpr in fprs:
        if num_neg and fpr * num_neg >= 1:
            k = int(np.floor(fpr * num_neg))
            b = int(np.searchsorted(-above, -k, side="left")) - 1  # the last bin b with above[b] > k
            wanted[fpr] = (b, k - int(above[b + 1]))
    in_bins: dict[int, list[np.ndarray]] = {b: [] for b, _ in wanted.values()}
    if wanted:
        targets = np.fromiter(in_bins, np.int64)
        for _, neg in score_pass():
            neg = np.asarray(neg)
            bins = _score_bins(neg)
            hit = np.isin(bins, targets)
            for b in np.unique(bins[hit]):
                in_bins[int(b)].append(neg[hit][bins[hit] == b])
    tpr: dict[str, float | None] = {}
    for fpr in fprs:
        if fpr not in wanted or num_pos == 0:
            tpr[fpr_key(fpr)] = None
            continue
        b, rank = wanted[fpr]
        threshold = np.sort(np.concatenate(in_bins[b]))[::-1][rank]
        tpr[fpr_key(fpr)] = float(num_pos - np.searchsorted(pos_sorted, threshold, side="right")) / num_pos
    auc = None
    if num_pos and num_neg:
        below = np.concatenate([[0], np.cumsum(hist)])  # below[b] = negatives in bins < b
        pb = _score_bins(pos_sorted)
        auc = float(np.sum(below[pb] + 0.5 * hist[pb]) / (num_pos * num_neg))
    return {"tpr_at_fpr": tpr, "auc": auc, "num_pos": int(num_pos), "num_neg": int(num_neg)}


def pair_score_blocks(query: np.ndarray, labels: np.ndarray, gallery: np.ndarray | None = None,
                      block: int = 4096, progress: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Cosine scores of all pairs, one (positive, negative) chunk per block of the similarity matrix.

    Without `gallery`: unordered pairs i < j of `query`. With `gallery` (the same images embedded by another model):
    ordered pairs i != j scored as query[i] . gallery[j], so both directions count."""
    q = torch.from_numpy(l2_normalize(query))
    g = q if gallery is None else torch.from_numpy(l2_normalize(gallery))
    if len(g) != len(q):
        raise ValueError(f"query has {len(q)} embeddings, gallery {len(g)}; both must embed the same images")
    lab = np.asarray(labels, np.int64)
    n = len(q)
    starts = list(range(0, n, block))
    bar = Progress(len(starts) * (len(starts) + 1) // 2 if gallery is None else len(starts) ** 2,
                   "scoring pairs", "blocks", enabled=progress)
    for i0 in starts:
        i1 = min(n, i0 + block)
        for j0 in (starts if gallery is not None else [j for j in starts if j >= i0]):
            j1 = min(n, j0 + block)
            scores = (q[i0:i1] @ g[j0:j1].T).numpy()  # numpy's boolean indexing is about 2x torch's here
            same = lab[i0:i1, None] == lab[None, j0:j1]
            if i0 == j0:  # only diagonal blocks hold excluded pairs (i >= j, or i == j across models)
                rows, cols = np.arange(i0, i1)[:, None], np.arange(j0, j1)[None, :]
                keep = cols > rows if gallery is None else cols != rows
                yield scores[keep & same], scores[keep & ~same]
            else:
                yield scores[same], scores[~same]
            bar.update()


def evaluate_bin(path: str, model: Embedder, gallery_model: Embedder | None = None,
                 fprs: Sequence[float] = DEFAULT_FPRS, folds: int = 10) -> dict:
    """10-fold accuracy (and pair TPR@FPR, AUC) on an arcface_torch `.bin`; with `gallery_model`, the first image
    of each pair is embedded by `model` and the second by `gallery_model`."""
    images, issame = load_bin(path)
    if len(issame) < folds:
        raise ValueError(f"{path}: {len(issame)} pairs; {folds}-fold accuracy needs at least {folds}")
    first = l2_normalize(embed_with_flip(model, images[0::2]))
    second = l2_normalize(embed_with_flip(gallery_model or model, images[1::2]))
    scores = np.sum(first * second, axis=1)
    acc, std, _ = kfold_accuracy(scores, issame, folds)
    roc = roc_summary(lambda: [(scores[issame], scores[~issame])], fprs)
    return {"accuracy": acc, "accuracy_std": std, **roc, "num_images": int(len(images))}


def evaluate_pairs(data: str | FaceDataset, model: Embedder, gallery_model: Embedder | None = None,
                   fprs: Sequence[float] = DEFAULT_FPRS, block: int = 4096, progress: bool = True) -> dict:
    """All-pairs 1:1 verification over an identity-labelled dataset (rec, folder or list); with `gallery_model`,
    cross-model: queries embedded by `model` against a gallery embedded by `gallery_model`."""
    dataset = open_dataset(data) if isinstance(data, str) else data
    query = embed_dataset(model, dataset, progress=progress)
    gallery = embed_dataset(gallery_model, dataset, progress=progress) if gallery_model is not None else None
    roc = roc_summary(lambda: pair_score_blocks(query, dataset.labels, gallery, block, progress), fprs)
    return {**roc, "num_images": int(len(dataset))}
