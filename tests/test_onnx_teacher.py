"""ONNX teachers as torch modules on the run's device: equal to onnxruntime on real faces, checked once, onnxruntime
left out of every step; the fallbacks for a graph the converter does not read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import CPU_HARNESS, shared

from kd_plugin.data.datasets import open_dataset
from kd_plugin.errors import KDPluginError
from kd_plugin.export import export_onnx
from kd_plugin.networks import create_network
from kd_plugin.normalization import IMAGENET_MEAN, IMAGENET_STD, InputNormalization
from kd_plugin.teachers import load_embedder, onnx_embedder
from kd_plugin.teachers.onnx_embedder import CheckedOnnxModule, OnnxEmbedder
from kd_plugin.teachers.onnx_graph import UnsupportedGraph, load_graph_module

IMAGENET = InputNormalization(IMAGENET_MEAN, IMAGENET_STD)


def _faces(n=16):
    data = open_dataset(str(shared("celeba", "val.rec")))
    return torch.stack([data[i][0] for i in range(0, 7 * n, 7)])


def _relative(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """ONNX files `kd-plugin export` writes from an r50 and an mbf (both input formats)."""
    folder = tmp_path_factory.mktemp("exports")
    paths = {}
    for name in ("r50", "mbf"):
        torch.manual_seed(3)
        network = create_network(name, 512).eval()
        for fmt in ("insightface", "uint8"):
            paths[name, fmt] = str(folder / f"{name}_{fmt}.onnx")
            export_onnx(network, paths[name, fmt], IMAGENET if name == "mbf" else None, input_format=fmt)
    return paths


@pytest.mark.parametrize("name", ["mobilefacenet_dynamic.onnx", "mobilefacenet_b1.onnx"])
def test_the_shared_teacher_as_a_torch_module_equals_onnxruntime_on_real_faces(name):
    path = str(shared("teachers", "mobilefacenet_ms1m", name))
    faces = _faces()
    expected = OnnxEmbedder(path, IMAGENET).embed(faces.numpy())
    teacher = load_embedder(path, IMAGENET)
    assert isinstance(teacher, CheckedOnnxModule)
    got = teacher.embed(faces)  # one call for the whole batch, also for the batch-1 file
    assert got.shape == (16, 128) and _relative(got, expected) <= 1e-4


def test_the_converted_graph_drops_each_value_after_its_last_reader():
    """A forward holds the live values only (kd-plugin check found the whole graph's activations held until the end:
    1.5 GB added for 64 faces through the shared MobileFaceNet on a CPU, 0.2 GB since)."""
    module = load_graph_module(str(shared("teachers", "mobilefacenet_ms1m", "mobilefacenet_dynamic.onnx")))
    live, peak = {module.input_name}, 0
    for i, ((_, _, names, outputs), release) in enumerate(zip(module.steps, module.release)):
        later = {name for _, _, reads, _ in module.steps[i + 1:] for name in reads}
        assert not (set(release) & later) and module.output_name not in release  # never dropped before its reader
        live = (live | {outputs[0]}) - set(release)
        peak = max(peak, len(live))
    assert live == {module.output_name} and peak <= 4  # a chain with residual branches: a handful at a time


@pytest.mark.parametrize("key", [("r50", "insightface"), ("r50", "uint8"), ("mbf", "insightface"), ("mbf", "uint8")],
                         ids=lambda k: "-".join(k))
def test_exported_students_as_torch_modules_equal_onnxruntime_on_real_faces(exported, key):
    path = exported[key]
    norm = InputNormalization(0.0, 1.0) if key[1] == "insightface" else None  # the graph normalises inside
    faces = _faces(8)
    expected = OnnxEmbedder(path, norm).embed(faces.numpy())
    got = load_embedder(path, norm).embed(faces)
    assert got.shape == (8, 512) and _relative(got, expected) <= 1e-4


class _Calls:
    """Counts onnxruntime's InferenceSession.run calls."""

    def __init__(self, monkeypatch):
        import onnxruntime
        self.count, real = 0, onnxruntime.InferenceSession.run

        def run(session, *args, **kwargs):
            self.count += 1
            return real(session, *args, **kwargs)
        monkeypatch.setattr(onnxruntime.InferenceSession, "run", run)


def test_the_check_runs_once_per_file_and_refuses_a_mismatch(monkeypatch, tmp_path):
    path = shutil.copy(shared("teachers", "mobilefacenet_ms1m", "mobilefacenet_b1.onnx"), tmp_path / "b1.onnx")
    calls = _Calls(monkeypatch)
    faces = _faces()
    for _ in range(2):  # a second embedder of the same file (centre estimation, then training) is not re-checked
        teacher = load_embedder(str(path), IMAGENET)
        teacher.embed(faces)
        teacher.embed(faces)
    assert calls.count == onnx_embedder.CHECK_IMAGES  # the batch-1 file: one onnxruntime call per checked image

    os.utime(path, ns=(1, 1))  # the same file, touched: checked again, and a module that drifts is refused
    drifting = load_embedder(str(path), IMAGENET)
    first = next(name for name in drifting.module.slots.values())
    getattr(drifting.module, first).mul_(1.01)
    with pytest.raises(KDPluginError, match=r"differs from onnxruntime .*kd-plugin cache"):
        drifting.embed(faces)


def _unknown_op_graph(path):
    import onnx
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Erf", ["input"], ["e"], name="erf"),
             helper.make_node("Flatten", ["e"], ["output"], name="flat")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3, 4, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 48])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return str(path)


