"""MobileFaceNet (mbf, mbf_large) with arcface_torch's parameter names, shapes and forward computation.

The body is MobileNetV2-like: inverted bottlenecks (1x1 expansion, 3x3 depthwise, 1x1 linear projection, PReLU
activations) in four stages that reduce 112x112 to 7x7. A 1x1 conv lifts the channels to 512 and the "GDC" head
(7x7 depthwise conv, linear layer, BatchNorm1d) makes the embedding. In arcface_torch every conv/BN/PReLU group sits
under a `layers` attribute, which is why checkpoint keys look like `layers.3.layers.0.layers.1.layers.0.weight`;
`Stack` reproduces that naming.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_plugin.networks._amp import cuda_autocast
from kd_plugin.networks.registry import register_network, without_dropout

# (units in each of the four stages, width multiplier of the 64/128 base channels)
VARIANTS = {
    "mbf": ((1, 4, 6, 2), 2),
    "mbf_large": ((2, 8, 12, 4), 4),
}
_HEAD_CHANNELS = 512


class Stack(nn.Module):
    """Modules applied in order, kept under `layers`; with `residual` the input is added to the result."""

    def __init__(self, *modules: nn.Module, residual: bool = False) -> None:
        """Wrap `modules` in a Sequential named `layers`."""
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the modules, adding the input back when residual."""
        out = self.layers(x)
        return x + out if self.residual else out


def conv_bn(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            padding: int | None = None, prelu: bool = True) -> Stack:
    """Bias-free conv and BN, then a per-channel PReLU unless `prelu` is False (a linear projection)."""
    padding = kernel // 2 if padding is None else padding
    parts: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if prelu:
        parts.append(nn.PReLU(out_channels))
    return Stack(*parts)


def bottleneck(in_channels: int, out_channels: int, hidden: int, stride: int = 1, residual: bool = False) -> Stack:
    """Inverted bottleneck: expand to `hidden` channels, 3x3 depthwise (strided), project linearly."""
    return Stack(
        conv_bn(in_channels, hidden),
        conv_bn(hidden, hidden, kernel=3, stride=stride, groups=hidden),
        conv_bn(hidden, out_channels, prelu=False),
        residual=residual,
    )


def repeated(channels: int, hidden: int, count: int) -> Stack:
    """`count` shape-preserving residual bottlenecks."""
    return Stack(*(bottleneck(channels, channels, hidden, residual=True) for _ in range(count)))


class MobileFaceNet(nn.Module):
    """(N, 3, 112, 112) normalised faces -> (N, embedding_size) raw embeddings."""

    def __init__(self, embedding_size: int = 512, fp16: bool = False,
                 stage_units: tuple[int, int, int, int] = (1, 4, 6, 2), width: int = 2) -> None:
        """Build the body, the 1x1 lift to 512 channels and the GDC head."""
        super().__init__()
        self.fp16 = fp16
        low, high = 64 * width, 128 * width
        # the expansion widths (128, 256, 512) are fixed numbers in arcface_torch, independent of `width`
        if stage_units[0] == 1:
            # a single unit is a plain grouped 3x3 conv (64 groups, whatever the width), not a bottleneck
            first_stage = conv_bn(low, low, kernel=3, groups=64)
        else:
            first_stage = repeated(low, 128, stage_units[0])
        self.layers = nn.ModuleList([
            conv_bn(3, low, kernel=3, stride=2),
            first_stage,
            bottleneck(low, low, 128, stride=2),
            repeated(low, 128, stage_units[1]),
            bottleneck(low, high, 256, stride=2),
            repeated(high, 256, stage_units[2]),
            bottleneck(high, high, 512, stride=2),
            repeated(high, 256, stage_units[3]),
        ])
        self.conv_sep = conv_bn(high, _HEAD_CHANNELS)
        self.features = Stack(
            conv_bn(_HEAD_CHANNELS, _HEAD_CHANNELS, kernel=7, groups=_HEAD_CHANNELS, padding=0, prelu=False),
            nn.Flatten(1),
            nn.Linear(_HEAD_CHANNELS, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """arcface_torch's initialisation, so training from scratch starts where upstream does."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch; with fp16 the body runs under CUDA autocast and the 1x1 lift and head in float32."""
        with cuda_autocast(x, self.fp16):
            for stage in self.layers:
                x = stage(x)
        if self.fp16:
            x = x.float()
        return self.features(self.conv_sep(x))


def build_mobilefacenet(name: str, embedding_size: int = 512, fp16: bool = False) -> MobileFaceNet:
    """The MobileFaceNet called `name` (mbf or mbf_large)."""
    stage_units, width = VARIANTS[name]
    return MobileFaceNet(embedding_size=embedding_size, fp16=fp16, stage_units=stage_units, width=width)


@register_network("mbf")
@without_dropout
def mbf(*, embedding_size: int, fp16: bool) -> MobileFaceNet:
    """arcface_torch's MobileFaceNet."""
    return build_mobilefacenet("mbf", embedding_size, fp16)


@register_network("mbf_large")
@without_dropout
def mbf_large(*, embedding_size: int, fp16: bool) -> MobileFaceNet:
    """arcface_torch's larger MobileFaceNet."""
    return build_mobilefacenet("mbf_large", embedding_size, fp16)
