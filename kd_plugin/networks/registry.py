"""The network registry: each network is declared once, next to its code, with `@register_network("name")` (as timm's
`register_model`), and built by name with uniform keyword arguments: `create_network(name, embedding_size, fp16,
dropout)`. `kd_plugin.networks` imports every family module, so importing it declares the built-ins."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Protocol

from torch import nn

from kd_plugin.errors import KDPluginError


class NetworkConstructor(Protocol):
    """What the registry stores: a builder taking the uniform keyword arguments."""

    def __call__(self, *, embedding_size: int, fp16: bool, dropout: float) -> nn.Module:
        """Build the network."""


class UnknownNetworkError(KDPluginError, ValueError):
    """A network name that is not registered; the message lists the registered ones."""


_CONSTRUCTORS: dict[str, NetworkConstructor] = {}


def register_network(name: str, constructor: NetworkConstructor | None = None):
    """Make `create_network(name, ...)` call `constructor(embedding_size=..., fp16=..., dropout=...)`; without
    `constructor`, a decorator: `@register_network("r50")` above the constructor."""
    if constructor is None:
        return functools.partial(register_network, name)
    if name in _CONSTRUCTORS:
        raise ValueError(f"network {name!r} is already registered")
    _CONSTRUCTORS[name] = constructor
    return constructor


def unregister_network(name: str) -> None:
    """Forget a network registered at run time (a test's, a config's); unknown names are ignored."""
    _CONSTRUCTORS.pop(name, None)


def network_names() -> list[str]:
    """Registered network names, in registration order."""
    return list(_CONSTRUCTORS)


def create_network(name: str, embedding_size: int = 512, fp16: bool = False, dropout: float = 0.0) -> nn.Module:
    """Build network `name` with freshly initialised weights; raises UnknownNetworkError (a ValueError) if unknown."""
    constructor = _CONSTRUCTORS.get(name)
    if constructor is None:
        raise UnknownNetworkError(f"unknown network {name!r}; known networks: {', '.join(network_names())}")
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
        raise ValueError(f"embedding_size must be a positive integer, got {embedding_size!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return constructor(embedding_size=embedding_size, fp16=bool(fp16), dropout=float(dropout))


def without_dropout(build: Callable[..., nn.Module]) -> NetworkConstructor:
    """For families arcface_torch builds without a dropout layer: a configured dropout is ignored, as upstream ignores
    it, but with a warning, so it never looks as if it had an effect."""
    @functools.wraps(build)
    def constructor(*, embedding_size: int, fp16: bool, dropout: float) -> nn.Module:
        if dropout > 0:
            warnings.warn(f"network {build.__name__!r} has no dropout layer (as in arcface_torch): dropout={dropout} "
                          f"is ignored", stacklevel=3)
        return build(embedding_size=embedding_size, fp16=fp16)
    return constructor
