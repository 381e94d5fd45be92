"""`kd-plugin export`: a trained student as an ONNX file, with its input normalisation inside the graph.

Two input formats. `insightface` (the default): input `input`, float32 (N, 3, H, W), RGB, pixel values 0..255, the
graph starting with nodes named `Sub...` (the mean) and `Mul...` (1/std) — insightface's `ArcFaceONNX` reads that as
"normalises inside" and feeds its aligned faces as they are (mean 0, std 1, BGR swapped to RGB), so
`insightface.model_zoo.get_model(path)` embeds exactly as the torch student does, whatever the student's own
normalisation (arcface's 127.5/127.5, ImageNet's, BGR). `uint8`: input uint8 RGB (N, 3, H, W), 0..255. Either way the
output `embedding` is float32 (N, d), not L2-normalised (as arcface_torch's own ONNX export), the batch dimension is
dynamic, the facts are in the file's metadata (`kd_plugin.*` keys), and the export is checked against the torch module
with onnxruntime before it is kept.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from kd_plugin.atomic import replacing
from kd_plugin.errors import KDPluginError
from kd_plugin.extras import import_extra
from kd_plugin.normalization import InputNormalization

INPUT_DOCS = {"uint8": "uint8 RGB images (N, 3, H, W), pixel values 0..255; the normalisation is inside the graph",
              "insightface": "float32 RGB images (N, 3, H, W), pixel values 0..255; the normalisation is inside the "
                             "graph (its first nodes Sub, Mul: insightface's ArcFaceONNX feeds it with mean 0, std 1)"}
FORMATS = tuple(INPUT_DOCS)


class NormalizedInput(nn.Module):
    """`network((uint8 RGB - mean) / std)`, the channel order swapped when the network was trained on BGR."""

    def __init__(self, network: nn.Module, normalization: InputNormalization) -> None:
        super().__init__()
        self.network, self.normalization = network, normalization

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalization.torch(images)).float()  # traced: mean and std become constants


class InsightfaceInput(nn.Module):
    """`network((float RGB 0..255 - mean) * (1 / std))`: a Sub and a Mul as the graph's first nodes, the channels
    swapped after them when the network was trained on BGR."""

    def __init__(self, network: nn.Module, normalization: InputNormalization) -> None:
        super().__init__()
        self.network, self.bgr = network, normalization.bgr
        self.register_buffer("mean", torch.tensor(normalization.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("scale", 1.0 / torch.tensor(normalization.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) * self.scale
        return self.network(x.flip(1) if self.bgr else x).float()


def _name_normalization_nodes(model) -> None:
    """Move the graph's first Sub and Mul (the input normalisation, with whatever produces their constants) to its
    front, give them the names insightface's ArcFaceONNX looks for, and check its rule holds."""
    import onnx

    from kd_plugin.teachers.onnx_embedder import graph_normalizes_inside

    nodes = list(model.graph.node)
    producers = {out: n for n in nodes for out in n.output}
    wanted = [next(n for n in nodes if n.op_type == op) for op in ("Sub", "Mul")]
    front: list = []
    placed: set[int] = set()

    def pull(node) -> None:  # a node after everything it reads, in order
        for name in node.input:
            if name in producers and id(producers[name]) not in placed:
                pull(producers[name])
        if id(node) not in placed:
            front.append(node)
            placed.add(id(node))
    for node in wanted:
        pull(node)
    wanted[0].name, wanted[1].name = "Sub_input_mean", "Mul_input_scale"
    copies = [type(n)() for n in front] + [type(n)() for n in nodes if id(n) not in placed]
    for copy, node in zip(copies, front + [n for n in nodes if id(n) not in placed]):
        copy.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(copies)
    onnx.checker.check_model(model)
    if not graph_normalizes_inside(model):
        raise KDPluginError("the exported graph's Sub and Mul cannot be placed among its first 8 nodes, so insightface "
                            "would normalise the input a second time; export with --format uint8 instead")


def export_onnx(network: nn.Module, path: str, normalization: InputNormalization | None = None,
                input_size: tuple[int, int] = (112, 112), opset: int = 17, check_batch: int = 4,
                input_format: str = "insightface") -> dict:
    """Write `network` as ONNX to `path` (atomically) and check it against torch; returns what was written."""
    import onnx

    ort = import_extra("onnxruntime", "kd-plugin export (it checks the written file against torch)")

    if input_format not in FORMATS:
        raise KDPluginError(f"export format {input_format!r}: expected one of {', '.join(FORMATS)}")
    normalization = normalization or InputNormalization()
    example = torch.randint(0, 256, (check_batch, 3, *input_size), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    if input_format == "uint8":
        wrapper = NormalizedInput(network, normalization).eval()
    else:
        wrapper, example = InsightfaceInput(network, normalization).eval(), example.float()
    with torch.no_grad():
        expected = wrapper(example).numpy()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with replacing(path) as tmp:  # a failed check leaves no file behind
        with warnings.catch_warnings():
            # the TorchScript exporter (it needs no onnxscript) warns of its deprecation, and of the traced constants
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), tmp, input_names=["input"], output_names=["embedding"],
                              dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
        model = onnx.load(tmp)
        if input_format == "insightface":
            _name_normalization_nodes(model)
        meta = {"kd_plugin.input": INPUT_DOCS[input_format], "kd_plugin.format": input_format,
                "kd_plugin.mean": ",".join(f"{v:g}" for v in normalization.mean),
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
            raise KDPluginError(f"{path}: the ONNX export differs from the torch module (relative error {error:.2e}); "
                                f"the file was not written. Try another --opset")
    return {"path": path, "embedding_size": int(expected.shape[1]), "input_size": list(input_size),
            "relative_error": error, "metadata": meta, "format": input_format}


def export_from_config(config_path: str, out: str | None = None, checkpoint: str | None = None,
                       opset: int = 17, input_format: str = "insightface") -> dict:
    """Export the student of a training config: its network, `<output>/model.pt` and its `kd.student_mean/std`."""
    from kd_plugin.run.config import load_config
    from kd_plugin.networks import build_network

    cfg = load_config(config_path)
    checkpoint = checkpoint or os.path.join(cfg.output, "model.pt")
    if not os.path.isfile(checkpoint):
        raise KDPluginError(f"{config_path}: the student's weights {checkpoint} do not exist (config.output = "
                            f"{cfg.output}); train first, or give --checkpoint")
    network = build_network(f"{cfg.network}:{checkpoint}", cfg.embedding_size)
    norm = InputNormalization(cfg.kd.student_mean, cfg.kd.student_std)
    return export_onnx(network, out or os.path.join(cfg.output, "model.onnx"), norm, opset=opset,
                       input_format=input_format)
