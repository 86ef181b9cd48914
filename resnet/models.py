"""ResNet building blocks, a configurable CIFAR ResNet and a registry of named presets.

Every preset is one function decorated with ``@register_model`` that merges its own
``model_args`` with the caller's overrides (timm's pattern), so a variant is a flag, not an edit:
``create_model("resnet_report_4m", activation="relu", blocks=[2, 2, 2, 2])``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS", "BasicBlock", "Bottleneck", "ResNet", "register_model", "create_model",
    "list_models", "count_parameters", "PARAM_LIMIT",
]

# The course rule: a registered model stays under this many parameters unless its name says "_big".
PARAM_LIMIT = 5_000_000

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Bias-free conv followed by BatchNorm (the BN shift makes a conv bias redundant)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    )


def projection(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Identity when shapes match, else the 1x1 conv + BN shortcut of the original ResNet (option B)."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return conv_bn(in_ch, out_ch, 1, stride)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; ``expansion`` = 1."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, activation: str, drop_path: float = 0.0):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = conv_bn(in_ch, width, 3, stride)
        self.act1 = make_activation(activation)
        self.conv2 = conv_bn(width, out_ch, 3)
        self.shortcut = projection(in_ch, out_ch, stride)
        self.drop_path = drop_path
        self.act2 = make_activation(activation)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act1(self.conv1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.shortcut(x) + stochastic_depth(self.residual(x), self.drop_path, self.training))


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3, 1x1 expand (x4); for deeper nets at the same parameter budget."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, activation: str, drop_path: float = 0.0):
        nn.Module.__init__(self)
        out_ch = width * self.expansion
        self.conv1 = conv_bn(in_ch, width, 1)
        self.act1 = make_activation(activation)
        self.conv2 = conv_bn(width, width, 3, stride)
        self.act_mid = make_activation(activation)
        self.conv3 = conv_bn(width, out_ch, 1)
        self.shortcut = projection(in_ch, out_ch, stride)
        self.drop_path = drop_path
        self.act2 = make_activation(activation)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act_mid(self.conv2(self.act1(self.conv1(x)))))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drop the whole residual branch per sample with probability p (scaled to keep the mean)."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(1 - p)
    return x * keep / (1 - p)


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem (no max-pool at 32x32), stages of blocks, global average pool, linear head."""

    def __init__(
        self,
        blocks: Sequence[int] = (3, 2, 4, 3),
        widths: Sequence[int] = (32, 64, 128, 256),
        strides: Sequence[int] | None = None,
        block: str = "basic",
        activation: str = "gelu",
        stem_width: int | None = None,
        num_classes: int = 10,
        drop_path: float = 0.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"blocks {list(blocks)} and widths {list(widths)} must have the same length")
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; expected one of {sorted(BLOCKS)}")
        strides = list(strides) if strides is not None else [1] + [2] * (len(blocks) - 1)
        block_cls = BLOCKS[block]
        stem_width = stem_width or widths[0]
        self.stem = nn.Sequential(conv_bn(3, stem_width, 3), make_activation(activation))
        stages, in_ch = [], stem_width
        total, index = sum(blocks), 0
        for n, width, stride in zip(blocks, widths, strides):
            layers = []
            for i in range(n):
                # Linearly rising drop-path rate with depth, as in the stochastic-depth paper.
                rate = drop_path * index / max(total - 1, 1)
                layers.append(block_cls(in_ch, width, stride if i == 0 else 1, activation, rate))
                in_ch, index = width * block_cls.expansion, index + 1
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(in_ch, num_classes)
        self.num_features = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.forward_features(x)))


# ----------------------------------------------------------------------------------------------
# Registry
_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` replace the preset's arguments."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name](**overrides)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build(defaults: dict, overrides: dict) -> ResNet:
    return ResNet(**{**defaults, **overrides})


@register_model
def resnet_report_4m(**overrides) -> ResNet:
    """The course report's net: BasicBlocks [3,2,4,3] at widths 32-64-128-256; 4,587,690 parameters."""
    model_args = dict(blocks=(3, 2, 4, 3), widths=(32, 64, 128, 256), block="basic", activation="gelu")
    return _build(model_args, overrides)


@register_model
def resnet18_narrow_3m(**overrides) -> ResNet:
    """ResNet-18 layout [2,2,2,2] at widths 32-64-128-256: fewer layers than the report net, same widths."""
    model_args = dict(blocks=(2, 2, 2, 2), widths=(32, 64, 128, 256), block="basic", activation="gelu")
    return _build(model_args, overrides)


@register_model
def resnet_tiny_20k(**overrides) -> ResNet:
    """A 3-stage toy net (about 20k parameters) for tests and smoke runs, not for accuracy."""
    model_args = dict(blocks=(1, 1, 1), widths=(8, 16, 32), block="basic", activation="relu")
    return _build(model_args, overrides)


class PoolStage(nn.Module):
    """Conv, 2x2 max-pool, BN, activation, then a residual conv-BN-activation at the pooled size.

    Pooling instead of strided convs is what makes airbench's net fast: the second conv of every
    stage already runs at a quarter of the pixels.
    """

    def __init__(self, in_ch: int, out_ch: int, activation: str):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.MaxPool2d(2),
                                  nn.BatchNorm2d(out_ch), make_activation(activation))
        self.conv = nn.Sequential(conv_bn(out_ch, out_ch, 3), make_activation(activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.conv(x)


class PoolResNet(nn.Module):
    """airbench94's layout (stem, three pooling stages, global max-pool, scaled linear head) with residuals."""

    def __init__(self, widths: Sequence[int] = (64, 256, 256), stem_width: int = 24, activation: str = "gelu",
                 num_classes: int = 10, head_scale: float = 1 / 9):
        super().__init__()
        # airbench's 2x2 unpadded stem: 32x32 -> 31x31 at 24 channels, cheaper than a 3x3 at 32.
        self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 2, bias=False), nn.BatchNorm2d(stem_width),
                                  make_activation(activation))
        chans = [stem_width, *widths]
        self.stages = nn.Sequential(*[PoolStage(a, b, activation) for a, b in zip(chans, chans[1:])])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(chans[-1], num_classes, bias=False)
        # A small output scale keeps the initial logits tame under the high learning rates this net likes.
        self.head_scale = head_scale
        self.num_features = chans[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)) * self.head_scale


@register_model
def resnet_airbench_2m(**overrides) -> PoolResNet:
    """Fast net for time-to-accuracy: airbench94's widths 64-256-256 with pooling stages and residual convs."""
    model_args = dict(widths=(64, 256, 256), stem_width=24, activation="gelu")
    return PoolResNet(**{**model_args, **overrides})
