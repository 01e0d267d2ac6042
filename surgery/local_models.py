"""The local model set G of Eq. 4: one LIME-style linear model per image.

For each image x_i, |B| binary occlusion masks b over a ``grid x grid`` split of the image
into cells (the first mask keeps every cell) give perturbed images b * x_i (an occluded cell takes the
dataset mean, i.e. zero after normalization). g_i is the weighted ridge regression from
the mask bits to the network's logits of the classes of interest::

    g_i = argmin_g  sum_b  pi_b * || f(b * x_i) - g(b) ||^2 + ridge * ||g||^2

with the LIME locality weight pi_b = exp(-d_b^2 / width^2), d_b the cosine distance from b
to the all-ones mask. The masks are shared by all images (Zest-style), so the normal
equations have one matrix for every image and every g_i comes out of one batched solve.

Shapes: N images, P = grid^2 cells, K classes of interest. G is fitted where the model is:
masks and coefficients live on its device, ``index`` on the images' (it indexes them). ("Occlusion masks" here hide
image cells; the *channel* masks of localization live in ``channel_groups.py``.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from pnc.surgery.devices import DeviceLike, device_of, float64_device
from pnc.surgery.errors import DataError
from pnc.surgery.io import save_tensors, state_dict_sha256


def occlusion_masks(num_masks: int, grid: int, seed: int, device: DeviceLike | None = None) -> Tensor:
    """(num_masks, grid*grid) binary masks on ``device`` (default: torch's); row 0 keeps
    everything, the rest keep each cell with probability 1/2 (seeded, drawn on the CPU: the
    same masks on every device)."""
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(num_masks, grid * grid, generator=g, device=g.device) < 0.5).float()
    masks[0] = 1.0
    return masks.to(device if device is not None else torch.get_default_device())


def occlude(images: Tensor, masks: Tensor) -> Tensor:
    """images (N, C, H, W), occlusion masks (N, P) -> images with the hidden cells set to 0."""
    n, _, h, w = images.shape
    grid = int(round(masks.shape[1] ** 0.5))
    pixel = F.interpolate(masks.view(n, 1, grid, grid), size=(h, w), mode="nearest")
    return images * pixel


def locality_weights(masks: Tensor, width: float = 0.25) -> Tensor:
    """LIME kernel on the cosine distance to the all-ones mask: (|B|, P) -> (|B|,)."""
    kept = masks.sum(1) / masks.shape[1]
    distance = 1.0 - kept.sqrt()
    return torch.exp(-(distance**2) / width**2)


@dataclass
class LocalModelSet:
    """G: ``coef[i]`` maps [mask bits, 1] (P+1,) to K logits for image i.

    Attributes:
        masks: (|B|, P) the perturbation masks, shared by all images.
        coef: (N, P+1, K) one linear model per image (last row = intercept).
        index: (N,) positions of the images in the set G was fitted on.
    """

    masks: Tensor
    coef: Tensor
    index: Tensor

    def predict(self, masks: Tensor, which: Tensor | None = None) -> Tensor:
        """g_i(b) for masks (M, P) -> (N, M, K), or for paired rows when ``which`` (M,)
        names the model of each mask -> (M, K)."""
        z = torch.cat([masks, masks.new_ones(masks.shape[0], 1)], 1)
        if which is None:
            return torch.einsum("mp,npk->nmk", z, self.coef)
        return torch.einsum("mp,mpk->mk", z, self.coef[which])

    def signature(self) -> Tensor:
        """All models' coefficients, concatenated: the Zest signature (N*(P+1)*K,)."""
        return self.coef.flatten()

    def similarity(self, other: LocalModelSet) -> float:
        """Cosine between two local model sets fitted with the same masks on the same images."""
        if not torch.equal(self.masks, other.masks) or self.coef.shape != other.coef.shape:
            raise ValueError("local model sets must share masks and images to be compared")
        return float(F.cosine_similarity(self.signature(), other.signature(), dim=0))

    def save(self, path: Path) -> None:
        """Write the three tensors (as CPU tensors) to a safetensors file."""
        tensors = {"masks": self.masks, "coef": self.coef, "index": self.index}
        save_tensors(path, tensors)

    @classmethod
    def load(
        cls, path: Path, device: DeviceLike | None = None, index_device: DeviceLike | None = None
    ) -> LocalModelSet:
        """Read a saved G: masks and coefficients onto ``device``, the index onto
        ``index_device`` (default: ``device``; None: torch's default device)."""
        t = load_file(str(path), device=str(device or torch.get_default_device()))
        index = t["index"].to(index_device if index_device is not None else t["index"].device)
        return cls(t["masks"], t["coef"], index)


@torch.no_grad()
def perturbed_logits(
    model: nn.Module | Callable[[Tensor], Tensor],
    images: Tensor,
    masks: Tensor,
    outputs: list[int] | None,
    batch_size: int = 256,
) -> Tensor:
    """The model's logits on every (image, mask) pair: (N, |B|, K), one batched forward
    per chunk of pairs, on the model's device (a callable: the images' device)."""
    device = device_of(model) if isinstance(model, nn.Module) else images.device
    images, masks = images.to(device), masks.to(device)
    n, m = images.shape[0], masks.shape[0]
    pairs = torch.arange(n * m, device=device)
    chunks = []
    for chunk in pairs.split(batch_size):
        i, b = chunk // m, chunk % m
        logits = model(occlude(images[i], masks[b]))
        chunks.append(logits if outputs is None else logits[:, outputs])
    return torch.cat(chunks).view(n, m, -1)


def solve_local_models(masks: Tensor, targets: Tensor, width: float = 0.25, ridge: float = 1e-2) -> Tensor:
    """Weighted ridge least squares for all images at once.

    masks (|B|, P), targets (N, |B|, K) -> coef (N, P+1, K), on the targets' device (solved in
    float64 there, or on the CPU for a device without float64). The intercept is not penalised.
    """
    solver = float64_device(targets.device)
    masks = masks.to(solver)
    z = torch.cat([masks, masks.new_ones(masks.shape[0], 1)], 1).double()
    w = locality_weights(masks, width).double()
    gram = z.T @ (w[:, None] * z)
    penalty = torch.eye(z.shape[1], dtype=torch.float64, device=z.device) * ridge
    penalty[-1, -1] = 0.0
    rhs = torch.einsum("bp,b,nbk->npk", z, w, targets.to(solver, torch.float64))
    coef = torch.linalg.solve(gram + penalty, rhs)  # broadcasts over N; the result is strided
    return coef.float().contiguous().to(targets.device)


def fit_local_models(
    model: nn.Module,
    images: Tensor,
    outputs: list[int] | None,
    *,
    num_images: int | None = None,
    num_masks: int = 100,
    grid: int = 4,
    seed: int = 0,
    width: float = 0.25,
    ridge: float = 1e-2,
    cache_dir: Path | None = None,
) -> LocalModelSet:
    """Fit G for ``model`` on a seeded subset of ``images`` (N, C, H, W), on the model's device
    (the images are moved there as they are used; ``index`` stays on theirs).

    Args:
        outputs: the logit indices modelled (the to-be-cloned classes); None = all.
        num_images: size of the subset (default: all images).
        cache_dir: if given, G is cached there as safetensors, keyed by the model's
            state_dict hash, the images and every setting.
    """
    if images.shape[0] == 0:
        raise DataError("no images to fit the local model set on: the clone set is empty")
    n = images.shape[0] if num_images is None else min(num_images, images.shape[0])
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(images.shape[0], generator=gen, device=gen.device)[:n].sort().values.to(images.device)
    device = device_of(model)
    path = None
    if cache_dir is not None:
        key = json.dumps(
            [
                state_dict_sha256(model),
                hashlib.sha256(images[index].cpu().numpy().tobytes()).hexdigest(),
                outputs,
                num_masks,
                grid,
                seed,
                width,
                ridge,
            ]
        )
        path = Path(cache_dir) / f"G-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
        if path.exists():
            return LocalModelSet.load(path, device, images.device)
    masks = occlusion_masks(num_masks, grid, seed, device)
    was_training = model.training
    model.eval()
    targets = perturbed_logits(model, images[index], masks, outputs)
    model.train(was_training)
    g = LocalModelSet(masks, solve_local_models(masks, targets, width, ridge), index)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        g.save(path)
    return g
