"""The distillation methods, each declared once next to its code with `register_term` or `register_head`: its name
(what `config.kd.method` says), its config block `config.kd.<name>` with the published defaults, its default weight and
what it needs. Config validation, the builders, `kd-plugin methods`, the benchmark and the demo all read this registry.

A method is either a *term* (a weighted loss added to the margin-softmax head's: an `nn.Module` whose
`forward(student, teacher, labels)` takes the GLOBAL batch — student embeddings with gradient, teacher embeddings and
labels without — and returns `(loss, {name: scalar tensor})`; a term with `sharded = True` is also given the head and
splits its work across ranks like the head) or a *head* (it replaces the trainable classifier). A user's own term is
registered the same way from their config file:

    from kd_plugin import register_term

    @register_term("my_term", weight=0.5, needs=("teacher", "labels"))
    class MyTerm(torch.nn.Module):
        def __init__(self, power=2.0): ...  # its keyword defaults are its config block: config.kd.my_term
        def forward(self, student, teacher, labels): return loss, {"my_term": loss.detach()}

    config.kd = {"method": "proxyless+my_term", "my_term": {"power": 3.0}, ...}
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from kd_plugin.errors import KDPluginError

# what a method may need, and what the config must then provide
NEEDS = {
    "teacher": "the teacher's embeddings of every batch (kd.teacher, or kd.cache)",
    "centres": "the teacher's class centres, inherited by the classifier (kd.<head>.centres: its shards, a file, "
               "'estimate' or 'fit')",
    "logits": "the logits over the inherited class centres: a head that inherits them (proxyless) and `head` passed "
              "to forward (the term is sharded across ranks like the head)",
    "labels": "identity labels: a term without this need is label-free and also sees the images without identity "
              "(kd.unlabeled)",
    "balanced": "identity-balanced batches (kd.sampler.balanced defaults to on)",
    "equal_dims": "a student embedding_size equal to the teacher's",
}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Method:
    """One registered method. `build`: a term's `build(**block) -> nn.Module`; a head's `build(cfg, centres) -> head`
    (`centres`: what kd.<head>.centres resolved to when the method needs them, else None)."""

    name: str
    kind: str  # "term" or "head"
    build: Callable[..., Any]
    title: str  # how the README and errors name it ("EKD", "logit KD")
    summary: str  # one line for `kd-plugin methods` and `kd-plugin train --help`
    defaults: Mapping[str, Any] = field(default_factory=dict)  # its config.kd.<name> block (published settings)
    weight: float | None = None  # a term's weight when the config names it alone
    needs: frozenset = frozenset()
    baseline: bool = True  # False for the methods this plugin is about (ProxylessKD, EKD)
    check: Callable[[dict], None] | None = None  # extra validation of the resolved config.kd block
    teacher: Callable[..., Any] | None = None  # `teacher(kd, normalization, device, amp_dtype)`: its own teacher
    builtin: bool = False
    origin: str = ""  # module.qualname of what registered it

    @property
    def label_free(self) -> bool:
        """A term that reads no labels: it also sees the rows without identity (unlabelled images, mixed views)."""
        return self.kind == "term" and "labels" not in self.needs

    @property
    def inherits_centres(self) -> bool:
        """A head that inherits the teacher's class centres: its block has `centres` and `fit`."""
        return self.kind == "head" and "centres" in self.needs

    def needs_text(self) -> str:
        """What it needs, as `kd-plugin methods` lists it."""
        return ", ".join(sorted(self.needs)) or "nothing more"

    @property
    def runs_from_a_teacher(self) -> bool:
        """Whether it runs alone from a teacher (online or cached) and the training data, with nothing else to give:
        not a term over another method's logits, not a method that brings its own teacher (multi-step KD's per-epoch
        checkpoints)."""
        return "logits" not in self.needs and self.teacher is None

    def block(self) -> dict:
        """A fresh copy of its config block's defaults."""
        return copy.deepcopy(dict(self.defaults))


_REGISTRY: dict[str, Method] = {}


