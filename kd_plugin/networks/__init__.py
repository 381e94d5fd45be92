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
from collections.abc import Callable

from torch import nn

# every family module declares its networks with @register_network when imported, in this order: arcface_torch's
# names first, then kd_plugin's CPU benchmark student and the demo's two small CNNs
from kd_plugin.networks import iresnet, mobilefacenet, vit  # noqa: F401
# isort: split
from kd_plugin.networks import cpu_facenet, demo  # noqa: F401
from kd_plugin.networks.registry import (NetworkConstructor, UnknownNetworkError, create_network, network_names,
                                         register_network, unregister_network)

__all__ = ["NetworkConstructor", "UnknownNetworkError", "create_network", "load_upstream_get_model", "network_names",
           "register_network", "unregister_network"]


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


# isort: split
from kd_plugin.networks.build import NetworkSpec, build_network, network_family, parse_network_spec  # noqa: E402

__all__ += ["NetworkSpec", "build_network", "network_family", "parse_network_spec"]
