"""Improved ResNets (r18 ... r200) with arcface_torch's parameter names, shapes and forward computation.

Each residual unit is pre-activated: BN, 3x3 conv, BN, PReLU, 3x3 conv (carrying the stride), BN, plus a shortcut that
is a strided 1x1 conv + BN at the first unit of every stage. Four stages of 64/128/256/512 channels each halve the
112x112 input, so the head sees 512x7x7 features: BN, flatten, dropout, a linear layer and a BatchNorm1d whose scale is
pinned at 1.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from kd_plugin.networks._amp import cuda_autocast
from kd_plugin.networks.registry import register_network

STAGE_WIDTHS = (64, 128, 256, 512)
UNITS_PER_STAGE = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
_HEAD_SIDE = 7  # 112 / 2**4


class ResidualUnit(nn.Module):
    """One pre-activated residual unit; the stride sits on the second convolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        """Build the unit, adding a projection shortcut when the shape changes."""
        super().__init__()
        # attribute names and their order are the checkpoint keys (and their order) of arcface_torch's IBasicBlock
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=1e-5)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual branch plus shortcut."""
        branch = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return branch + shortcut


class IResNet(nn.Module):
    """(N, 3, 112, 112) normalised faces -> (N, embedding_size) raw embeddings."""

    def __init__(self, units_per_stage: tuple[int, int, int, int], embedding_size: int = 512, dropout: float = 0.0,
                 fp16: bool = False) -> None:
        """Build the stem, the four stages and the embedding head."""
        super().__init__()
        self.fp16 = fp16
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0], eps=1e-5)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        channels = STAGE_WIDTHS[0]
        for index, (width, count) in enumerate(zip(STAGE_WIDTHS, units_per_stage), start=1):
            units = [ResidualUnit(channels, width, stride=2)]
            units += [ResidualUnit(width, width) for _ in range(count - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*units))
            channels = width
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        # in place, as upstream: bn2's output is read by nothing else (BN's backward keeps its input), so no copy
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(channels * _HEAD_SIDE * _HEAD_SIDE, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        """arcface_torch's initialisation, so training from scratch starts where upstream does."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # the embedding BN keeps a unit scale for good (upstream freezes it); checkpoints still store the weight
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch; with fp16 the convolutional body runs under CUDA autocast and the head in float32."""
        with cuda_autocast(x, self.fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        if self.fp16:
            x = x.float()
        return self.features(self.fc(x))


def build_iresnet(name: str, embedding_size: int = 512, fp16: bool = False, dropout: float = 0.0) -> IResNet:
    """The IResNet called `name` (r18, r34, r50, r100 or r200)."""
    return IResNet(UNITS_PER_STAGE[name], embedding_size=embedding_size, dropout=dropout, fp16=fp16)


# the arcface_torch names, one declaration each (arcface_torch's iresnets are the only family with dropout)
register_network("r18", functools.partial(build_iresnet, "r18"))
register_network("r34", functools.partial(build_iresnet, "r34"))
register_network("r50", functools.partial(build_iresnet, "r50"))
register_network("r100", functools.partial(build_iresnet, "r100"))
register_network("r200", functools.partial(build_iresnet, "r200"))
