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
    "ACTIVATIONS", "BasicBlock", "Bottleneck", "ResNet", "PoolResNet", "WhiteningConv", "register_model",
    "create_model", "list_models", "count_parameters", "PARAM_LIMIT", "init_whitening", "has_whitening",
    "parse_head_scale",
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


# ----------------------------------------------------------------------------------------------
# airbench's model-side techniques, as options of both nets below (stem="whiten", bn_*, dirac, head_scale)
class WhiteningConv(nn.Conv2d):
    """airbench's whitening stem: a ``kernel`` x ``kernel`` conv whose filters are the eigenvectors of the
    training patches' (uncentred) covariance, each scaled by 1/sqrt(eigenvalue + eps), in both signs.

    So its positive half outputs decorrelated, unit-variance patch features on the data it was fitted on,
    and the negative half keeps the information a following ReLU/GELU would cut off. The weights are
    frozen (``requires_grad`` False); the bias trains, for the first epochs only (``--whiten-bias-epochs``).
    Until ``fit`` is called the filters keep PyTorch's default init.
    """

    def __init__(self, in_ch: int = 3, kernel: int = 2, eps: float = 5e-4):
        super().__init__(in_ch, 2 * in_ch * kernel * kernel, kernel, padding=0, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, eps: float | None = None) -> None:
        """Set the filters from ``images``: normalised float (N, C, H, W) training images, unaugmented."""
        c, (h, w) = images.shape[1], self.kernel_size
        covariance, n = images.new_zeros(c * h * w, c * h * w, dtype=torch.float32), 0
        for chunk in images.split(500):  # all patches of 5,000 images at once would take 230 MB
            patches = chunk.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
            covariance += patches.T @ patches
            n += len(patches)
        covariance /= n
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending; columns are eigenvectors
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)  # largest first, as airbench94
        eps = self.eps if eps is None else eps
        scaled = eigenvectors.reshape(-1, c, h, w) / torch.sqrt(eigenvalues.clamp(min=0) + eps).view(-1, 1, 1, 1)
        self.weight.copy_(torch.cat((scaled, -scaled)).to(self.weight.dtype))


def has_whitening(model: nn.Module) -> bool:
    return any(isinstance(m, WhiteningConv) for m in model.modules())


def init_whitening(model: nn.Module, images: torch.Tensor, eps: float | None = None) -> bool:
    """Fit every whitening stem of ``model`` on ``images`` (normalised float NCHW); False when it has none."""
    layers = [m for m in model.modules() if isinstance(m, WhiteningConv)]
    for layer in layers:
        layer.fit(images.to(layer.weight.device), eps)
    return bool(layers)


