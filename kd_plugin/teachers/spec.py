"""One model spec string for teachers and students, in config and CLI alike.

- `r100:path/backbone.pth` — an arcface_torch network name with a checkpoint (`backbone.pth`, `model.pt`, or the
  `state_dict_backbone` of `checkpoint_gpu_0.pt`); `r100` alone builds it untrained (students). Built from the
  arcface_torch checkout when one is importable (`ARCFACE_TORCH_ROOT`, or the working directory), else from
  kd_plugin's own definitions, which have the same state_dict keys.
- `timm:<name>` or `timm:<name>:path.pth` — a timm body with an embedding neck (needs timm).
- `path/model.onnx` — an ONNX file, converted to a torch module on the run's device and checked once against
  onnxruntime (`kd_plugin.teachers.onnx_embedder.load_onnx_embedder`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from kd_plugin.errors import KDPluginError
from kd_plugin.normalization import ARCFACE_MEAN, ARCFACE_STD, IMAGENET_MEAN, IMAGENET_STD, InputNormalization
from kd_plugin.teachers.checkpoints import backbone_state_dict, infer_embedding_size


ARCFACE_TORCH_NAMES = ("r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large", "vit_t", "vit_s", "vit_b")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: `kind` is "onnx", "arcface" or "timm"."""

    kind: str
    name: str
    checkpoint: str | None = None

    def __str__(self) -> str:
        if self.kind == "onnx":
            return self.name
        head = f"timm:{self.name}" if self.kind == "timm" else self.name
        return f"{head}:{self.checkpoint}" if self.checkpoint else head


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse a spec string; unknown network names are refused with the list of known ones."""
    spec = os.fspath(spec).strip()
    if spec.lower().endswith(".onnx"):
        return ModelSpec("onnx", spec)
    from kd_plugin.networks import network_names

    if spec.startswith("timm:"):
        name, _, checkpoint = spec[len("timm:"):].partition(":")
        if not name:
            raise KDPluginError(f"model spec {spec!r}: expected timm:<model name>[:checkpoint]")
        return ModelSpec("timm", name, checkpoint or None)
    name, _, checkpoint = spec.partition(":")
    if name not in network_names():
        raise KDPluginError(f"model spec {spec!r}: unknown network {name!r}; expected one of "
                            f"{', '.join(network_names())} (optionally ':checkpoint'), 'timm:<name>', or an .onnx file")
    return ModelSpec("arcface", name, checkpoint or None)


def default_normalization(spec: ModelSpec) -> InputNormalization:
    """Input convention of a model kind: arcface_torch networks 127.5/127.5, timm ImageNet, ONNX as insightface reads it."""
    if spec.kind == "timm":
        return InputNormalization(IMAGENET_MEAN, IMAGENET_STD)
    if spec.kind == "onnx":
        from kd_plugin.teachers.onnx_embedder import insightface_normalization
        return insightface_normalization(spec.name)
    return InputNormalization(ARCFACE_MEAN, ARCFACE_STD)


def build_network(spec: str | ModelSpec, embedding_size: int | None = None, fp16: bool = False,
                  dropout: float = 0.0, own_definition: bool = False) -> nn.Module:
    """The torch module of an `arcface` or `timm` spec, with its checkpoint loaded strictly when one is given.
    `own_definition`: kd_plugin's definition of an arcface_torch network even where the checkout is importable (same
    state_dict keys and computation)."""
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "onnx":
        raise KDPluginError(f"{spec.name}: an ONNX file cannot be trained or built as a torch module; use it as a "
                            f"teacher, or give a network name (r50, mbf, ...) for a student")
    state = backbone_state_dict(spec.checkpoint) if spec.checkpoint else None
    found = infer_embedding_size(state) if state is not None else None
    if embedding_size is not None and found is not None and found != embedding_size:
        raise KDPluginError(f"{spec.checkpoint}: the checkpoint's embedding size is {found}, the config asks for "
                            f"{embedding_size} (embedding_size); use the matching value")
    size = embedding_size or found or 512
    if spec.kind == "timm":
        from kd_plugin.networks.timm_network import TimmEmbeddingNet
        module = TimmEmbeddingNet(spec.name, size, dropout=dropout)
    else:
        from kd_plugin.networks import create_network, load_upstream_get_model
        upstream = load_upstream_get_model(None) if spec.name in ARCFACE_TORCH_NAMES and not own_definition else None
        module = (upstream(spec.name, dropout=dropout, fp16=fp16, num_features=size) if upstream is not None
                  else create_network(spec.name, size, fp16=fp16, dropout=dropout))
    if state is not None:
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise KDPluginError(f"{spec.checkpoint}: does not fit network {spec.name!r} with embedding size {size}: "
                                f"missing keys {result.missing_keys[:5]}, unexpected keys "
                                f"{result.unexpected_keys[:5]}; is it the right network name?")
    return module


def load_embedder(spec: str, normalization: InputNormalization | None = None, device: str = "cpu",
                  amp_dtype: torch.dtype | None = None, batch_size: int = 64, embedding_size: int | None = None,
                  onnx_on_cpu: str = "torch"):
    """A frozen embedder for any spec: `embed(uint8 (N,3,H,W) RGB) -> float32 (N, d)`. `onnx_on_cpu`: how an ONNX
    file runs when `device` is the CPU — "torch" (converted, as on any device: a training teacher) or "onnxruntime"
    (evaluation and caching on a CPU, where onnxruntime is 1.5-3x faster than torch's CPU convolutions)."""
    from kd_plugin.teachers.onnx_embedder import OnnxEmbedder, load_onnx_embedder
    from kd_plugin.teachers.torch_embedder import TorchEmbedder

    parsed = parse_model_spec(spec)
    normalization = normalization or default_normalization(parsed)
    if parsed.kind == "onnx":
        if onnx_on_cpu not in ("torch", "onnxruntime"):
            raise ValueError(f"onnx_on_cpu must be 'torch' or 'onnxruntime', got {onnx_on_cpu!r}")
        if onnx_on_cpu == "onnxruntime" and torch.device(device).type == "cpu" and amp_dtype is None:
            return OnnxEmbedder(parsed.name, normalization, batch_size=batch_size)
        return load_onnx_embedder(parsed.name, normalization, device, amp_dtype, batch_size)
    if parsed.checkpoint is None:
        raise KDPluginError(f"model spec {spec!r}: a teacher needs weights: write {parsed.name}:path/to/backbone.pth")
    # teacher_amp must reach the body: arcface_torch's networks (and kd_plugin's, which follow them) switch CUDA
    # autocast off inside their body unless built with fp16=True. Upstream's body then enters float16 autocast
    # whatever dtype the caller chose, so a bfloat16 teacher is built from kd_plugin's definitions, which keep the
    # caller's dtype (the same weights and computation).
    module = build_network(parsed, embedding_size, fp16=amp_dtype is not None,
                           own_definition=amp_dtype == torch.bfloat16)
    return TorchEmbedder(module, normalization, device=device, amp_dtype=amp_dtype, batch_size=batch_size,
                         spec=str(parsed))
