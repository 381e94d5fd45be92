"""Embedding networks stored as ONNX files, run with onnxruntime on uint8 RGB batches."""

from __future__ import annotations

import os

import numpy as np

from kd_plugin.errors import KDPluginError
from kd_plugin.normalization import InputNormalization


class OnnxEmbedder:
    """`embed(uint8 (N,3,H,W) RGB) -> float32 (N, d)` for an ONNX face network; fixed-batch files are looped."""

    def __init__(self, path: str, normalization: InputNormalization | None = None, batch_size: int = 64,
                 threads: int | None = None) -> None:
        import onnxruntime as ort  # imported here: only ONNX users pay for it

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        self.normalization = normalization or InputNormalization()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise KDPluginError(f"{self.path}: onnxruntime cannot load this model ({exc})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise KDPluginError(f"{self.path}: expected a model with one image input, found {len(inputs)} inputs")
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        if len(shape) != 4 or shape[1] != 3:
            raise KDPluginError(f"{self.path}: input {self.input_name!r} has shape {shape}; expected (N, 3, H, W)")
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.input_size = tuple(s if isinstance(s, int) else None for s in shape[2:])
        self.batch_size = self.fixed_batch or batch_size
        self.embedding_size = self.embed(np.zeros((1, 3, *(s or 112 for s in self.input_size)), np.uint8)).shape[1]

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed uint8 RGB images (N, 3, H, W); returns raw (not L2-normalised) float32 embeddings (N, d)."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"{self.path}: embed() takes uint8 images, got {images.dtype}")
        if any(want is not None and want != got for want, got in zip(self.input_size, images.shape[2:])):
            raise ValueError(f"{self.path}: model expects {self.input_size} inputs, got images of {images.shape[2:]}")
        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = self.normalization.numpy(images[start:start + self.batch_size])
            real = len(chunk)
            if self.fixed_batch and real < self.fixed_batch:  # pad the last chunk of a fixed-batch model
                chunk = np.concatenate([chunk, np.zeros((self.fixed_batch - real, *chunk.shape[1:]), chunk.dtype)])
            out = self.session.run(None, {self.input_name: chunk})[0]
            outputs.append(np.asarray(out, dtype=np.float32).reshape(len(chunk), -1)[:real])
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
