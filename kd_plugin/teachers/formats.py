"""What a teacher is, stated once (`Embedder`), and the formats a model spec can name (`register_teacher_format`).

Every teacher — and every model kd_plugin embeds images with — is an `Embedder`: `embed(uint8 (N, 3, H, W) RGB)`
gives float32 (N, d) embeddings, with the model's own input normalisation (`normalization`) and the spec it was
loaded from (`spec`). Two calls have defaults that most teachers keep: `check(images)`, once before training (an ONNX
file converted to torch compares itself with onnxruntime there, so no step does), and `set_epoch(epoch)` (multi-step
KD loads the teacher of a student epoch; True when it changed).

A format turns a spec string into a model. kd_plugin's own — arcface_torch networks (`r100:backbone.pth`), timm bodies
(`timm:<name>[:ckpt]`), ONNX files (`*.onnx`) — are declared in kd_plugin.teachers.spec with the same call a user's
format makes from its own module:

    from kd_plugin.teachers.formats import Embedder, register_teacher_format

    class PackEmbedder(Embedder): ...

    register_teacher_format("pack", claims=lambda spec: spec.startswith("pack:"),
                            load=lambda spec, normalization, **options: PackEmbedder(spec.name, normalization),
                            normalization=lambda spec: InputNormalization(127.5, 127.5),
                            describe="'pack:<folder>'")

Then `kd.teacher = "pack:/models/buffalo_l"` (and every command that takes a model spec) loads it. Exactly one format
may claim a spec string: two that claim the same one are refused with both names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kd_plugin.errors import KDPluginError
from kd_plugin.normalization import InputNormalization


class Embedder:
    """The interface of a teacher (see the module docstring). Subclasses set `spec` and `normalization` and define
    `embed`; `check` and `set_epoch` do nothing unless a teacher needs them."""

    spec: str = ""
    normalization: InputNormalization | None = None
    check_error: float | None = None  # what `check` measured against its reference (relative), when it compares

    def embed(self, images):
        """Raw (not L2-normalised) float32 embeddings of uint8 RGB images: numpy in, numpy out; a tensor in, a tensor
        out on its device."""
        raise NotImplementedError(f"{type(self).__name__} defines no embed()")

    def check(self, images: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        """Once, before training: compare with a reference on a few of the run's uint8 images (or a function that
        returns them, called only by a teacher that checks); raise KDPluginError when they differ."""

    def set_epoch(self, epoch: int) -> bool:
        """Multi-step KD: switch to the teacher of student epoch `epoch`; True when another one was loaded."""
        return False


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: `kind` is the name of the format that claimed it ("arcface", "timm", "onnx", or one a
    user registered); `name` the network name or file; `checkpoint` its weights, when given."""

    kind: str
    name: str
    checkpoint: str | None = None

    def __str__(self) -> str:
        return format_of(self).text(self)


def plain_text(spec: ModelSpec) -> str:
    """`<name>[:<checkpoint>]`: how arcface_torch network specs and files are written."""
    return f"{spec.name}:{spec.checkpoint}" if spec.checkpoint else spec.name


@dataclass(frozen=True)
class TeacherFormat:
    """One registered format. `claims(spec string)`: whether the string is this format's; `parse(spec string) ->
    ModelSpec`; `normalization(spec)`: the input convention of its models; `load(spec, normalization, *, device,
    amp_dtype, batch_size, embedding_size, onnx_on_cpu) -> Embedder` (a frozen teacher); `text(spec)`: the spec
    string back; `describe`: how errors name it. A format makes teachers only: the networks a student trains are
    declared in kd_plugin.networks (`register_network`)."""

    name: str
    claims: Callable[[str], bool]
    parse: Callable[[str], ModelSpec]
    normalization: Callable[[ModelSpec], InputNormalization]
    load: Callable[..., Embedder]
    text: Callable[[ModelSpec], str]
    describe: str
    origin: str


_FORMATS: dict[str, TeacherFormat] = {}


def register_teacher_format(name: str, *, claims: Callable[[str], bool], load: Callable[..., Embedder],
                            normalization: Callable[[ModelSpec], InputNormalization],
                            parse: Callable[[str], ModelSpec] | None = None,
                            text: Callable[[ModelSpec], str] | None = None, describe: str = "") -> None:
    """Declare a teacher format (see the module docstring). `parse` defaults to `<name>[:<checkpoint>]` after
    an optional `<format name>:` prefix; `text` to `<format name>:<name>[:<checkpoint>]`, which parses back."""
    origin = getattr(load, "__module__", "?")
    old = _FORMATS.get(name)
    if old is not None and old.origin != origin:
        raise KDPluginError(f"registering teacher format {name!r} ({origin}): {old.origin} registered it already; "
                            f"give one of them another name")

    def default_parse(spec: str) -> ModelSpec:
        body = spec[len(name) + 1:] if spec.startswith(f"{name}:") else spec
        model, _, checkpoint = body.partition(":")
        return ModelSpec(name, model, checkpoint or None)

    def default_text(spec: ModelSpec) -> str:
        return f"{name}:{plain_text(spec)}"

    _FORMATS[name] = TeacherFormat(name, claims, parse or default_parse, normalization, load,
                                   text or default_text, describe or f"'{name}:...'", origin)


def unregister_teacher_format(name: str) -> None:
    """Forget a format (a test's own); unknown names are ignored."""
    _FORMATS.pop(name, None)


def teacher_formats() -> dict[str, TeacherFormat]:
    """Every registered format by name (kd_plugin's own first: importing kd_plugin.teachers declares them)."""
    return dict(_FORMATS)


def format_of(spec: ModelSpec) -> TeacherFormat:
    known = teacher_formats()
    if spec.kind not in known:
        raise KDPluginError(f"model spec {spec}: format {spec.kind!r} is not registered; known: {', '.join(known)}")
    return known[spec.kind]


def claiming(spec: str) -> TeacherFormat | None:
    """The one format that claims `spec`, None when none does; two claiming it is an error naming both."""
    found = [f for f in teacher_formats().values() if f.claims(spec)]
    if len(found) > 1:
        raise KDPluginError(f"model spec {spec!r} is claimed by the teacher formats {[f.name for f in found]} "
                            f"({', '.join(f.origin for f in found)}); make their specs distinct")
    return found[0] if found else None
