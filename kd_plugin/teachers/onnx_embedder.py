"""Embedding networks stored as ONNX files: converted to a torch module on the run's device (checked once against
onnxruntime), or, for a graph the converter does not read, run with onnxruntime itself."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from kd_plugin.errors import KDPluginError
from kd_plugin.extras import import_extra
from kd_plugin.normalization import InputNormalization
from kd_plugin.teachers.formats import Embedder
from kd_plugin.teachers.torch_embedder import TorchEmbedder

CHECK_IMAGES = 4  # real images compared with onnxruntime, once per file and process
CHECK_TOLERANCE = 1e-4  # max |torch - onnxruntime| / max |onnxruntime|, in fp32
# (path, size, mtime) -> relative error, of the files whose torch module matched onnxruntime in this process
_CHECKED: dict = {}


class OnnxEmbedder(Embedder):
    """`embed(uint8 (N,3,H,W) RGB) -> float32 (N, d)` for an ONNX face network; fixed-batch files are looped."""

    def __init__(self, path: str, normalization: InputNormalization | None = None, batch_size: int = 64,
                 threads: int | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        ort = import_extra("onnxruntime", f"the ONNX teacher {path}")  # imported here: only ONNX users pay

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        self.normalization = normalization or InputNormalization()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(self.path, options, providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise KDPluginError(f"{self.path}: onnxruntime cannot load this model ({exc})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise KDPluginError(f"{self.path}: expected a model with one image input, found {len(inputs)} inputs")
        self.input_name = inputs[0].name
        # a uint8 input (kd-plugin export) normalises inside the graph: it is fed the images as they are
        self.takes_uint8 = inputs[0].type == "tensor(uint8)"
        shape = inputs[0].shape
        if len(shape) != 4 or shape[1] != 3:
            raise KDPluginError(f"{self.path}: input {self.input_name!r} has shape {shape}; expected (N, 3, H, W)")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.input_size = tuple(s if isinstance(s, int) else None for s in shape[2:])
        self.batch_size = self.fixed_batch or batch_size

    def embed(self, images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Embed uint8 RGB images (N, 3, H, W); returns raw (not L2-normalised) float32 embeddings (N, d), as numpy
        for numpy input or as a tensor on the input's device for tensor input."""
        if isinstance(images, torch.Tensor):
            return torch.from_numpy(self.embed(images.cpu().numpy())).to(images.device)
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"{self.path}: embed() takes uint8 images, got {images.dtype}")
        if any(want is not None and want != got for want, got in zip(self.input_size, images.shape[2:])):
            raise ValueError(f"{self.path}: model expects {self.input_size} inputs, got images of {images.shape[2:]}")
        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            chunk = np.ascontiguousarray(chunk) if self.takes_uint8 else self.normalization.numpy(chunk)
            real = len(chunk)
            if self.fixed_batch and real < self.fixed_batch:  # pad the last chunk of a fixed-batch model
                chunk = np.concatenate([chunk, np.zeros((self.fixed_batch - real, *chunk.shape[1:]), chunk.dtype)])
            out = self.session.run(None, {self.input_name: chunk})[0]
            outputs.append(np.asarray(out, dtype=np.float32).reshape(len(chunk), -1)[:real])
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


class CheckedOnnxModule(TorchEmbedder):
    """An ONNX teacher converted to torch (`kd_plugin.teachers.onnx_graph`), on the run's device and under its
    autocast like any torch teacher. Its first `embed` compares up to CHECK_IMAGES of the real images it is given with
    onnxruntime, in fp32 (at most CHECK_IMAGES onnxruntime calls, once per file in a process), and raises if they
    differ by more than CHECK_TOLERANCE; no later call touches onnxruntime."""

    def __init__(self, path: str, module, normalization: InputNormalization, device, amp_dtype, batch_size: int) -> None:
        self.takes_uint8 = module.takes_uint8  # read from the graph when it was converted
        super().__init__(module, normalization, device=device, amp_dtype=amp_dtype, batch_size=batch_size, spec=path,
                         raw_uint8=self.takes_uint8)
        self.path, self.fixed_batch = path, module.fixed_batch  # the module itself takes any batch size
        stat = os.stat(path)
        self._key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)

    def embed(self, images):
        self.check(images)
        return super().embed(images)

    def check(self, images) -> None:
        """Compare the module with onnxruntime on the first CHECK_IMAGES of `images` (uint8 RGB, or a function that
        returns them), unless this file was checked before in this process; the run builds its teacher with this call,
        so no step runs it."""
        if self._key in _CHECKED:
            self.check_error = _CHECKED[self._key]
            return
        images = (images() if callable(images) else images)[:CHECK_IMAGES]
        reference = OnnxEmbedder(self.path, self.normalization, batch_size=CHECK_IMAGES)
        sample = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        expected = reference.embed(sample)
        amp, self.amp_dtype = self.amp_dtype, None  # the check runs in fp32: the file's own precision
        try:
            got = np.asarray(TorchEmbedder.embed(self, sample))
        finally:
            self.amp_dtype = amp
        error = float(np.abs(got - expected).max() / max(1e-12, float(np.abs(expected).max())))
        if not error <= CHECK_TOLERANCE:
            raise KDPluginError(
                f"{self.path}: converted to torch, it differs from onnxruntime by {error:.2e} (relative, on "
                f"{len(sample)} of the run's images; allowed {CHECK_TOLERANCE:g}). Cache the teacher instead: "
                f"`kd-plugin cache --teacher {self.path} ...` on the training machine, then config.kd.cache")
        _CHECKED[self._key] = self.check_error = error  # kd-plugin check prints it


