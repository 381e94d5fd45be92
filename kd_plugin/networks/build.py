"""A trainable network from its spec string — every student, and every torch teacher's body, is built here.

- `<name>[:checkpoint]`: a network declared with `register_network` (arcface_torch's r18 ... vit_b, kd_plugin's cpu_r8,
  the demo's CNNs). arcface_torch's own names are built from an importable arcface_torch checkout
  (`ARCFACE_TORCH_ROOT`, or the working directory) when there is one, else from kd_plugin's definitions, which have
  the same state_dict keys and computation.
- `timm:<name>[:checkpoint]`: a timm body with an embedding neck (needs timm).

The checkpoint (`backbone.pth`, `model.pt`, or the `state_dict_backbone` of `checkpoint_gpu_0.pt`) is read without
running pickled code and loaded strictly; the embedding size comes from it when the caller gives none. Other model
specs (an ONNX file, a format a user registered in kd_plugin.teachers.formats) can teach a student but are not
networks kd_plugin trains."""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from kd_plugin.checkpoints import backbone_state_dict, infer_embedding_size
from kd_plugin.errors import KDPluginError
from kd_plugin.networks import create_network, load_upstream_get_model, network_names

ARCFACE_TORCH_NAMES = ("r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large", "vit_t", "vit_s", "vit_b")
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class NetworkSpec:
    """`family`: "arcface" (a registered network name) or "timm"; `name`: the network; `checkpoint`: its weights."""

    family: str
    name: str
    checkpoint: str | None = None

    def __str__(self) -> str:
        text = (TIMM_PREFIX if self.family == "timm" else "") + self.name
        return f"{text}:{self.checkpoint}" if self.checkpoint else text


def network_family(spec: str) -> str | None:
    """"timm" or "arcface" when `spec` names a network kd_plugin builds, else None (an .onnx file is never one)."""
    text = os.fspath(spec).strip()
    if text.startswith(TIMM_PREFIX):
        return "timm"
    if text.lower().endswith(".onnx"):
        return None
    return "arcface" if text.partition(":")[0] in network_names() else None


def parse_network_spec(spec: str) -> NetworkSpec:
    """The network a spec string names; a string that names none is refused with the names kd_plugin knows."""
    text = os.fspath(spec).strip()
    family = network_family(text)
    if family == "timm":
        name, _, checkpoint = text[len(TIMM_PREFIX):].partition(":")
        if not name:
            raise KDPluginError(f"model spec {spec!r}: expected timm:<model name>[:checkpoint]")
        return NetworkSpec("timm", name, checkpoint or None)
    name, _, checkpoint = text.partition(":")
    if family is None:
        raise KDPluginError(f"model spec {spec!r}: kd_plugin builds no network {name!r}; expected one of "
                            f"{', '.join(network_names())} (optionally ':checkpoint') or 'timm:<name>'. An ONNX file "
                            f"or another teacher format can teach a student but cannot be trained")
    return NetworkSpec("arcface", name, checkpoint or None)


def build_network(spec: str | NetworkSpec, embedding_size: int | None = None, fp16: bool = False,
                  dropout: float = 0.0, own_definition: bool = False) -> nn.Module:
    """The torch module of a network spec with its checkpoint loaded strictly when one is given. `own_definition`:
    kd_plugin's definition of an arcface_torch network even where a checkout is importable (same state_dict keys and
    computation)."""
    spec = parse_network_spec(spec) if isinstance(spec, str) else spec
    state = backbone_state_dict(spec.checkpoint) if spec.checkpoint else None
    found = infer_embedding_size(state) if state is not None else None
    if embedding_size is not None and found is not None and found != embedding_size:
        raise KDPluginError(f"{spec.checkpoint}: the checkpoint's embedding size is {found}, the config asks for "
                            f"{embedding_size} (embedding_size); use the matching value")
    size = embedding_size or found or 512
    if spec.family == "timm":
        from kd_plugin.networks.timm_network import TimmEmbeddingNet

        module = TimmEmbeddingNet(spec.name, size, dropout=dropout)
    else:
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
