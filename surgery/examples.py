"""Tiny networks for the docstring examples (run by the test suite): two 8x8 CNNs with
different random weights and named layers ``conv -> relu -> conv2 -> relu2 -> pool ->
flat -> fc``, and a clone between them made in about a second."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

__all__ = ["tiny_cnn", "tiny_pair", "tiny_clone"]


def tiny_cnn(num_classes: int, seed: int) -> nn.Sequential:
    """(B, 1, 8, 8) -> (B, num_classes), random weights from ``seed``, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = OrderedDict(
            conv=nn.Conv2d(1, 4, 3),
            relu=nn.ReLU(),
            conv2=nn.Conv2d(4, 4, 3),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(4, num_classes),
        )
        return nn.Sequential(layers).eval()


def tiny_pair() -> tuple[nn.Sequential, nn.Sequential, Tensor, Tensor]:
    """(target with 3 classes, source with 2 classes, images (16, 1, 8, 8), labels (16,)):
    the images stand for the source's class 1, cloned as the network's output 3."""
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(16, 1, 8, 8, generator=generator, device=generator.device)
    return tiny_cnn(3, seed=0), tiny_cnn(2, seed=1), images, torch.full((16,), 3, device=images.device)


def tiny_clone():  # -> (ClonedNetwork, target, source, images)
    """The source's class 1 cloned into the target, branch ``"src"``, a minimal search."""
    from pnc.surgery.cloning import clone
    from pnc.surgery.insertion import SearchConfig

    target, source, images, labels = tiny_pair()
    config = SearchConfig(loc_epochs=1, joint_epochs=1, binary_epochs=1, min_steps_per_epoch=2)
    net = clone(
        target,
        source,
        images,
        labels,
        [1],
        class_names=["new"],
        source_name="src",
        config=config,
        num_masks=8,
        progress=False,
    )
    return net, target, source, images
