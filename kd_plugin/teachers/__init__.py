"""Teachers and other embedding models: anything with `embed(uint8 batch) -> float embeddings`."""

from __future__ import annotations

import os

from kd_plugin.errors import KDPluginError
from kd_plugin.normalization import InputNormalization
from kd_plugin.teachers.onnx_embedder import OnnxEmbedder


def load_embedder(spec: str, normalization: InputNormalization | None = None, batch_size: int = 64) -> OnnxEmbedder:
    """Open a model spec for embedding; this version accepts ONNX files (`path/to/model.onnx`)."""
    if os.fspath(spec).lower().endswith(".onnx"):
        return OnnxEmbedder(spec, normalization, batch_size=batch_size)
    raise KDPluginError(f"model {spec!r}: only ONNX files (*.onnx) can be evaluated in this version; export the "
                        f"network to ONNX (arcface_torch's torch2onnx.py) and pass that file")
