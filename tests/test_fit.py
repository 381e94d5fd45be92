"""centres="fit": the margin-softmax classifier fitted to a frozen teacher's cached embeddings separates better than
class means and respects the margin; 2 gloo ranks equal 1 process; the trainer, resume and the CLI use it."""

from __future__ import annotations

import json

import numpy as np
import torch

from distributed_helpers import run_ranks
from kd_plugin.methods.heads import CombinedMarginLoss
from kd_plugin.centres.estimate import centres_from_cache
from kd_plugin.centres.fit import fit_class_slice
from test_train import _registered_for_this_module  # noqa: F401  (test_tiny, for this module only)


class ArrayCache:
    """A teacher cache held in memory: `(N, 2, d)` embeddings, flip 1 = the flipped image's."""

    def __init__(self, embeddings: np.ndarray) -> None:
        self.embeddings, self.embedding_size, self.directory = embeddings, embeddings.shape[2], "memory"

    def get(self, indices, flipped) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        flip = np.broadcast_to(np.asarray(flipped, dtype=np.int64).reshape(-1), idx.shape)
        return torch.from_numpy(self.embeddings[idx, flip].astype(np.float32))


@torch.no_grad()
def margin_satisfied(embeddings: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, m2: float) -> float:
    """The fraction of samples whose angle to their own centre, plus the angular margin m2, is still smaller than the
    angle to every other centre (ArcFace's criterion: cos(theta_y + m2) > max_j cos(theta_j)); one process."""
    cos = torch.nn.functional.normalize(embeddings.float(), dim=1) @ torch.nn.functional.normalize(centres.float(),
                                                                                                   dim=1).T
    own = cos.gather(1, labels.view(-1, 1)).squeeze(1).clamp(-1, 1)
    others = cos.scatter(1, labels.view(-1, 1), -2.0).max(dim=1).values
    return float((torch.cos(torch.acos(own) + m2) > others).float().mean())


