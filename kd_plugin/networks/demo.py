"""Two small CNNs for `kd-plugin demo` on CPU: `demo_teacher` (wider) and `demo_student` (narrow). Not face models."""

from __future__ import annotations

import torch
from torch import nn

from kd_plugin.networks.registry import register_network


class DemoNet(nn.Module):
    """Four stride-2 conv stages (112 -> 7), global average pooling, linear, BatchNorm1d (arcface's `features`)."""

    def __init__(self, width: int, embedding_size: int = 128) -> None:
        super().__init__()
        layers, ch = [], 3
        for out in (width, 2 * width, 4 * width, 8 * width):
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.PReLU(out)]
            ch = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(ch, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 112, 112) -> (N, embedding_size)."""
        return self.features(self.fc(self.body(x)))


@register_network("demo_teacher")
def demo_teacher(embedding_size: int = 128, fp16: bool = False, dropout: float = 0.0) -> DemoNet:
    """The demo's teacher: width 32."""
    return DemoNet(32, embedding_size)


@register_network("demo_student")
def demo_student(embedding_size: int = 128, fp16: bool = False, dropout: float = 0.0) -> DemoNet:
    """The demo's student: width 8."""
    return DemoNet(8, embedding_size)
