"""Reading torch checkpoint files safely (`weights_only=True`) and finding the backbone weights inside them."""

from __future__ import annotations

import os
from typing import Any

import torch

from kd_plugin.errors import KDPluginError, UnsafePickleError


def safe_torch_load(path: str, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; a file that would run code is refused, never executed.
    `mmap=True` maps the file instead of reading it (see `mapped_torch_load`)."""
    return mapped_torch_load(path)[0] if mmap else _load(path, False)


def mapped_torch_load(path: str) -> tuple[Any, bool]:
    """(content, mapped): the file memory-mapped, its tensors read from disk only when touched; a file in torch's
    legacy (pre-zip) format cannot be mapped and is read whole (mapped False)."""
    try:
        return _load(path, True), True
    except _NotMappable:
        return _load(path, False), False


class _NotMappable(Exception):
    pass


def _load(path: str, mmap: bool) -> Any:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises UnpicklingError (and others) for anything but plain tensors/containers
        text = str(exc)
        if mmap and "mmap can only be used" in text:
            raise _NotMappable() from None
        if "weights_only" in text or "Unsupported global" in text or "Unsupported operand" in text:
            raise UnsafePickleError(f"{path}: refused to load (nothing was executed): the file holds objects other "
                                    f"than tensors and plain containers. Re-save only the state_dict "
                                    f"(torch.save(model.state_dict(), ...)) from code you trust. Detail: "
                                    f"{text.splitlines()[0][:300]}") from None
        raise KDPluginError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {text[:300]})") from None


def backbone_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Backbone weights from `backbone.pth`/`model.pt` (a state_dict) or `checkpoint_gpu_{r}.pt`
    (`state_dict_backbone`); DDP's `module.` prefix is removed."""
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and "state_dict_backbone" in obj:
        obj = obj["state_dict_backbone"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KDPluginError(f"{path}: expected a backbone state_dict (name -> tensor), or a checkpoint_gpu_*.pt with "
                            f"'state_dict_backbone'; found {type(obj).__name__} with keys {list(obj)[:5] if isinstance(obj, dict) else '-'}")
    prefix = "module."
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def infer_embedding_size(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The embedding size of an arcface_torch backbone: its last BatchNorm1d (the `features` layer) has that width;
    a network without batch norm: the output rows of its last 2-D weight."""
    last = [v for k, v in state_dict.items() if k.endswith("running_mean") and v.dim() == 1]
    if last:
        return int(last[-1].shape[0])
    matrices = [v for v in state_dict.values() if v.dim() == 2]
    return int(matrices[-1].shape[0]) if matrices else None
