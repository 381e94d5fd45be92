"""One model spec string for teachers and students, in config and CLI alike.

- `r100:path/backbone.pth` — an arcface_torch network name with a checkpoint (`backbone.pth`, `model.pt`, or the
  `state_dict_backbone` of `checkpoint_gpu_0.pt`); `r100` alone is a student network, untrained.
- `timm:<name>` or `timm:<name>:path.pth` — a timm body with an embedding neck (needs timm).
  Both are networks, built by kd_plugin.networks.build (students and torch teachers alike).
- `path/model.onnx` — an ONNX file, converted to a torch module on the run's device and checked once against
  onnxruntime (`kd_plugin.teachers.onnx_embedder.load_onnx_embedder`).

Each is a teacher format declared here with `register_teacher_format` (kd_plugin.teachers.formats), as a user's own
format is declared in its module; parsing and loading dispatch on the format that claims the string.
"""

from __future__ import annotations

import os

import torch

from kd_plugin.errors import KDPluginError
from kd_plugin.networks import NetworkSpec, build_network, network_family, network_names, parse_network_spec
from kd_plugin.normalization import ARCFACE_MEAN, ARCFACE_STD, IMAGENET_MEAN, IMAGENET_STD, InputNormalization
from kd_plugin.teachers.formats import (ModelSpec, claiming, format_of, plain_text, register_teacher_format,
                                       teacher_formats)


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse a spec string with the format that claims it; an unclaimed string is refused with what is known."""
    spec = os.fspath(spec).strip()
    found = claiming(spec)
    if found is not None:
        return found.parse(spec)
    name = spec.partition(":")[0]
    others = [f.describe for f in teacher_formats().values() if f.name != "arcface"]
    raise KDPluginError(f"model spec {spec!r}: unknown network {name!r}; expected one of {', '.join(network_names())} "
                        f"(optionally ':checkpoint'), {', '.join(others[:-1])}, or {others[-1]}")


def default_normalization(spec: ModelSpec) -> InputNormalization:
    """The input convention of the spec's format: arcface_torch networks 127.5/127.5, timm ImageNet, ONNX as
    insightface reads it."""
    return format_of(spec).normalization(spec)


def load_embedder(spec: str, normalization: InputNormalization | None = None, device: str = "cpu",
                  amp_dtype: torch.dtype | None = None, batch_size: int = 64, embedding_size: int | None = None,
                  onnx_on_cpu: str = "torch"):
    """A frozen Embedder for any spec: `embed(uint8 (N,3,H,W) RGB) -> float32 (N, d)`. `onnx_on_cpu`: how an ONNX
    file runs when `device` is the CPU — "torch" (converted, as on any device: a training teacher) or "onnxruntime"
    (evaluation and caching on a CPU, where onnxruntime is 1.5-3x faster than torch's CPU convolutions)."""
    if onnx_on_cpu not in ("torch", "onnxruntime"):
        raise ValueError(f"onnx_on_cpu must be 'torch' or 'onnxruntime', got {onnx_on_cpu!r}")
    parsed = parse_model_spec(spec)
    normalization = normalization or default_normalization(parsed)
    return format_of(parsed).load(parsed, normalization, device=device, amp_dtype=amp_dtype, batch_size=batch_size,
                                  embedding_size=embedding_size, onnx_on_cpu=onnx_on_cpu)


# --- kd_plugin's own formats ---------------------------------------------------------------------------------------
def _load_onnx(spec: ModelSpec, normalization, *, device, amp_dtype, batch_size, embedding_size, onnx_on_cpu):
    from kd_plugin.teachers.onnx_embedder import OnnxEmbedder, load_onnx_embedder

    if onnx_on_cpu == "onnxruntime" and torch.device(device).type == "cpu" and amp_dtype is None:
        return OnnxEmbedder(spec.name, normalization, batch_size=batch_size)
    return load_onnx_embedder(spec.name, normalization, device, amp_dtype, batch_size)


def _onnx_normalization(spec: ModelSpec) -> InputNormalization:
    from kd_plugin.teachers.onnx_embedder import insightface_normalization

    return insightface_normalization(spec.name)


def _load_torch(spec: ModelSpec, normalization, *, device, amp_dtype, batch_size, embedding_size, onnx_on_cpu):
    from kd_plugin.teachers.torch_embedder import TorchEmbedder

    if spec.checkpoint is None:
        raise KDPluginError(f"model spec {str(spec)!r}: a teacher needs weights: write {spec.name}:path/to/backbone.pth")
    # teacher_amp must reach the body: arcface_torch's networks (and kd_plugin's, which follow them) switch CUDA
    # autocast off inside their body unless built with fp16=True. Upstream's body then enters float16 autocast
    # whatever dtype the caller chose, so a bfloat16 teacher is built from kd_plugin's definitions, which keep the
    # caller's dtype (the same weights and computation).
    module = build_network(str(spec), embedding_size, fp16=amp_dtype is not None,
                           own_definition=amp_dtype == torch.bfloat16)
    return TorchEmbedder(module, normalization, device=device, amp_dtype=amp_dtype, batch_size=batch_size,
                         spec=str(spec))


def _network_parse(spec: str) -> ModelSpec:
    parsed = parse_network_spec(spec)
    return ModelSpec(parsed.family, parsed.name, parsed.checkpoint)


def _network_text(spec: ModelSpec) -> str:
    return str(NetworkSpec(spec.kind, spec.name, spec.checkpoint))


# a network kd_plugin builds (kd_plugin.networks.build) teaches as a frozen torch module of its body
register_teacher_format("arcface", claims=lambda spec: network_family(spec) == "arcface", parse=_network_parse,
                        load=_load_torch, text=_network_text, describe="an arcface_torch network name",
                        normalization=lambda spec: InputNormalization(ARCFACE_MEAN, ARCFACE_STD))
register_teacher_format("timm", claims=lambda spec: network_family(spec) == "timm", parse=_network_parse,
                        load=_load_torch, text=_network_text, describe="'timm:<name>'",
                        normalization=lambda spec: InputNormalization(IMAGENET_MEAN, IMAGENET_STD))
register_teacher_format("onnx", claims=lambda spec: spec.lower().endswith(".onnx"),
                        parse=lambda spec: ModelSpec("onnx", spec), load=_load_onnx, text=plain_text,
                        normalization=_onnx_normalization, describe="an .onnx file")
