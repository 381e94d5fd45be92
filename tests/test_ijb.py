"""IJB-B/C 1:1 evaluation on a miniature in insightface's exact layout, built from the shared CelebA validation faces
(templates = image sets of one identity, several media each), checked against a computation written here from the
protocol's definition, with its own decoding and its own onnxruntime session."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import shared
from kd_plugin.cli import main
from kd_plugin.evaluation.ijb import (ARCFACE_LANDMARKS, align, image_features, pair_scores, read_protocol, similarity_transform,
                           template_features)
from kd_plugin.normalization import InputNormalization
from kd_plugin.teachers import load_embedder

MEAN, STD = np.array([123.675, 116.28, 103.53], np.float32), np.array([58.395, 57.12, 57.375], np.float32)


def _miniature(root, target="ijbc"):
    """Each identity's images split into 3 templates (150 templates: 11,175 pairs, 150 positive, enough negatives for
    FAR 1e-4); within a template, media of 1 to 3 consecutive images."""
    from kd_plugin.data import open_dataset
    ds = open_dataset(str(shared("celeba", "val.rec")))
    rng = np.random.default_rng(0)
    os.makedirs(root / "meta")
    os.makedirs(root / "loose_crop")
    faces, marks, template_of = [], [], {}
    media = 0
    for cls in range(ds.num_classes):
        members = np.flatnonzero(ds.labels == cls)
        for third, part in enumerate((members[0::3], members[1::3], members[2::3])):
            tid = 3 * cls + third + 1
            template_of[tid] = cls
            i = 0
            while i < len(part):
                media += 1
                for index in part[i:i + int(rng.integers(1, 4))]:
                    name = f"{index}.jpg"
                    (root / "loose_crop" / name).write_bytes(ds.read_bytes(int(index)))
                    faces.append(f"{name} {tid} {media}")
                    points = " ".join(f"{v:.4f}" for v in ARCFACE_LANDMARKS.reshape(-1))  # an aligned crop
                    marks.append(f"{name} {points} {rng.uniform(0.5, 1.0):.6f}")
                    i += 1
    pairs = [f"{a} {b} {int(template_of[a] == template_of[b])}" for a in template_of for b in template_of if a < b]
    (root / "meta" / f"{target}_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    (root / "meta" / f"{target}_name_5pts_score.txt").write_text("\n".join(marks) + "\n")
    (root / "meta" / f"{target}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return faces, marks, pairs


def _expected(root, faces, marks, pairs, onnx_path):
    """The protocol written out plainly: embed image and flip (raw sum) x score, mean per media, sum per template,
    normalise, cosine per pair; TPR at FAR f: positives strictly above the floor(f L)-th largest negative."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feature = {}
    for face, mark in zip(faces, marks):
        name, tid, mid = face.split()
        rgb = np.asarray(Image.open(io.BytesIO((root / "loose_crop" / name).read_bytes())).convert("RGB"), np.float32)
        x = ((rgb - MEAN) / STD).transpose(2, 0, 1)[None]
        batch = np.concatenate([x, x[..., ::-1]]).astype(np.float32)  # the image and its left-right flip
        both = session.run(None, {session.get_inputs()[0].name: batch})[0]
        feature.setdefault(int(tid), {}).setdefault(int(mid), []).append((both[0] + both[1]) * float(mark.split()[-1]))
    template = {}
    for tid, medias in feature.items():
        total = sum(np.mean(np.stack(rows), axis=0) for rows in medias.values())
        template[tid] = total / np.linalg.norm(total)
    scores, labels = [], []
    for line in pairs:
        a, b, same = (int(v) for v in line.split())
        scores.append(float(template[a] @ template[b]))
        labels.append(same)
    scores, labels = np.array(scores), np.array(labels)
    pos, neg = scores[labels == 1], np.sort(scores[labels == 0])[::-1]
    tpr = {}
    for f in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        tpr[f] = None if f * len(neg) < 1 else float(np.mean(pos > neg[int(np.floor(f * len(neg)))]))
    return scores, tpr


def test_ijb_evaluation_equals_the_protocol_computed_independently(tmp_path, capsys):
    onnx_path = shared("teachers", "mobilefacenet_ms1m", "mobilefacenet_dynamic.onnx")
    root = tmp_path / "IJB"
    faces, marks, pairs = _miniature(root)
    assert main(["eval", "--model", str(onnx_path), "--mean", "123.675,116.28,103.53", "--std",
                 "58.395,57.12,57.375", "--ijb", str(root), "--target", "IJBC", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scores, tpr = _expected(root, faces, marks, pairs, onnx_path)
    assert result["num_pairs"] == len(pairs) and result["num_templates"] == 150 and result["num_images"] == len(faces)
    assert result["num_pos"] == 150 and result["num_neg"] == len(pairs) - 150
    for key, expected in zip(("1e-01", "1e-02", "1e-03", "1e-04", "1e-05", "1e-06"), tpr.values()):
        got = result["tpr_at_fpr"][key]
        assert (got is None) == (expected is None) and (got is None or abs(got - expected) <= 1e-6), key
    assert result["tpr_at_fpr"]["1e-05"] is None and result["tpr_at_fpr"]["1e-04"] is not None
    protocol = read_protocol(str(root), "IJBC")
    model = load_embedder(str(onnx_path), InputNormalization(MEAN.tolist(), STD.tolist()), onnx_on_cpu="onnxruntime")
    ids, feats = template_features(image_features(model, str(root), protocol, progress=False), protocol)
    ours = np.concatenate([s for _, s in pair_scores(ids, feats, protocol.pairs)])
    assert np.abs(ours - scores).max() < 1e-6


def test_alignment_maps_the_landmarks_onto_arcfaces_template():
    rng = np.random.default_rng(1)
    angle, scale, shift = 0.3, 1.7, np.array([20.0, -5.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = ARCFACE_LANDMARKS @ (scale * rotation).T + shift  # the template's points in a larger, rotated photo
    matrix = similarity_transform(moved + rng.normal(0, 1e-9, moved.shape))
    assert np.allclose(moved @ matrix[:, :2].T + matrix[:, 2], ARCFACE_LANDMARKS, atol=1e-6)
    image = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    assert align(image, moved).shape == (112, 112, 3)
    crop = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    assert align(crop, ARCFACE_LANDMARKS) is crop  # already aligned: kept as it is


def test_ijb_layout_errors_name_the_file(tmp_path):
    from kd_plugin.errors import DataFormatError
    with pytest.raises(FileNotFoundError, match=r"meta/ijbb_face_tid_mid.txt .*expected insightface's IJB release"):
        read_protocol(str(tmp_path), "IJBB")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "ijbc_face_tid_mid.txt").write_text("a.jpg 1 1\nb.jpg 2 2\n")
    (tmp_path / "meta" / "ijbc_name_5pts_score.txt").write_text("a.jpg" + " 1" * 11 + "\nb.jpg" + " 1" * 11 + "\n")
    (tmp_path / "meta" / "ijbc_template_pair_label.txt").write_text("1 3 0\n")
    with pytest.raises(DataFormatError, match="template 3 .* has no image in"):
        read_protocol(str(tmp_path), "IJBC")
