"""Built-in face-embedding networks whose checkpoints are interchangeable with arcface_torch's `get_model`.

`create_network(name, embedding_size, fp16, dropout)` builds a network with exactly the parameter names, shapes and
forward computation of `backbones.get_model(name, num_features=embedding_size, fp16=fp16, dropout=dropout)`, so a
model-zoo `backbone.pth` loads with `strict=True`. Inputs are (N, 3, 112, 112) float images normalised as
(pixel - 127.5) / 127.5; outputs are (N, embedding_size) embeddings, not L2-normalised.

As in arcface_torch, only the IResNets use `dropout`, and the ViTs ignore `fp16` (see `kd_plugin.networks.vit`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import warnings
from typing import Callable, Protocol

from torch import nn

from kd_plugin.errors import KDPluginError
from kd_plugin.networks.iresnet import UNITS_PER_STAGE, build_iresnet
from kd_plugin.networks.mobilefacenet import VARIANTS as _MBF_VARIANTS
from kd_plugin.networks.mobilefacenet import build_mobilefacenet
from kd_plugin.networks.vit import VARIANTS as _VIT_VARIANTS
from kd_plugin.networks.vit import build_vit

__all__ = ["UnknownNetworkError", "create_network", "load_upstream_get_model", "network_names", "register_network"]


class NetworkConstructor(Protocol):
    """What the registry stores: a builder taking the uniform keyword arguments."""

    def __call__(self, *, embedding_size: int, fp16: bool, dropout: float) -> nn.Module:
        """Build the network."""


class UnknownNetworkError(KDPluginError, ValueError):
    """A network name that is not registered; the message lists the registered ones."""


_REGISTRY: dict[str, NetworkConstructor] = {}


def register_network(name: str, constructor: NetworkConstructor) -> None:
    """Make `create_network(name, ...)` call `constructor(embedding_size=..., fp16=..., dropout=...)`."""
    if name in _REGISTRY:
        raise ValueError(f"network {name!r} is already registered")
    _REGISTRY[name] = constructor


def network_names() -> list[str]:
    """Registered network names, in registration order."""
    return list(_REGISTRY)


def create_network(name: str, embedding_size: int = 512, fp16: bool = False, dropout: float = 0.0) -> nn.Module:
    """Build network `name` with freshly initialised weights; raises UnknownNetworkError (a ValueError) if unknown."""
    constructor = _REGISTRY.get(name)
    if constructor is None:
        raise UnknownNetworkError(f"unknown network {name!r}; known networks: {', '.join(network_names())}")
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
        raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return constructor(embedding_size=embedding_size, fp16=bool(fp16), dropout=float(dropout))


def _iresnet_constructor(name: str) -> NetworkConstructor:
    def build(*, embedding_size: int, fp16: bool, dropout: float) -> nn.Module:
        return build_iresnet(name, embedding_size=embedding_size, fp16=fp16, dropout=dropout)
    return build


def _ignoring_dropout(name: str, build: Callable[[int, bool], nn.Module]) -> NetworkConstructor:
    # arcface_torch drops the argument silently for these families; a warning keeps a configured value from
    # looking as if it had an effect, while the network stays identical to upstream's
    def constructor(*, embedding_size: int, fp16: bool, dropout: float) -> nn.Module:
        if dropout > 0:
            warnings.warn(f"network {name!r} has no dropout layer (as in arcface_torch): dropout={dropout} is ignored",
                          stacklevel=3)
        return build(embedding_size, fp16)
    return constructor


for _name in UNITS_PER_STAGE:
    register_network(_name, _iresnet_constructor(_name))
for _name in _MBF_VARIANTS:
    register_network(_name, _ignoring_dropout(
        _name, lambda size, fp16, _n=_name: build_mobilefacenet(_n, embedding_size=size, fp16=fp16)))
for _name in _VIT_VARIANTS:
    register_network(_name, _ignoring_dropout(
        _name, lambda size, fp16, _n=_name: build_vit(_n, embedding_size=size)))
del _name


def _cpu_r8(*, embedding_size: int, fp16: bool, dropout: float) -> nn.Module:
    from kd_plugin.networks.cpu_facenet import cpu_r8
    return cpu_r8(embedding_size, fp16, dropout)


register_network("cpu_r8", _cpu_r8)


def _arcface_torch_root(root: str | None) -> str | None:
    """The arcface_torch directory to import from: `root`, $ARCFACE_TORCH_ROOT, or the working directory."""
    if root is None:
        root = os.environ.get("ARCFACE_TORCH_ROOT") or None
    if root is None:
        cwd = os.getcwd()
        # the working directory needs both files, so an unrelated project's `backbones` package is not picked up
        if os.path.isfile(os.path.join(cwd, "backbones", "__init__.py")) and os.path.isfile(
                os.path.join(cwd, "train_v2.py")):
            root = cwd
    if root is None:
        return None
    root = os.path.realpath(os.path.expanduser(os.fspath(root)))
    return root if os.path.isfile(os.path.join(root, "backbones", "__init__.py")) else None


def load_upstream_get_model(root: str | None = None) -> Callable[..., nn.Module] | None:
    """arcface_torch's `backbones.get_model` from a checkout (root, $ARCFACE_TORCH_ROOT or cwd), else None."""
    found = _arcface_torch_root(root)
    if found is None:
        return None
    # a private package name per checkout: a plain `import backbones` elsewhere (arcface_torch's own scripts, another
    # checkout) keeps working, and the package stays registered so get_model's lazy `from .vit import ...` resolves
    module_name = "_kd_plugin_upstream_backbones_" + hashlib.sha1(found.encode()).hexdigest()[:12]
    module = sys.modules.get(module_name)
    if module is None:
        package_dir = os.path.join(found, "backbones")
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(package_dir, "__init__.py"),
                                                      submodule_search_locations=[package_dir])
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except ImportError as exc:
            for key in [k for k in sys.modules if k == module_name or k.startswith(module_name + ".")]:
                del sys.modules[key]
            warnings.warn(f"arcface_torch checkout {found} is not importable ({exc}); using kd_plugin's networks",
                          stacklevel=2)
            return None
    return getattr(module, "get_model", None)
