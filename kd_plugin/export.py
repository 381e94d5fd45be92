"""`kd-plugin export`: a trained student as an ONNX file that takes uint8 RGB images.

The graph holds the student's input normalisation, so the file is self-describing: input `input`, uint8
(N, 3, H, W), RGB, pixel values 0..255; output `embedding`, float32 (N, d), not L2-normalised (as arcface_torch's own
ONNX export). The batch dimension is dynamic. The same facts are written into the file's metadata (`kd_plugin.*` keys)
and the export is checked against the torch module with onnxruntime before it is kept.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from kd_plugin.errors import KDPluginError
from kd_plugin.normalization import InputNormalization

INPUT_DOC = "uint8 RGB images (N, 3, H, W), pixel values 0..255; the normalisation is inside the graph"


class NormalizedInput(nn.Module):
    """`network((uint8 RGB - mean) / std)`, the channel order swapped when the network was trained on BGR."""

    def __init__(self, network: nn.Module, normalization: InputNormalization) -> None:
        super().__init__()
        self.network, self.normalization = network, normalization

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalization.torch(images)).float()  # traced: mean and std become constants


def export_onnx(network: nn.Module, path: str, normalization: InputNormalization | None = None,
                input_size: tuple[int, int] = (112, 112), opset: int = 17, check_batch: int = 4) -> dict:
    """Write `network` as ONNX to `path` (atomically) and check it against torch; returns what was written."""
    import onnx
    import onnxruntime as ort

    normalization = normalization or InputNormalization()
    wrapper = NormalizedInput(network, normalization).eval()
    example = torch.randint(0, 256, (check_batch, 3, *input_size), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = wrapper(example).numpy()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with warnings.catch_warnings():
        # the TorchScript exporter (it needs no onnxscript) warns of its deprecation, and of the traced constants
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), tmp, input_names=["input"], output_names=["embedding"],
                          dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    model = onnx.load(tmp)
    meta = {"kd_plugin.input": INPUT_DOC, "kd_plugin.mean": ",".join(f"{v:g}" for v in normalization.mean),
            "kd_plugin.std": ",".join(f"{v:g}" for v in normalization.std),
            "kd_plugin.channels": "BGR inside the graph" if normalization.bgr else "RGB",
            "kd_plugin.output": f"embedding (N, {expected.shape[1]}) float32, not L2-normalised"}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, tmp)
    session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": example.numpy()})[0]
    error = float(np.abs(got - expected).max() / max(1e-12, float(np.abs(expected).max())))
    if not error < 1e-4:
        os.remove(tmp)
        raise KDPluginError(f"{path}: the ONNX export differs from the torch module (relative error {error:.2e}); "
                            f"the file was not written. Try another --opset")
    os.replace(tmp, path)
    return {"path": path, "embedding_size": int(expected.shape[1]), "input_size": list(input_size),
            "relative_error": error, "metadata": meta}


def export_from_config(config_path: str, out: str | None = None, checkpoint: str | None = None,
                       opset: int = 17) -> dict:
    """Export the student of a training config: its network, `<output>/model.pt` and its `kd.student_mean/std`."""
    from kd_plugin.config import load_config
    from kd_plugin.teachers import build_network

    cfg = load_config(config_path)
    checkpoint = checkpoint or os.path.join(cfg.output, "model.pt")
    if not os.path.isfile(checkpoint):
        raise KDPluginError(f"{config_path}: the student's weights {checkpoint} do not exist (config.output = "
                            f"{cfg.output}); train first, or give --checkpoint")
    network = build_network(f"{cfg.network}:{checkpoint}", cfg.embedding_size)
    norm = InputNormalization(cfg.kd.student_mean, cfg.kd.student_std)
    return export_onnx(network, out or os.path.join(cfg.output, "model.onnx"), norm, opset=opset)
