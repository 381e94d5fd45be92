"""`timm:<name>` networks: a timm body (no classifier, average-pooled) followed by an embedding neck, for students and
teachers whose body comes from timm."""

from __future__ import annotations

import sys

import torch
from torch import nn


def import_timm():
    """Import timm; if its torchvision dependency cannot load its C++ operators (a CUDA torchvision wheel beside a
    CPU torch), declare the two operator schemas its python code refers to and retry. Users whose torchvision loads
    normally never reach the workaround."""
    try:
        import timm
        return timm
    except ImportError as exc:
        raise ImportError("timm:<name> models need timm: pip install timm (kd_plugin's [timm] extra)") from exc
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
        del sys.modules[name]  # drop the half-imported modules before trying again
    library = torch.library.Library("torchvision", "DEF")  # the schemas live as long as this object: keep it
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import_timm.library = library
    import timm
    return timm


class TimmEmbeddingNet(nn.Module):
    """timm body -> dropout -> linear to `embedding_size` -> BatchNorm1d (the arcface_torch `features` layer)."""

    def __init__(self, name: str, embedding_size: int = 512, dropout: float = 0.0, pretrained: bool = False) -> None:
        super().__init__()
        timm = import_timm()
        try:
            self.body = timm.create_model(name, pretrained=pretrained, num_classes=0)
        except RuntimeError as exc:  # timm's own message for unknown names
            raise ValueError(f"timm:{name}: {exc}") from None
        self.neck = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.body.num_features, embedding_size, bias=False),
                                  nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, embedding_size) embeddings."""
        return self.neck(self.body(x))