def test_a_graph_the_converter_cannot_read_falls_back_on_cpu_and_is_refused_on_a_gpu_without_ort_cuda(tmp_path):
    path = _unknown_op_graph(tmp_path / "erf.onnx")
    with pytest.raises(UnsupportedGraph, match="operators Erf"):
        load_graph_module(path)
    with pytest.warns(UserWarning, match="onnxruntime on the CPU"):
        cpu = load_embedder(path, InputNormalization(0.0, 1.0))
    assert isinstance(cpu, OnnxEmbedder)
    import onnxruntime
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider: the refusal is for one without")
    with pytest.raises(KDPluginError, match=r"Erf.*no CUDA provider.*kd-plugin cache --teacher"):
        load_embedder(path, InputNormalization(0.0, 1.0), device="cuda:0")


def test_the_converted_teacher_runs_under_the_teachers_autocast():
    path = str(shared("teachers", "mobilefacenet_ms1m", "mobilefacenet_dynamic.onnx"))
    faces = _faces(8)
    full = load_embedder(path, IMAGENET).embed(faces)
    seen = []
    low = load_embedder(path, IMAGENET, amp_dtype=torch.bfloat16)
    low.check(faces)  # fp32 check first, then spy on the convolutions of the bf16 run
    hook = torch.nn.functional.conv2d

    def spy(x, w, *args, **kwargs):
        out = hook(x, w, *args, **kwargs)
        seen.append(out.dtype)
        return out
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "conv2d", spy)
        half = low.embed(faces)
    assert seen and set(seen) == {torch.bfloat16}
    assert half.dtype == torch.float32 and _relative(half, full) < 0.05  # bf16 precision, same embeddings


def test_under_emulated_cuda_the_module_and_its_input_are_on_the_device_and_no_step_calls_onnxruntime(tmp_path):
    """The CPU harness's device emulation: the converted module is moved to the run's device, so every weight it holds
    was sent there, the images are sent there before they are normalised, and after the one check no embed calls
    onnxruntime. (The harness's strict forward check cannot be used here: it only knows tensors moved by hand, not
    the normalised images computed from them on the device.)"""
    if not (CPU_HARNESS / "sitecustomize.py").is_file():
        pytest.skip("the CPU harness is not here")
    path = str(shared("teachers", "mobilefacenet_ms1m", "mobilefacenet_dynamic.onnx"))
    script = textwrap.dedent(f"""
        import onnxruntime, torch
        from kd_plugin.data.datasets import open_dataset
        from kd_plugin.normalization import InputNormalization, IMAGENET_MEAN, IMAGENET_STD
        from kd_plugin.teachers import load_embedder
        data = open_dataset({str(shared("celeba", "val.rec"))!r})
        faces = torch.stack([data[i][0] for i in range(8)])
        teacher = load_embedder({path!r}, InputNormalization(IMAGENET_MEAN, IMAGENET_STD), device="cuda:1")
        teacher.check(faces)
        calls, moved = [], []
        real = onnxruntime.InferenceSession.run
        onnxruntime.InferenceSession.run = lambda *a, **k: calls.append(1) or real(*a, **k)
        unmarked = [n for n, b in teacher.module.named_buffers() if not getattr(b, "_sent_to_cuda", False)]
        assert not unmarked, unmarked  # every weight went to cuda:1 with the module
        harness_to = torch.Tensor.to
        def to(self, *a, **k):
            moved.append((self.dtype, tuple(self.shape), str(k.get("device", a[0] if a else None))))
            return harness_to(self, *a, **k)
        torch.Tensor.to = to
        out = teacher.embed(faces.to("cuda:1"))
        torch.Tensor.to = harness_to
        # the uint8 batch reaches the module through a move to the run's device (normalised there)
        assert (torch.uint8, (8, 3, 112, 112), "cuda:1") in moved, moved
        assert out.shape == (8, 128) and not calls, calls
        print("OK", teacher.device)
    """)
    env = dict(os.environ, PYTHONPATH=str(CPU_HARNESS), OMP_NUM_THREADS="1")
    env.pop("KD_CPU_SHIM_LAX", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and "OK cuda:1" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_centre_estimation_and_three_training_steps_with_the_onnx_teacher_online_call_onnxruntime_at_most_5_times(
        monkeypatch, tmp_path):
    from test_train import make_faces

    from kd_plugin.run.config import resolve
    from kd_plugin.run.train import train

    # the batch-1 file (the worst case for onnxruntime), under a path new to this process
    teacher = str(shutil.copy(shared("teachers", "mobilefacenet_ms1m", "mobilefacenet_b1.onnx"), tmp_path / "b1.onnx"))
    data = make_faces(tmp_path / "faces", identities=4, per_identity=6)  # 3 steps of 8
    calls = _Calls(monkeypatch)
    config = {"rec": str(data), "num_classes": 4, "network": "mbf", "embedding_size": 128, "batch_size": 8,
              "lr": 0.1, "num_epoch": 1, "warmup_epoch": 0, "num_workers": 0, "output": str(tmp_path / "out"),
              "frequent": 1, "max_steps": 3, "kd": {"method": "proxyless", "teacher": teacher, "proxyless": {"centres": "estimate"},
                                                    "teacher_mean": "123.675,116.28,103.53",
                                                    "teacher_std": "58.395,57.12,57.375"}}
    train(resolve(config))
    with open(tmp_path / "out" / "train_log.jsonl") as f:
        assert sum('"loss"' in line for line in f) == 3
    assert 1 <= calls.count <= 5  # today's check: CHECK_IMAGES calls; before the conversion: one per image