def _origin(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _add(method: Method) -> None:
    where = f"registering method {method.name!r} ({method.origin})"
    if not _NAME.match(method.name) or method.name == "none":
        raise KDPluginError(f"{where}: a method name is lower-case letters, digits and '_' (it is written in "
                            f"config.kd.method as 'proxyless+{method.name}'), and not 'none'")
    unknown = sorted(set(method.needs) - set(NEEDS))
    if unknown:
        raise KDPluginError(f"{where}: needs {unknown} unknown; allowed: {', '.join(NEEDS)}")
    old = _REGISTRY.get(method.name)
    if old is not None and old.origin != method.origin:
        if old.builtin:
            raise KDPluginError(f"{where}: {method.name!r} is kd_plugin's {old.title} ({old.origin}); register your "
                                f"term under another name")
        if method.builtin:
            raise KDPluginError(f"{old.origin} registered {method.name!r}, the name of kd_plugin's built-in "
                                f"{method.title}; register that term under another name")
        raise KDPluginError(f"{where}: {old.origin} registered {method.name!r} already; give one of them another "
                            f"name")
    _REGISTRY[method.name] = method  # a config file loaded again re-registers its own term: the new one replaces it


def _keyword_defaults(name: str, build: Callable) -> dict:
    """{parameter: default} of the keyword parameters of `build` (a class: its constructor)."""
    try:
        parameters = inspect.signature(build).parameters.values()
    except (TypeError, ValueError):
        return {}
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    required = [p.name for p in parameters if p.kind in plain and p.default is inspect.Parameter.empty]
    if required:
        raise KDPluginError(f"registering method {name!r} ({_origin(build)}): parameters {required} have no default; "
                            f"config.kd.{name} passes its block as keyword arguments, so every parameter needs its "
                            f"published default")
    return {p.name: copy.deepcopy(p.default) for p in parameters if p.kind in plain}


def add_term(name: str, build: Callable[..., Any], *, weight: float = 1.0, needs=("teacher", "labels"),
             title: str | None = None, summary: str = "", baseline: bool = True,
             check: Callable[[dict], None] | None = None, teacher: Callable[..., Any] | None = None,
             _builtin: bool = False) -> None:
    """Declare a distillation term built by `build(**config.kd.<name>)` (a module class, or a function returning the
    module). Its config block is `build`'s keyword parameters with their defaults (the published settings). By default
    a term needs the teacher and labels; one that never reads `labels` declares its needs without them and then also
    sees images without identity (config.kd.unlabeled)."""
    sharded = bool(getattr(build, "sharded", False))
    declared = set(needs) | ({"logits"} if sharded else set())
    if "centres" in declared:
        raise KDPluginError(f"registering method {name!r} ({_origin(build)}): a term receives no class centres (a head "
                            f"does, register_head); a term that works on the logits over the inherited centres sets "
                            f"`sharded = True` and is given the head")
    if "logits" in declared and not sharded:
        raise KDPluginError(f"registering method {name!r} ({_origin(build)}): needs 'logits', but only a term with "
                            f"`sharded = True` is given the head (forward(student, teacher, labels, head)); set it on "
                            f"the class")
    _add(Method(name=name, kind="term", build=build, title=title or name, summary=summary or _first_line(build),
                defaults=_keyword_defaults(name, build), weight=float(weight), needs=frozenset(declared),
                baseline=baseline, check=check, teacher=teacher, builtin=_builtin, origin=_origin(build)))


def register_term(name: str, **declaration):
    """Class decorator form of `add_term` (see the module docstring)."""

    def declare(cls):
        add_term(name, cls, **declaration)
        return cls

    return declare


def register_head(name: str, build: Callable[..., Any], *, defaults: Mapping[str, Any] | None = None, needs=(),
                  title: str | None = None, summary: str = "", baseline: bool = True,
                  check: Callable[[dict], None] | None = None, _builtin: bool = False) -> None:
    """Declare a method that replaces the classifier: `build(cfg, centres) -> PartialFCHead`. A head that needs
    "centres" inherits the teacher's class centres: its block then has `centres` (where they come from) and `fit` (the
    settings of centres = "fit"), as ProxylessKD's (kd_plugin.methods.heads.CENTRE_BLOCK)."""
    missing = [key for key in ("centres", "fit") if "centres" in needs and key not in (defaults or {})]
    if missing:
        raise KDPluginError(f"registering head {name!r} ({_origin(build)}): it needs 'centres', so its block "
                            f"config.kd.{name} must have the keys {missing} (start from "
                            f"kd_plugin.methods.heads.CENTRE_BLOCK)")
    _add(Method(name=name, kind="head", build=build, title=title or name, summary=summary or _first_line(build),
                defaults=dict(defaults or {}), needs=frozenset(needs), baseline=baseline, check=check,
                builtin=_builtin, origin=_origin(build)))


def _first_line(obj) -> str:
    return (inspect.getdoc(obj) or "").split("\n")[0]


def registered() -> dict[str, Method]:
    """Every method registered so far, in registration order (built-ins: see kd_plugin.methods)."""
    return dict(_REGISTRY)


def unregister(name: str) -> None:
    """Forget method `name` (a config's or a test's own term); unknown names are ignored."""
    _REGISTRY.pop(name, None)


@contextlib.contextmanager
def restored():
    """`with restored(): ...` registers and unregisters freely inside; the registry is put back as it was after."""
    before = dict(_REGISTRY)
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(before)
