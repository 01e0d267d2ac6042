"""The paper's metrics: Ori / Tar / Avg accuracy, per-class accuracy, confusion matrix,
locality similarity (Eq. 9) and inference cost.

Label convention (see :mod:`pnc.zoo.tasks`): a cloned network outputs logits for
``target_classes + clone_classes``; labels ``< num_old`` are original (T_t) classes,
the others cloned (T_s) ones. Every accuracy takes the argmax over *all* outputs.

Devices: a model (nn.Module) runs on its own device, the images (on the CPU, as datasets
are) moved there batch by batch; a plain callable runs on ``device`` if given, else on the
images' device. Logits come back on that device; labels are moved to the logits'.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from pnc.surgery.devices import DeviceLike, device_of
from pnc.surgery.errors import DataError, TaskError
from pnc.surgery.local_models import LocalModelSet, occlusion_masks, perturbed_logits, solve_local_models
from pnc.surgery.tracing import evaluating
from pnc.zoo.images import ImageSet, iter_batches

__all__ = [
    "clone_accuracy",
    "evaluate_clone",
    "logits_of",
    "set_logits",
    "device_for",
    "per_class_accuracy",
    "confusion_matrix",
    "locality_similarity",
    "local_model_set",
    "inference_macs",
]

LogitsFn = Callable[[Tensor], Tensor]


def clone_accuracy(logits: Tensor, labels: Tensor, num_old: int) -> dict[str, float]:
    """logits (N, K), labels (N,) -> ``{"ori", "tar", "avg"}`` accuracies (fractions).

    ``ori``: images with label < num_old; ``tar``: the others; ``avg``: all images pooled.
    A part with no image is ``nan``.
    """
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) != len(labels):
        raise DataError(
            f"clone_accuracy needs logits (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    labels = labels.to(logits.device)
    correct = (logits.argmax(1) == labels).float()
    old = labels < num_old

    def mean(part: Tensor) -> float:
        return float(part.mean()) if part.numel() else float("nan")

    return {"ori": mean(correct[old]), "tar": mean(correct[~old]), "avg": mean(correct)}


def _evaluating(model: nn.Module | LogitsFn) -> contextlib.AbstractContextManager:
    """Eval mode for the block (training flags restored after) for a module; nothing for a function."""
    return evaluating(model) if isinstance(model, nn.Module) else contextlib.nullcontext(model)


def device_for(model: nn.Module | LogitsFn, x: Tensor, device: DeviceLike | None = None) -> torch.device:
    """Where ``model`` runs on ``x``: ``device`` if given, else a module's own device, else x's."""
    if device is not None:
        return torch.device(device)
    return device_of(model) if isinstance(model, nn.Module) else x.device


@torch.no_grad()
def logits_of(
    model: nn.Module | LogitsFn, x: Tensor, batch_size: int = 512, device: DeviceLike | None = None
) -> Tensor:
    """``model`` (an nn.Module, run in eval mode, or any x -> logits callable) on
    x (N, C, H, W) -> logits (N, K), each batch moved to :func:`device_for` ``model``."""
    where = device_for(model, x, device)
    with _evaluating(model):
        return torch.cat([model(xb.to(where)) for xb in x.split(batch_size)])


@torch.no_grad()
def set_logits(
    model: nn.Module | LogitsFn, data: ImageSet, batch_size: int = 512, device: DeviceLike | None = None
) -> Tensor:
    """:func:`logits_of` over an image set -> (N, K); image files are decoded batch by batch."""
    with _evaluating(model):
        return torch.cat([model(xb.to(device_for(model, xb, device))) for xb, _ in iter_batches(data, batch_size)])


def evaluate_clone(
    model: nn.Module | LogitsFn,
    eval_sets: Mapping[str, ImageSet],
    batch_size: int = 512,
    device: DeviceLike | None = None,
) -> dict[str, float]:
    """Ori / Tar / Avg of ``model`` on ``task.eval_sets()``: ``ori`` and ``tar`` are run once each
    (image files streamed) and ``avg`` is their pooled accuracy. -> ``{"ori", "tar", "avg"}``."""
    missing = [k for k in ("ori", "tar") if k not in eval_sets]
    if missing:
        raise TaskError(
            f"evaluate_clone needs eval sets 'ori' and 'tar' (from CloneTask.eval_sets()); missing {missing}"
        )
    ori, tar = eval_sets["ori"], eval_sets["tar"]
    logits = torch.cat([set_logits(model, ori, batch_size, device), set_logits(model, tar, batch_size, device)])
    labels = torch.cat([ori.y, tar.y])
    num_old = int(ori.y.max()) + 1 if len(ori) else 0
    if len(tar) and int(tar.y.min()) < num_old:
        raise TaskError("the 'tar' eval set has labels of original classes; build the sets with CloneTask.eval_sets()")
    return clone_accuracy(logits, labels, num_old)


def confusion_matrix(logits: Tensor, labels: Tensor, num_classes: int | None = None) -> Tensor:
    """(K, K) int64 counts: row = true label, column = predicted (argmax of logits (N, K))."""
    k = num_classes if num_classes is not None else logits.shape[1]
    pred = logits.argmax(1)
    return torch.bincount(labels.to(pred.device) * k + pred, minlength=k * k).view(k, k)


def per_class_accuracy(logits: Tensor, labels: Tensor, num_classes: int | None = None) -> Tensor:
    """(K,) accuracy of each true class (``nan`` for a class without images)."""
    cm = confusion_matrix(logits, labels, num_classes).double()
    return (cm.diagonal() / cm.sum(1)).float()


# --- locality similarity (Eq. 9, after "A Zest of LIME") ---------------------------------


def local_model_set(
    model: nn.Module | LogitsFn,
    outputs: list[int] | None,
    images: Tensor,
    masks: Tensor,
    ridge: float = 1e-6,
    device: DeviceLike | None = None,
) -> LocalModelSet:
    """Zest's local models: for each image (N, C, H, W), plain least squares (no locality
    weight, ``ridge`` ~ 0) from the mask bits (|B|, P) to the model's logits ``outputs``,
    fitted on :func:`device_for` the model (masks and coefficients there)."""
    where = device_for(model, images, device)
    images, masks = images.to(where), masks.to(where)
    with torch.no_grad(), _evaluating(model):
        targets = perturbed_logits(model, images, masks, outputs)
    coef = solve_local_models(masks, targets, width=float("inf"), ridge=ridge)
    return LocalModelSet(masks, coef, torch.arange(len(images), device=where))


def locality_similarity(
    model_a: nn.Module | LogitsFn,
    outputs_a: list[int] | None,
    model_b: nn.Module | LogitsFn,
    outputs_b: list[int] | None,
    images: Tensor,
    num_masks: int = 100,
    grid: int = 4,
    seed: int = 0,
    *,
    images_b: Tensor | None = None,
    device: DeviceLike | None = None,
) -> float:
    """Sim(M_a | D_a, M_b | D_b) = cos(G_a, G_b) (Eq. 9).

    Both local model sets use the same |B| = ``num_masks`` patch masks (a ``grid x grid``
    split, seeded); G_a is fitted on ``images``, G_b on ``images_b`` (default: the same
    images; otherwise as many, paired by position). Each model's logits ``outputs``
    (None = all; both lists of equal length) are modelled; the per-image coefficients
    are concatenated into one signature per model and compared with one cosine. Each model
    runs on :func:`device_for` it (give ``device`` when they are on different devices).
    """
    images_b = images if images_b is None else images_b
    if len(images) == 0 or len(images) != len(images_b):
        raise DataError(
            f"locality_similarity needs the same non-zero number of images for both "
            f"models, got {len(images)} and {len(images_b)}"
        )
    masks = occlusion_masks(num_masks, grid, seed, images.device)
    g_a = local_model_set(model_a, outputs_a, images, masks, device=device)
    g_b = local_model_set(model_b, outputs_b, images_b, masks, device=device)
    if g_a.coef.shape != g_b.coef.shape:
        raise TaskError(
            f"the models give {g_a.coef.shape[-1]} and {g_b.coef.shape[-1]} modelled outputs; "
            "pass output lists of equal length"
        )
    return g_a.similarity(g_b)


# --- inference cost ----------------------------------------------------------------------


@torch.no_grad()
def inference_macs(model: nn.Module | LogitsFn, example: Tensor, device: DeviceLike | None = None) -> int:
    """Multiply-accumulates of one forward pass on one image (example (B, C, H, W); row 0 is
    used, on :func:`device_for` the model): torch's FlopCounterMode (convolutions and matrix
    products) divided by two."""
    counter = FlopCounterMode(display=False)
    x = example[:1].to(device_for(model, example, device))
    with counter, _evaluating(model):
        model(x)
    return counter.get_total_flops() // 2