def load_onnx_embedder(path: str, normalization: InputNormalization, device: str | torch.device = "cpu",
                       amp_dtype: torch.dtype | None = None, batch_size: int = 64):
    """An ONNX teacher on `device`: as a torch module when the converter reads its graph, else onnxruntime — on the
    CPU only for a CPU run; a GPU run takes onnxruntime's CUDA provider when installed, and is refused otherwise."""
    from kd_plugin.teachers.onnx_graph import UnsupportedGraph, load_graph_module

    device = torch.device(device)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        module = load_graph_module(path)
    except UnsupportedGraph as exc:
        reason = str(exc)
    else:
        return CheckedOnnxModule(path, module, normalization, device, amp_dtype, batch_size)
    if amp_dtype is not None:
        raise KDPluginError(f"{reason}, so onnxruntime would run it in the precision of its graph, not in "
                            f"{amp_dtype} as kd.teacher_amp asks: remove kd.teacher_amp, or cache the teacher "
                            f"(`kd-plugin cache --teacher {path} ...`)")
    if device.type == "cpu":
        warnings.warn(f"{reason}; the teacher runs with onnxruntime on the CPU", stacklevel=2)
        return OnnxEmbedder(path, normalization, batch_size=batch_size)
    ort = import_extra("onnxruntime", f"the ONNX teacher {path}")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        warnings.warn(f"{reason}; the teacher runs with onnxruntime's CUDA provider (each batch crosses the host)",
                      stacklevel=2)
        return OnnxEmbedder(path, normalization, batch_size=batch_size, providers=("CUDAExecutionProvider",))
    raise KDPluginError(f"{reason}, and onnxruntime has no CUDA provider here (install onnxruntime-gpu), so this "
                        f"teacher would run on the CPU in a {device.type} run. Cache it instead on the training "
                        f"machine: `kd-plugin cache --teacher {path} ...`, then config.kd.cache")


def insightface_normalization(path: str) -> InputNormalization:
    """The input convention insightface applies to a recognition ONNX pack (`w600k_r50.onnx`, `glintr100.onnx`, ...).

    With the insightface package installed its own loader decides; otherwise the same rule is applied here: a graph
    that starts with Sub and Mul nodes normalises inside (an old mxnet export: mean 0, std 1), any other takes
    (x - 127.5) / 127.5. Either way the network sees RGB."""
    try:
        from insightface.model_zoo import get_model
    except ImportError:
        get_model = None
    if get_model is not None:
        try:
            model = get_model(path, providers=["CPUExecutionProvider"])
            if model is not None and hasattr(model, "input_mean"):
                return InputNormalization(float(model.input_mean), float(model.input_std))
        except Exception:  # not a pack insightface recognises: fall back to the rule below
            pass
    import onnx
    normalizes_inside = graph_normalizes_inside(onnx.load(path, load_external_data=False))
    return InputNormalization(0.0, 1.0) if normalizes_inside else InputNormalization(127.5, 127.5)


def graph_normalizes_inside(model) -> bool:
    """insightface's rule for a recognition graph (ArcFaceONNX): a node named Sub* (or _minus*) and one named Mul*
    (or _mul*) among its first 8 nodes mean the graph normalises its input itself (fed 0..255, mean 0, std 1)."""
    names = [node.name for node in model.graph.node[:8]]
    return (any(n.startswith(("Sub", "_minus")) for n in names)
            and any(n.startswith(("Mul", "_mul")) for n in names))
