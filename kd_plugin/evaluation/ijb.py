"""IJB-B / IJB-C 1:1 template verification with arcface_torch's default protocol (its eval_ijbc.py), on a current
stack: no numpy < 1.24, no menpo, no CUDA.

Layout (insightface's release): `ROOT/meta/<T>_face_tid_mid.txt` (`image template_id media_id` per line),
`ROOT/meta/<T>_template_pair_label.txt` (`template_a template_b label`), `ROOT/meta/<T>_name_5pts_score.txt`
(`image x1 y1 ... x5 y5 detector_score`), `ROOT/loose_crop/<image>`, for T = ijbb or ijbc.

Protocol: each image aligned to the 112x112 arcface template by the 5-point similarity transform (least squares,
Umeyama); its embedding plus its flip's, norms kept, times the detector score; per template, the mean over the images
of each media, summed over its media, then L2-normalised; a pair scores the cosine of its two templates. TPR at
FAR 1e-6 .. 1e-1 with kd_plugin's exact thresholds (null where there are too few negative pairs). Images are embedded
in batches and pairs scored in blocks, so 15k templates and 15M pairs fit in a few GB."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

from kd_plugin.data.images import decode_image
from kd_plugin.errors import DataFormatError
from kd_plugin.evaluation import embed_with_flip, l2_normalize, roc_summary
from kd_plugin.evaluation.fprs import DEFAULT_FPRS
from kd_plugin.progress import Progress

ARCFACE_LANDMARKS = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                              [70.7299, 92.2041]], dtype=np.float64)  # where arcface_torch's 112x112 crops put them
TARGETS = {"IJBC": "ijbc", "IJBB": "ijbb"}


@dataclass
class IJBProtocol:
    """The parsed meta files: per image its file, template, media, landmarks, detector score; the template pairs."""

    images: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray  # (n, 5, 2)
    scores: np.ndarray
    pairs: np.ndarray  # (m, 2) template ids
    labels: np.ndarray  # (m,) 1 = same identity


def _columns(path: str, minimum: int) -> list[list[str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IJB meta file not found: {path} (expected insightface's IJB release layout: "
                                f"ROOT/meta/<target>_face_tid_mid.txt, _template_pair_label.txt, _name_5pts_score.txt, "
                                f"ROOT/loose_crop/)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < minimum:
                raise DataFormatError(f"{path}, line {number}: expected at least {minimum} fields, got "
                                      f"{line.rstrip()!r}")
            rows.append(fields)
    return rows


def read_protocol(root: str, target: str = "IJBC") -> IJBProtocol:
    """Read the meta files of `target` (IJBC or IJBB) under `root`, checked against each other."""
    if target.upper() not in TARGETS:
        raise DataFormatError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    prefix = os.path.join(root, "meta", TARGETS[target.upper()])
    faces = _columns(prefix + "_face_tid_mid.txt", 3)
    marks = _columns(prefix + "_name_5pts_score.txt", 12)
    pairs = _columns(prefix + "_template_pair_label.txt", 3)
    if [row[0] for row in faces] != [row[0] for row in marks]:
        raise DataFormatError(f"{prefix}_face_tid_mid.txt and {prefix}_name_5pts_score.txt list different images (or "
                              f"in another order); they must describe the same images line by line")
    try:
        templates = np.array([int(row[1]) for row in faces], dtype=np.int64)
        medias = np.array([int(row[2]) for row in faces], dtype=np.int64)
        landmarks = np.array([[float(v) for v in row[1:11]] for row in marks]).reshape(-1, 5, 2)
        scores = np.array([float(row[11]) for row in marks], dtype=np.float32)
        pair_ids = np.array([[int(row[0]), int(row[1])] for row in pairs], dtype=np.int64).reshape(-1, 2)
        labels = np.array([int(row[2]) for row in pairs], dtype=np.int64)
    except ValueError as exc:
        raise DataFormatError(f"{prefix}_*.txt: a number could not be read ({exc})") from None
    missing = np.setdiff1d(np.unique(pair_ids), templates)
    if len(missing):
        raise DataFormatError(f"{prefix}_template_pair_label.txt: template {int(missing[0])} (and {len(missing) - 1} "
                              f"more) has no image in {prefix}_face_tid_mid.txt")
    return IJBProtocol([row[0] for row in faces], templates, medias, landmarks, scores, pair_ids, labels)


def similarity_transform(source: np.ndarray, target: np.ndarray = ARCFACE_LANDMARKS) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, translation) mapping `source` points onto `target` in the least
    squares sense (Umeyama, 1991), as skimage's SimilarityTransform.estimate used by insightface."""
    src, dst = np.asarray(source, np.float64), np.asarray(target, np.float64)
    mean_s, mean_d = src.mean(0), dst.mean(0)
    s, d = src - mean_s, dst - mean_d
    u, sigma, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rotation = u @ np.diag(sign) @ vt
    scale = float((sigma * sign).sum() / ((s ** 2).sum() / len(src)))
    return np.hstack([scale * rotation, (mean_d - scale * rotation @ mean_s)[:, None]])


