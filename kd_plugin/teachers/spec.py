"""One model spec string for teachers and students, in config and CLI alike.

- `r100:path/backbone.pth` — an arcface_torch network name with a checkpoint (`backbone.pth`, `model.pt`, or the
  `state_dict_backbone` of `checkpoint_gpu_0.pt`); `r100` alone builds it untrained (students). Built from the
  arcface_torch checkout when one is importable (`ARCFACE_TORCH_ROOT`, or the working directory), else from
  kd_plugin's own definitions, which have the same state_dict keys.
- `timm:<name>` or `timm:<name>:path.pth` — a timm body with an embedding neck (needs timm).
- `path/model.onnx` — an ONNX file, converted to a torch module on the run's device and checked once against
  onnxruntime (`kd_plugin.teachers.onnx_embedder.load_onnx_embedder`).

Each is a teacher format declared here with `register_teacher_format` (kd_plugin.teachers.formats), as a user's own
format is declared in its module; parsing, loading and building dispatch on the format that claims the string.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from kd_plugin.errors import KDPluginError
from kd_plugin.normalization import ARCFACE_MEAN, ARCFACE_STD, IMAGENET_MEAN, IMAGENET_STD, InputNormalization
from kd_plugin.teachers.checkpoints import backbone_state_dict, infer_embedding_size
from kd_plugin.teachers.formats import (ModelSpec, claiming, format_of, plain_text, register_teacher_format,
                                       teacher_formats)


ARCFACE_TORCH_NAMES = ("r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large", "vit_t", "vit_s", "vit_b")


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse a spec string with the format that claims it; an unclaimed string is refused with what is known."""
    spec = os.fspath(spec).strip()
    found = claiming(spec)
    if found is not None:
        return found.parse(spec)
    from kd_plugin.networks import network_names

    name = spec.partition(":")[0]
    others = [f.describe for f in teacher_formats().values() if f.name != "arcface"]
    raise KDPluginError(f"model spec {spec!r}: unknown network {name!r}; expected one of {', '.join(network_names())} "
                        f"(optionally ':checkpoint'), {', '.join(others[:-1])}, or {others[-1]}")


def default_normalization(spec: ModelSpec) -> InputNormalization:
    """The input convention of the spec's format: arcface_torch networks 127.5/127.5, timm ImageNet, ONNX as
    insightface reads it."""
    return format_of(spec).normalization(spec)


def build_network(spec: str | ModelSpec, embedding_size: int | None = None, fp16: bool = False,
                  dropout: float = 0.0, own_definition: bool = False) -> nn.Module:
    """The trainable torch module of a spec whose format builds one (arcface_torch networks, timm bodies), with its
    checkpoint loaded strictly when one is given. `own_definition`: kd_plugin's definition of an arcface_torch network
    even where the checkout is importable (same state_dict keys and computation)."""
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    fmt = format_of(spec)
    if fmt.network is None:
        raise KDPluginError(f"{spec}: {fmt.describe} cannot be trained or built as a torch module; use it as a "
                            f"teacher, or give a network name (r50, mbf, ...) for a student")
    state = backbone_state_dict(spec.checkpoint) if spec.checkpoint else None
    found = infer_embedding_size(state) if state is not None else None
    if embedding_size is not None and found is not None and found != embedding_size:
        raise KDPluginError(f"{spec.checkpoint}: the checkpoint's embedding size is {found}, the config asks for "
                            f"{embedding_size} (embedding_size); use the matching value")
    size = embedding_size or found or 512
    module = fmt.network(spec, size, fp16=fp16, dropout=dropout, own_definition=own_definition)
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
    module = build_network(spec, embedding_size, fp16=amp_dtype is not None, own_definition=amp_dtype == torch.bfloat16)
    return TorchEmbedder(module, normalization, device=device, amp_dtype=amp_dtype, batch_size=batch_size,
                         spec=str(spec))


def _timm_parse(spec: str) -> ModelSpec:
    name, _, checkpoint = spec[len("timm:"):].partition(":")
    if not name:
        raise KDPluginError(f"model spec {spec!r}: expected timm:<model name>[:checkpoint]")
    return ModelSpec("timm", name, checkpoint or None)


def _timm_network(spec: ModelSpec, size: int, fp16: bool, dropout: float, own_definition: bool) -> nn.Module:
    from kd_plugin.networks.timm_network import TimmEmbeddingNet

    return TimmEmbeddingNet(spec.name, size, dropout=dropout)


def _arcface_claims(spec: str) -> bool:
    from kd_plugin.networks import network_names

    return spec.partition(":")[0] in network_names() and not spec.lower().endswith(".onnx")  # an .onnx file is ONNX


def _arcface_network(spec: ModelSpec, size: int, fp16: bool, dropout: float, own_definition: bool) -> nn.Module:
    from kd_plugin.networks import create_network, load_upstream_get_model

    upstream = load_upstream_get_model(None) if spec.name in ARCFACE_TORCH_NAMES and not own_definition else None
    return (upstream(spec.name, dropout=dropout, fp16=fp16, num_features=size) if upstream is not None
            else create_network(spec.name, size, fp16=fp16, dropout=dropout))


register_teacher_format("arcface", claims=_arcface_claims, load=_load_torch, network=_arcface_network,
                        text=plain_text, normalization=lambda spec: InputNormalization(ARCFACE_MEAN, ARCFACE_STD),
                        describe="an arcface_torch network name")
register_teacher_format("timm", claims=lambda spec: spec.startswith("timm:"), parse=_timm_parse, load=_load_torch,
                        network=_timm_network, normalization=lambda spec: InputNormalization(IMAGENET_MEAN,
                                                                                             IMAGENET_STD),
                        text=lambda spec: f"timm:{spec.name}" + (f":{spec.checkpoint}" if spec.checkpoint else ""),
                        describe="'timm:<name>'")
register_teacher_format("onnx", claims=lambda spec: spec.lower().endswith(".onnx"),
                        parse=lambda spec: ModelSpec("onnx", spec), load=_load_onnx, text=plain_text,
                        normalization=_onnx_normalization, describe="an .onnx file")
