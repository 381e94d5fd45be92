"""`kd-plugin export`: the ONNX student takes uint8 RGB, normalises inside, and embeds as the torch student does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from kd_plugin.cli import main
from kd_plugin.errors import KDPluginError
from kd_plugin.export import export_onnx
from kd_plugin.networks import create_network
from kd_plugin.normalization import IMAGENET_MEAN, IMAGENET_STD, InputNormalization
from kd_plugin.teachers import load_embedder
from kd_plugin.teachers.torch_embedder import TorchEmbedder


def _images(n=5, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 112, 112), dtype=np.uint8)


@pytest.mark.parametrize("norm", [InputNormalization(), InputNormalization(IMAGENET_MEAN, IMAGENET_STD, bgr=True)])
def test_onnx_student_embeds_like_the_torch_student(tmp_path, norm):
    torch.manual_seed(0)
    network = create_network("mbf", 128).eval()
    path = str(tmp_path / "student.onnx")
    result = export_onnx(network, path, norm, input_format="uint8")
    assert result["embedding_size"] == 128 and result["relative_error"] < 1e-4
    onnx_student = load_embedder(path)  # a uint8 graph: fed as is, any batch size
    assert onnx_student.takes_uint8 and onnx_student.fixed_batch is None
    images = _images()
    expected = TorchEmbedder(network, norm).embed(images)
    got = onnx_student.embed(images)
    assert got.shape == (5, 128)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert "uint8 RGB" in meta["kd_plugin.input"]
    assert meta["kd_plugin.channels"] == ("BGR inside the graph" if norm.bgr else "RGB")


def test_export_from_a_training_config(tmp_path):
    torch.manual_seed(0)
    output = tmp_path / "job"
    output.mkdir()
    network = create_network("mbf", 64).eval()
    torch.save(network.state_dict(), output / "model.pt")
    config = tmp_path / "job_config.py"
    config.write_text("from easydict import EasyDict\nconfig = EasyDict()\n"
                      f"config.network = 'mbf'\nconfig.embedding_size = 64\nconfig.rec = {str(tmp_path)!r}\n"
                      f"config.num_classes = 10\nconfig.output = {str(output)!r}\n"
                      "config.kd = {'student_mean': 120.0, 'student_std': 60.0}\n")
    assert main(["export", str(config)]) == 0
    onnx_student = load_embedder(str(output / "model.onnx"))
    images = _images(3)
    expected = TorchEmbedder(network, InputNormalization(120.0, 60.0)).embed(images)
    np.testing.assert_allclose(onnx_student.embed(images), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_export_refuses_what_it_cannot_export(tmp_path, capsys):
    config = tmp_path / "c.py"
    config.write_text("config = {'network': 'mbf', 'embedding_size': 64, 'rec': '.', 'num_classes': 3, "
                      f"'output': {str(tmp_path / 'never_trained')!r}}}\n")
    assert main(["export", str(config)]) == 2
    assert "model.pt do not exist" in capsys.readouterr().err
    assert main(["export", "mbf", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "NETWORK:CHECKPOINT" in capsys.readouterr().err


def test_export_stops_when_onnx_disagrees_with_torch(tmp_path, monkeypatch):
    """A wrong graph is never kept: simulate onnxruntime disagreeing."""
    import onnxruntime

    class Wrong:
        def __init__(self, *a, **k):
            pass

        def run(self, names, feed):
            return [np.full((len(feed["input"]), 128), 9.0, np.float32)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Wrong)
    path = tmp_path / "bad.onnx"
    with pytest.raises(KDPluginError, match="differs from the torch module"):
        export_onnx(create_network("mbf", 128).eval(), str(path))
    assert not path.exists() and not list(tmp_path.glob("bad.onnx*.tmp"))


def _aligned_bgr_face():
    """An aligned 112x112 face as insightface takes it (BGR, HWC, uint8): a real one from the shared CelebA set when
    it is there, else a smooth synthetic image."""
    from conftest import SHARED_DATA
    from kd_plugin.data import open_dataset
    rec = SHARED_DATA / "celeba" / "val.rec"
    if rec.exists():
        rgb = open_dataset(str(rec))[0][0].numpy()  # (3, 112, 112) RGB
    else:
        rgb = np.repeat(np.linspace(0, 255, 112, dtype=np.uint8)[None, None, :], 112, axis=1).repeat(3, axis=0)
    return np.ascontiguousarray(rgb.transpose(1, 2, 0)[:, :, ::-1])


@pytest.mark.parametrize("norm", [InputNormalization(), InputNormalization(IMAGENET_MEAN, IMAGENET_STD, bgr=True)],
                         ids=["arcface", "imagenet_bgr"])
def test_insightface_model_zoo_loads_the_export_and_embeds_like_the_torch_student(tmp_path, norm):
    model_zoo = pytest.importorskip("insightface.model_zoo", reason="the insightface package is not installed "
                                                                    "(pip install insightface; the test extra has it)")
    torch.manual_seed(0)
    network = create_network("mbf", 128).eval()
    path = str(tmp_path / "student.onnx")
    assert export_onnx(network, path, norm)["format"] == "insightface"  # the default
    model = model_zoo.get_model(path, providers=["CPUExecutionProvider"])
    assert type(model).__name__ == "ArcFaceONNX" and (model.input_mean, model.input_std) == (0.0, 1.0)
    face = _aligned_bgr_face()
    got = model.get_feat(face).reshape(-1)
    expected = TorchEmbedder(network, norm).embed(np.ascontiguousarray(face[:, :, ::-1].transpose(2, 0, 1))[None])[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    batch = model.get_feat([face, face[:, ::-1].copy()])  # a dynamic batch
    assert batch.shape == (2, 128) and np.allclose(batch[0], got, rtol=1e-5, atol=1e-6)
    ours = load_embedder(path).embed(np.ascontiguousarray(face[:, :, ::-1].transpose(2, 0, 1))[None])[0]
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()  # kd-plugin eval reads it the same way


def test_the_insightface_graph_starts_with_its_named_normalization_nodes(tmp_path):
    from kd_plugin.teachers.onnx_embedder import graph_normalizes_inside
    path = tmp_path / "s.onnx"
    export_onnx(create_network("mbf", 64).eval(), str(path), InputNormalization(IMAGENET_MEAN, IMAGENET_STD))
    model = onnx.load(str(path))
    assert graph_normalizes_inside(model) and model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    names = [n.name for n in model.graph.node[:8]]
    assert "Sub_input_mean" in names and "Mul_input_scale" in names
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["kd_plugin.format"] == "insightface" and meta["kd_plugin.mean"] == "123.675,116.28,103.53"