def configure_batchnorm(model: nn.Module, momentum: float | None = None, eps: float | None = None,
                        frozen_weight: bool = False) -> None:
    """Set every BatchNorm's momentum (PyTorch's convention: the weight of each new batch in the running
    statistics, so airbench's 0.6 is 0.4 here) and eps; with ``frozen_weight`` fix its scale at 1.

    A frozen scale is what airbench does: only the BatchNorm biases train there (at 64x the lr, see
    ``--norm-bias-lr-scale``).
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if momentum is not None:
                m.momentum = momentum
            if eps is not None:
                m.eps = eps
            if frozen_weight and m.weight is not None:
                nn.init.ones_(m.weight)
                m.weight.requires_grad_(False)


def dirac_init(model: nn.Module) -> None:
    """Identity-initialise convs as airbench does: filter i < in_channels of each conv passes input channel
    i through unchanged (all filters when in == out channels), the rest keep their random init.

    An implicit residual at initialisation ("Create an implicit residual via identity initialization", in
    airbench's words): each conv starts by passing its input on. The whitening stem is left out.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and not isinstance(m, WhiteningConv) and m.groups == 1:
            with torch.no_grad():
                nn.init.dirac_(m.weight[:m.weight.shape[1]])


def parse_head_scale(value: float | str, width: int | None = None) -> float:
    """A logit scale from a number, a fraction ('1/9') or '1/width' (1 / the features entering the head)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        scale = float(value)
    else:
        text = str(value).replace(" ", "")
        num, _, den = text.partition("/")
        if den == "width":
            if width is None:
                return float(num)  # syntax check only; the caller knows no width yet
            den = str(width)
        try:
            scale = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"head_scale: expected a number, a fraction like 1/9 or 1/width, got {value!r}") from None
    if not scale > 0:
        raise ValueError(f"head_scale: must be positive, got {value!r}")
    return scale


def whitening_stem(activation: str, kernel: int = 2, eps: float = 5e-4) -> tuple[nn.Sequential, int]:
    """(stem, its output channels): a WhiteningConv then the activation, no BatchNorm (airbench's stem)."""
    conv = WhiteningConv(3, kernel, eps)
    return nn.Sequential(conv, make_activation(activation)), conv.out_channels


def apply_techniques(model: nn.Module, bn_momentum: float | None, bn_eps: float | None, bn_frozen_weight: bool,
                     dirac: bool) -> None:
    """The init-time options shared by the nets: BatchNorm settings, then dirac init."""
    configure_batchnorm(model, bn_momentum, bn_eps, bn_frozen_weight)
    if dirac:
        dirac_init(model)


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
        stem: str = "conv",
        whiten_eps: float = 5e-4,
        bn_momentum: float | None = None,
        bn_eps: float | None = None,
        bn_frozen_weight: bool = False,
        dirac: bool = False,
        head_scale: float | str = 1.0,
    ):
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"blocks {list(blocks)} and widths {list(widths)} must have the same length")
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; expected one of {sorted(BLOCKS)}")
        strides = list(strides) if strides is not None else [1] + [2] * (len(blocks) - 1)
        block_cls = BLOCKS[block]
        stem_width = stem_width or widths[0]
        if stem == "whiten":  # 2x2 unpadded: 31x31 maps into the first stage
            self.stem, stem_width = whitening_stem(activation, 2, whiten_eps)
        elif stem == "conv":
            self.stem = nn.Sequential(conv_bn(3, stem_width, 3), make_activation(activation))
        else:
            raise ValueError(f"unknown stem {stem!r}; expected 'conv' or 'whiten'")
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
        self.head_scale = parse_head_scale(head_scale, in_ch)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not isinstance(m, WhiteningConv):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        apply_techniques(self, bn_momentum, bn_eps, bn_frozen_weight, dirac)

    init_whitening = init_whitening

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.dropout(self.forward_features(x)))
        return logits if self.head_scale == 1.0 else logits * self.head_scale


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
    stage already runs at a quarter of the pixels. ``residual=False`` is airbench's own ConvGroup.
    """

    def __init__(self, in_ch: int, out_ch: int, activation: str, residual: bool = True):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.MaxPool2d(2),
                                  nn.BatchNorm2d(out_ch), make_activation(activation))
        self.conv = nn.Sequential(conv_bn(out_ch, out_ch, 3), make_activation(activation))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.conv(x) if self.residual else self.conv(x)


class PoolResNet(nn.Module):
    """airbench94's layout (stem, three pooling stages, global max-pool, scaled linear head) with residuals."""

    def __init__(self, widths: Sequence[int] = (64, 256, 256), stem_width: int = 24, activation: str = "gelu",
                 num_classes: int = 10, head_scale: float | str = 1 / 9, stem: str = "conv",
                 whiten_eps: float = 5e-4, residual: bool = True, bn_momentum: float | None = None,
                 bn_eps: float | None = None, bn_frozen_weight: bool = False, dirac: bool = False):
        super().__init__()
        # airbench's 2x2 unpadded stem: 32x32 -> 31x31 at 24 channels, cheaper than a 3x3 at 32.
        if stem == "whiten":
            self.stem, stem_width = whitening_stem(activation, 2, whiten_eps)
        elif stem == "conv":
            self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 2, bias=False), nn.BatchNorm2d(stem_width),
                                      make_activation(activation))
        else:
            raise ValueError(f"unknown stem {stem!r}; expected 'conv' or 'whiten'")
        chans = [stem_width, *widths]
        self.stages = nn.Sequential(*[PoolStage(a, b, activation, residual) for a, b in zip(chans, chans[1:])])
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(chans[-1], num_classes, bias=False)
        # A small output scale keeps the initial logits tame under the high learning rates this net likes.
        self.head_scale = parse_head_scale(head_scale, chans[-1])
        self.num_features = chans[-1]
        apply_techniques(self, bn_momentum, bn_eps, bn_frozen_weight, dirac)

    init_whitening = init_whitening

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)) * self.head_scale


@register_model
def resnet_airbench_2m(**overrides) -> PoolResNet:
    """Fast net for time-to-accuracy: airbench94's widths 64-256-256 with pooling stages and residual convs."""
    model_args = dict(widths=(64, 256, 256), stem_width=24, activation="gelu")
    return PoolResNet(**{**model_args, **overrides})


@register_model
def resnet_airbench_whiten_2m(**overrides) -> PoolResNet:
    """resnet_airbench_2m with airbench94's model-side techniques: whitening stem (fit it with
    ``model.init_whitening(images)``; train.py does), BatchNorm with scale frozen at 1, running-stat
    momentum 0.4 (airbench's 0.6 in its convention) and eps 1e-12, dirac-initialised convs, logits x 1/9."""
    model_args = dict(widths=(64, 256, 256), activation="gelu", stem="whiten", bn_momentum=0.4, bn_eps=1e-12,
                      bn_frozen_weight=True, dirac=True, head_scale=1 / 9)
    return PoolResNet(**{**model_args, **overrides})


@register_model
def resnet_airbench_whiten_5m(**overrides) -> PoolResNet:
    """airbench95's widths (128-384-384, 4.61M parameters) on resnet_airbench_whiten_2m's layout and techniques:
    the largest airbench net under the 5M-parameter limit (airbench96's 128-512-512 is 7.85M here)."""
    model_args = dict(widths=(128, 384, 384), activation="gelu", stem="whiten", bn_momentum=0.4, bn_eps=1e-12,
                      bn_frozen_weight=True, dirac=True, head_scale=1 / 9)
    return PoolResNet(**{**model_args, **overrides})

