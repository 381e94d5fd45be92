"""`cpu_r8`: a small residual face network sized for training on a few CPU cores (the real-face benchmark).

It takes arcface_torch's input, (N, 3, 112, 112) normalised faces, so data, evaluation and ONNX export need nothing
special, and works at half resolution inside: a 2x2 average pool (112 -> 56), a stride-2 3x3 stem (-> 28), then three
residual stages of two 3x3 convs each, every one halving the side (14, 7, 4), and iresnet's head (BatchNorm2d,
flatten, linear, BatchNorm1d). About 1.7M parameters; roughly 750 images/s forward + backward at batch 128 on 2 CPU
cores (mbf at 112x112 trains at about 10 images/s there). On a GPU use an arcface_torch network (mbf, r18) instead.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_plugin.networks.registry import register_network


def _conv_bn_prelu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.PReLU(out_channels))


class _Residual(nn.Module):
    """conv-BN-PReLU, conv-BN, plus a strided 1x1 projection of the input, then PReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn_prelu(in_channels, out_channels, stride),
                                  nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                      nn.BatchNorm2d(out_channels))
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class CpuFaceNet(nn.Module):
    """(N, 3, 112, 112) -> (N, embedding_size) raw embeddings; see the module docstring."""

    def __init__(self, embedding_size: int = 128, channels: tuple[int, ...] = (32, 64, 128, 256),
                 dropout: float = 0.0, input_size: int = 112) -> None:
        super().__init__()
        side = (input_size // 2 + 1) // 2
        stages = [_conv_bn_prelu(3, channels[0], 2)]
        for previous, current in zip(channels, channels[1:]):
            stages.append(_Residual(previous, current, 2))
            side = (side + 1) // 2
        self.pool = nn.AvgPool2d(2)
        self.body = nn.Sequential(*stages)
        self.bn2 = nn.BatchNorm2d(channels[-1])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels[-1] * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.body(self.pool(x)))
        return self.features(self.fc(self.dropout(torch.flatten(x, 1))))


@register_network("cpu_r8")
def cpu_r8(embedding_size: int = 128, fp16: bool = False, dropout: float = 0.0) -> CpuFaceNet:
    """The benchmark's CPU student (fp16 has no effect: CPU training runs in float32)."""
    return CpuFaceNet(embedding_size, dropout=dropout)
