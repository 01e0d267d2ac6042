"""Small architectures for small images, beside any timm model.

Ours (LeNet-5, a plain 4-conv CNN, CIFAR-style ResNet-20) are built from top-level
children so that the paper's blocks are obvious: ``model.pnc_blocks`` lists the
module paths of the block-level cut modules, and the classifier is the ``nn.Linear``
``model.head`` whose output is the model output. Like timm models they offer
``forward_features`` (before the head), ``forward_head``, ``num_features`` and
``num_classes``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from pnc.surgery.errors import ConfigError, ModelNotFoundError

__all__ = ["create", "list_archs", "input_kwargs", "LeNet5", "CNN4", "ResNetC20"]


class _Classifier(nn.Module):
    """Shared forward: ``forward_features`` -> pooled/flat features (N, D) -> ``head``."""

    pnc_blocks: list[str]
    head: nn.Linear

    @property
    def num_features(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward_head(self, features: Tensor) -> Tensor:
        """(N, D) features -> (N, num_classes) logits."""
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class LeNet5(_Classifier):
    """LeNet-5: conv5x5(6)-ReLU-maxpool | conv5x5(16)-ReLU-maxpool | fc120-ReLU-fc84-ReLU | fc.

    The first conv is padded by 2, so 28x28 inputs get the classic 32x32 geometry;
    the second conv is padded too when its input is smaller than 5x5 (8x8 digits).
    ``img_size`` fixes the flatten size of block3.
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, img_size: int = 28) -> None:
        super().__init__()
        mid = img_size // 2
        pad2 = 2 if mid < 5 else 0
        out = (mid + 2 * pad2 - 4) // 2
        if out < 1:
            raise ConfigError(f"lenet5 needs img_size >= 4, got {img_size}; pass the side of your images")
        self.block1 = nn.Sequential(nn.Conv2d(in_chans, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * out * out, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU()
        )
        self.head = nn.Linear(84, num_classes)
        self.pnc_blocks = ["block1", "block2", "block3"]

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, C, img_size, img_size) -> (N, 84)."""
        return self.block3(self.block2(self.block1(x)))


def _conv_bn(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class CNN4(_Classifier):
    """Plain CNN: four conv3x3-BN-ReLU blocks (widths w, w, 2w, 2w; max-pool after the 2nd and
    4th), global average pool, linear head. Works for any input of at least 4x4."""

    def __init__(self, in_chans: int = 3, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.block1 = _conv_bn(in_chans, width, pool=False)
        self.block2 = _conv_bn(width, width, pool=True)
        self.block3 = _conv_bn(width, 2 * width, pool=False)
        self.block4 = _conv_bn(2 * width, 2 * width, pool=True)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)
        self.pnc_blocks = ["block1", "block2", "block3", "block4"]

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, 2 * width)."""
        return self.pool(self.block4(self.block3(self.block2(self.block1(x)))))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetC20(_Classifier):
    """CIFAR-style ResNet-20 (He et al. 2016): stem conv3x3(w) | 3 stages x 3 basic blocks,
    widths w/2w/4w (default 16/32/64), strides 1/2/2 | global average pool | linear head."""

    def __init__(self, in_chans: int = 3, num_classes: int = 10, width: int = 16, depth: int = 20) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"resnetc depth must be 6n+2 (20, 32, 44, 56), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        widths = [width, 2 * width, 4 * width]
        cin = width
        for i, (cout, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)
        self.pnc_blocks = ["stem", "layer1", "layer2", "layer3"]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, 4 * width)."""
        return self.pool(self.layer3(self.layer2(self.layer1(self.stem(x)))))


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "cnn4": CNN4,
    "resnetc20": ResNetC20,
}


def list_archs() -> list[str]:
    """Names of pnc's own architectures (any ``timm.list_models()`` name works too)."""
    return sorted(_REGISTRY)


def input_kwargs(name: str, input_size: tuple[int, int, int]) -> dict[str, Any]:
    """Constructor kwargs that an architecture needs for a (C, H, W) input: ``in_chans``
    always, ``img_size`` where the constructor takes one (LeNet-5: the side; timm ViTs and
    other timm models whose class takes ``img_size``: (H, W))."""
    kwargs: dict[str, Any] = {"in_chans": int(input_size[0])}
    factory = _REGISTRY.get(name)
    if factory is not None:
        if "img_size" in inspect.signature(factory).parameters:
            kwargs["img_size"] = int(input_size[-1])
    elif _timm_takes_img_size(name):
        kwargs["img_size"] = tuple(int(v) for v in input_size[1:])
    return kwargs


def _timm_takes_img_size(name: str) -> bool:
    """Whether the class that timm builds for ``name`` takes ``img_size`` (built once, tiny head)."""
    import timm

    if not timm.is_model(name):
        return False
    model = timm.create_model(name, pretrained=False, num_classes=1)
    return any("img_size" in inspect.signature(c.__init__).parameters for c in type(model).__mro__[:-2])


def create(name: str, in_chans: int = 3, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Build ``name`` with random weights: one of :func:`list_archs` or any timm model
    (always ``pretrained=False``). Unknown names raise :class:`ModelNotFoundError`."""
    factory = _REGISTRY.get(name)
    if factory is not None:
        try:
            return factory(in_chans=in_chans, num_classes=num_classes, **kwargs)
        except TypeError as err:
            params = ", ".join(inspect.signature(factory).parameters)
            raise ConfigError(f"bad arguments for {name}: {err}; it takes {params}") from err
    import timm

    if not timm.is_model(name):
        known = list_archs() + timm.list_models()
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = (
            f"did you mean {', '.join(close)}?"
            if close
            else f"use one of {', '.join(list_archs())} or a name from timm.list_models()"
        )
        raise ModelNotFoundError(f"unknown architecture {name!r}; {hint}")
    return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes, **kwargs)