def neighbour_pairs(classes=20, dim=16, per_class=20, seed=0):
    """Classes in pairs 35 degrees apart with a spread of about 0.12: their means sit too close to their neighbour for
    a margin of 0.3 rad, which a classifier trained with that margin pushes apart."""
    g = np.random.default_rng(seed)
    base = g.normal(size=(classes // 2, dim))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    off = g.normal(size=(classes // 2, dim))
    off -= (off * base).sum(1, keepdims=True) * base
    off /= np.linalg.norm(off, axis=1, keepdims=True)
    half = np.deg2rad(17.5)
    centres = np.concatenate([np.cos(half) * base + np.sin(half) * off, np.cos(half) * base - np.sin(half) * off])
    labels = np.repeat(np.arange(classes), per_class)
    plain = centres[labels] + 0.12 * g.normal(size=(len(labels), dim))
    return np.stack([plain, plain + 0.02 * g.normal(size=plain.shape)], axis=1), labels


def _all(cache, labels):
    x = torch.cat([cache.get(np.arange(len(labels)), False), cache.get(np.arange(len(labels)), True)])
    return x, torch.from_numpy(np.concatenate([labels, labels]))


def test_the_fitted_classifier_separates_better_than_means_with_the_margin_respected():
    embeddings, labels = neighbour_pairs()
    cache = ArrayCache(embeddings)
    means = centres_from_cache(cache, labels, 20).rows
    fitted = fit_class_slice(cache, labels, 20, CombinedMarginLoss(64, 1.0, 0.3, 0.0), progress=False)
    assert fitted.start == 0 and fitted.rows.shape == (20, 16)
    assert torch.allclose(fitted.rows.norm(dim=1), torch.ones(20), atol=1e-5)
    x, y = _all(cache, labels)
    at_margin = margin_satisfied(x, y, fitted.rows, 0.3)
    assert at_margin > margin_satisfied(x, y, means, 0.3) + 0.2  # means 0.53, fitted 0.88 when written
    assert at_margin > 0.8 and margin_satisfied(x, y, fitted.rows, 0.0) > 0.99
    # the fit starts from the means and moves them: the same classes, not a relabelling
    assert float((fitted.rows * means).sum(1).min()) > 0.8


def _fit_on_ranks(rank, world):
    embeddings, labels = neighbour_pairs(classes=10, per_class=9, seed=1)
    part = fit_class_slice(ArrayCache(embeddings), labels, 10, CombinedMarginLoss(64, 1.0, 0.3, 0.0), epochs=3,
                           batch_size=16, progress=False)
    return part.start, part.rows


def test_two_gloo_ranks_fit_what_one_process_fits():
    single = _fit_on_ranks(0, 1)[1]
    parts = run_ranks(_fit_on_ranks, 2)
    assert [start for start, _ in parts] == [0, 5]
    assert torch.allclose(torch.cat([rows for _, rows in parts]), single, atol=1e-5)


def test_training_with_fitted_centres_saves_and_resumes_them(tmp_path):
    import kd_plugin.centres.derived
    from kd_plugin.run.config import resolve
    from kd_plugin.run.train import train
    from test_train import KD, _config, _losses, _teacher, ensure_registered, make_faces

    ensure_registered()
    data = make_faces(tmp_path / "faces")
    kd = dict(KD, teacher=_teacher(tmp_path),
              proxyless={"centres": "fit", "fit": {"epochs": 2, "batch_size": 16, "lr": 0.1}})
    train(resolve(_config(data, tmp_path / "out", max_steps=2, kd=kd)))
    folder = tmp_path / "out" / "teacher_centres"
    meta = json.loads((folder / "rank_0_softmax_weight.json").read_text())
    assert meta["kind"] == "fitted_centres" and meta["epochs"] == 2 and meta["batch_size"] == 16
    assert meta["rows"] == 8 and meta["bytes"] == (folder / "rank_0_softmax_weight.pt").stat().st_size
    assert (tmp_path / "out" / "teacher_cache" / "meta.json").exists()  # no kd.cache: cached for the fit
    head = torch.load(tmp_path / "out" / "checkpoint_gpu_0.pt", weights_only=True)["state_dict_softmax_fc"]["weight"]
    assert torch.allclose(head, torch.load(folder / "rank_0_softmax_weight.pt", weights_only=True), atol=1e-6)

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted again")
    kd_plugin.centres.derived.fit_class_slice, original = no_fit, kd_plugin.centres.derived.fit_class_slice
    try:
        train(resolve(_config(data, tmp_path / "out", max_steps=3, resume=True, kd=kd)))
    finally:
        kd_plugin.centres.derived.fit_class_slice = original
    assert [e["step"] for e in _losses(tmp_path / "out")] == [1, 2, 3]


def test_the_cli_fits_a_classifier_file_from_a_cache(tmp_path, capsys):
    from kd_plugin.cli import main
    from kd_plugin.data.datasets import open_dataset
    from kd_plugin.teachers import build_cache, load_embedder
    from test_train import _teacher, ensure_registered, make_faces

    ensure_registered()
    data = make_faces(tmp_path / "faces")
    dataset = open_dataset(str(data))
    build_cache(load_embedder(_teacher(tmp_path)), dataset, str(tmp_path / "cache"), "t", progress=False)
    out = tmp_path / "fitted.pt"
    assert main(["classifier", "--fit", str(tmp_path / "cache"), "--data", str(data), "--num-classes", "8",
                 "--out", str(out), "--epochs", "2"]) == 0
    assert "8 fitted class centres x 16" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved["kind"] == "fitted_centres" and saved["weight"].shape == (8, 16)
    assert main(["classifier", "--fit", str(tmp_path / "cache"), "--num-classes", "8", "--out", str(out)]) == 2
    assert "give --data" in capsys.readouterr().err