_WARNED_PIL = False


def align(rgb: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The (size, size, 3) uint8 crop of `rgb` whose 5 landmarks land on arcface's template. An image that already is
    such a crop (identity transform) is returned as it is; OpenCV's warpAffine is used as insightface does, PIL where
    OpenCV is not installed."""
    global _WARNED_PIL
    matrix = similarity_transform(landmarks, ARCFACE_LANDMARKS * size / 112.0)
    if rgb.shape[:2] == (size, size) and np.allclose(matrix, np.eye(2, 3), atol=1e-6):
        return rgb
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        return cv2.warpAffine(rgb, matrix, (size, size), borderValue=0.0)
    if not _WARNED_PIL:
        warnings.warn("OpenCV is not installed: IJB faces are aligned with PIL's bilinear warp, which may differ from "
                      "insightface's (OpenCV) by a grey level here and there; pip install opencv-python-headless")
        _WARNED_PIL = True
    from PIL import Image

    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    warped = Image.fromarray(rgb).transform((size, size), Image.AFFINE, data=tuple(inverse.reshape(-1)),
                                            resample=Image.BILINEAR)
    return np.asarray(warped)


def image_features(model, root: str, protocol: IJBProtocol, batch_size: int = 128, progress: bool = True
                   ) -> np.ndarray:
    """Per image: embedding + flip embedding (norms kept) times the detector score, float32 (n, d)."""
    folder = os.path.join(root, "loose_crop")
    out = []
    bar = Progress(len(protocol.images), f"embedding IJB faces ({folder})", "img", enabled=progress)
    for start in range(0, len(protocol.images), batch_size):
        names = protocol.images[start:start + batch_size]
        crops = []
        for i, name in enumerate(names, start):
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise DataFormatError(f"{path}: cannot read this IJB image ({exc})") from None
            crops.append(align(decode_image(data, path, None), protocol.landmarks[i]).transpose(2, 0, 1))
        feats = embed_with_flip(model, np.ascontiguousarray(np.stack(crops)))
        out.append(np.asarray(feats, np.float32) * protocol.scores[start:start + len(names), None])
        bar.update(len(names))
    return np.concatenate(out)


def template_features(features: np.ndarray, protocol: IJBProtocol) -> tuple[np.ndarray, np.ndarray]:
    """(template ids sorted, their L2-normalised features): per template, the mean over each media's images,
    summed over its media."""
    ids = np.unique(protocol.templates)
    order = np.lexsort((protocol.medias, protocol.templates))
    t, m = protocol.templates[order], protocol.medias[order]
    groups = np.flatnonzero(np.r_[True, (t[1:] != t[:-1]) | (m[1:] != m[:-1])])  # one (template, media) each
    sizes = np.diff(np.r_[groups, len(order)])
    media_means = np.add.reduceat(features[order], groups, axis=0) / sizes[:, None]
    rows = np.searchsorted(ids, t[groups])
    summed = np.zeros((len(ids), features.shape[1]), np.float64)
    np.add.at(summed, rows, media_means)
    return ids, l2_normalize(summed.astype(np.float32))


def pair_scores(ids: np.ndarray, feats: np.ndarray, pairs: np.ndarray, block: int = 1 << 20):
    """Cosine scores of the template pairs, block by block."""
    a, b = np.searchsorted(ids, pairs[:, 0]), np.searchsorted(ids, pairs[:, 1])
    for start in range(0, len(pairs), block):
        stop = start + block
        yield start, np.einsum("ij,ij->i", feats[a[start:stop]], feats[b[start:stop]])


def evaluate_ijb(root: str, model, target: str = "IJBC", fprs=DEFAULT_FPRS, batch_size: int = 128,
                 progress: bool = True) -> dict:
    """IJB-B/C 1:1 verification of `model` (any kd_plugin embedder): TPR at each FAR, AUC, counts."""
    protocol = read_protocol(root, target)
    ids, feats = template_features(image_features(model, root, protocol, batch_size, progress), protocol)

    def score_pass():
        for start, scores in pair_scores(ids, feats, protocol.pairs):
            same = protocol.labels[start:start + len(scores)] == 1
            yield scores[same], scores[~same]
    summary = roc_summary(score_pass, fprs)
    return {"target": target.upper(), **summary, "num_images": len(protocol.images), "num_templates": len(ids),
            "num_pairs": len(protocol.pairs)}
