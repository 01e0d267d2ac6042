"""Seeded, resumable training of small classifiers, evaluation, and zoo model training.

``fit`` runs minibatch SGD (Nesterov momentum 0.9, weight decay 5e-4, cosine learning
rate per step) or AdamW. Every epoch draws its shuffling and its global RNG state
(dropout, augmentation) from ``(seed, epoch)``, and the learning rate is a function of
the step, so the only state to checkpoint is the weights and the optimizer buffers:
an interrupted run resumed from its checkpoint ends with the same weights as an
uninterrupted one.

Training and evaluation run on the model's device: the data stay on the CPU and each
batch is moved there as it is used; shuffling and augmentation are drawn on the CPU, so a
seed picks the same batches on every device.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from pnc.surgery.devices import DeviceLike, device_of
from pnc.surgery.errors import DataError, PncError, StoreError, TrainingError, require_finite_images
from pnc.surgery.io import atomic_write_bytes, atomic_write_text
from pnc.surgery.tuning import augment
from pnc.zoo import archs
from pnc.zoo.datasets import DatasetSplits, ImageData, load_dataset
from pnc.zoo.images import ImageFiles, ImageSet, decode_cache_bytes, iter_batches
from pnc.zoo.store import ModelCard, ZooStore
from pnc.zoo.tasks import parse_classes, select_classes, validation_rows

__all__ = ["fit", "evaluate", "predict_logits", "train_zoo_model", "OPTIMIZERS", "STATE_FILE"]

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
#: optimizer name -> (factory(params, lr, weight_decay), its recorded hyper-parameters)
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (
        lambda p, lr, wd: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd),
        {"momentum": 0.9, "nesterov": True},
    ),
    "adamw": (lambda p, lr, wd: torch.optim.AdamW(p, lr=lr, weight_decay=wd), {"betas": [0.9, 0.999]}),
}
STATE_FILE = "state.json"


def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def _translate(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random translation by up to H/8 pixels (zero = mean padding): (N, C, H, W) -> same."""
    return augment(x, max(1, x.shape[2] // 8), False, gen, pad="constant")


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[Tensor]:
    """Shuffled index batches; the last partial batch is dropped unless it is the only one."""
    order = torch.randperm(n, generator=gen, device=gen.device)
    full = n // batch_size
    if full == 0:
        return [order]
    return list(order[: full * batch_size].split(batch_size))


# --- checkpoints: <dir>/epoch-NNNN.safetensors (model + optimizer tensors) + state.json ---


def _save_checkpoint(
    folder: Path, epoch: int, config: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    weights = f"epoch-{epoch:04d}.safetensors"
    atomic_write_bytes(folder / weights, save(tensors))
    atomic_write_text(
        folder / STATE_FILE,
        json.dumps({"epoch": epoch, "weights": weights, "config": config, "optimizer_scalars": scalars}, indent=2),
    )
    for old in folder.glob("epoch-*.safetensors"):
        if old.name != weights:
            old.unlink()


def _load_checkpoint(
    folder: Path, config: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, console
) -> int:
    """Restore model and optimizer from ``folder``; returns the number of finished epochs."""
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        return 0
    try:
        state = json.loads(state_path.read_text())
        if state["config"] != config:
            changed = sorted(k for k in set(config) | set(state["config"]) if config.get(k) != state["config"].get(k))
            console.print(
                f"[yellow]checkpoint {folder} is from a run with other settings "
                f"({', '.join(changed)}); starting over[/]"
            )
            return 0
        tensors = load_file(folder / state["weights"])
    except (OSError, json.JSONDecodeError, KeyError, SafetensorError) as err:
        raise StoreError(
            f"training checkpoint {folder} is unreadable ({err}); delete the folder to start the run over"
        ) from err
    model.load_state_dict({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")})
    optim_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            optim_state.setdefault(int(idx), {})[name] = value
    for idx, values in state["optimizer_scalars"].items():
        optim_state.setdefault(int(idx), {}).update(values)
    full = optimizer.state_dict()
    full["state"] = optim_state
    optimizer.load_state_dict(full)
    return int(state["epoch"])


def fit(
    model: nn.Module,
    data: ImageSet,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 128,
    checkpoint: Path | str | None = None,
    augment: bool = False,
    loss_fn: LossFn | None = None,
    params: Iterable[nn.Parameter] | None = None,
    progress: bool = True,
    desc: str = "train",
    optimizer: str = "sgd",
    weight_decay: float = 5e-4,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place on ``data`` (x: (N, C, H, W), y: (N,)) and return it in eval mode.

    Image files (:class:`ImageFiles`) are decoded once and kept when they fit in
    ``$PNC_DECODE_CACHE_MB``, else decoded batch by batch every epoch (DataLoader workers);
    the batches, and so the weights, are the same either way.
    It trains on the model's device (``model.to(device)`` first), each batch moved there;
    ``loss_fn(model, x, y) -> scalar`` (x, y on that device) replaces cross-entropy on ``model(x)``; ``params``
    restricts what is optimized (default: every parameter that requires grad). With
    ``checkpoint`` (a folder) the run saves after each epoch and resumes from there.
    ``on_epoch_end(epoch, mean_loss)`` runs after each epoch's checkpoint.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if optimizer not in OPTIMIZERS:
        raise PncError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if len(data) == 0:
        raise DataError("cannot train on an empty dataset; check the class list")
    if isinstance(data, ImageFiles) and data.nbytes <= decode_cache_bytes():
        data = data.load(f"{desc}: decoding")
    if isinstance(data, ImageData):  # decoded files are finite by construction (uint8 pixels)
        require_finite_images(data.x, f"{desc}: the training data")
    loss_fn = loss_fn or _cross_entropy
    trainable = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = OPTIMIZERS[optimizer][0](trainable, lr, weight_decay)
    config = {
        "epochs": epochs,
        "lr": lr,
        "seed": seed,
        "batch_size": batch_size,
        "augment": augment,
        "optimizer": optimizer,
        "weight_decay": weight_decay,
        "samples": len(data),
    }
    console = Console(stderr=True)
    folder = Path(checkpoint) if checkpoint is not None else None
    start = _load_checkpoint(folder, config, model, opt, console) if folder else 0
    steps_per_epoch = max(1, len(data) // batch_size)
    total = max(1, epochs * steps_per_epoch)

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task(desc, total=total, completed=start * steps_per_epoch, loss=float("nan"))
        for epoch in range(start, epochs):
            kept = (
                f"the checkpoint of epoch {epoch} in {folder} is kept and a rerun resumes from it"
                if folder is not None and epoch > 0
                else "nothing was saved"
            )

            def tick(mean_loss: float, epoch: int = epoch) -> None:
                bar.update(task, advance=1, loss=mean_loss, description=f"{desc} epoch {epoch + 1}/{epochs}")

            mean_loss = _train_epoch(
                model,
                data,
                opt,
                loss_fn,
                epoch=epoch,
                seed=seed,
                lr=lr,
                batch_size=batch_size,
                steps_per_epoch=steps_per_epoch,
                total=total,
                augment=augment,
                tick=tick,
                where=f"{desc}: ",
                kept=kept,
            )
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                raise TrainingError(
                    f"{desc}: the weights became NaN or Inf in epoch {epoch + 1} (the loss stayed finite); "
                    f"lower the learning rate (--lr); {kept}"
                )
            if folder is not None:
                _save_checkpoint(folder, epoch + 1, config, model, opt)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, mean_loss)
    return model.eval()


def _epoch_batches(data: ImageSet, order: list[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, y) for each index batch of ``order``: by indexing tensors, or decoding files."""
    if isinstance(data, ImageData):
        return ((data.x[index], data.y[index]) for index in order)
    return data.batches(order=order)


def _train_epoch(
    model: nn.Module,
    data: ImageSet,
    opt: torch.optim.Optimizer,
    loss_fn: LossFn,
    *,
    epoch: int,
    seed: int,
    lr: float,
    batch_size: int,
    steps_per_epoch: int,
    total: int,
    augment: bool,
    tick: Callable[[float], None],
    where: str = "",
    kept: str = "nothing was saved",
) -> float:
    """One seeded pass over ``data`` with a cosine learning rate per step; the mean loss.
    A non-finite loss stops it with a TrainingError (``where`` prefixes it, ``kept`` ends it)."""
    model.train()
    device = device_of(model)
    gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    running, count = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_epoch_seed(seed, epoch))
        for i, (x, y) in enumerate(_epoch_batches(data, _batches(len(data), batch_size, gen))):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total))
            if augment:
                x = _translate(x, gen)
            loss = loss_fn(model, x.to(device), y.to(device))
            if not bool(torch.isfinite(loss).all()):
                raise TrainingError(
                    f"{where}the loss became {float(loss.detach().reshape(-1)[0])} at epoch {epoch + 1}, step "
                    f"{i + 1}; lower the learning rate (--lr) or check the data and the loss; {kept}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach()) * len(y)
            count += len(y)
            tick(running / count)
    return running / count


@torch.no_grad()
def predict_logits(model: nn.Module, data: ImageSet, batch_size: int = 512) -> Tensor:
    """Logits (N, num_outputs) of ``model`` in eval mode, on its device (the batches, image
    files streamed, are moved there); its train/eval mode is restored."""
    was_training = model.training
    device = device_of(model)
    model.eval()
    try:
        return torch.cat([model(x.to(device)) for x, _ in iter_batches(data, batch_size)])
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 512) -> float:
    """Top-1 accuracy (a fraction) of ``model`` on ``data`` (image files streamed)."""
    if len(data) == 0:
        raise DataError("cannot evaluate on an empty dataset; check the class list")
    predicted = predict_logits(model, data, batch_size).argmax(dim=1)
    return float((predicted == data.y.to(predicted.device)).float().mean())


def measured_card(
    model: nn.Module,
    name: str,
    arch: str,
    kwargs: dict[str, Any],
    splits: DatasetSplits,
    class_ids: list[int],
    recipe: dict[str, Any],
) -> ModelCard:
    """The card of ``model`` (outputs = ``class_ids`` of ``splits``), with its accuracy on
    those classes' test images."""
    accuracy = evaluate(model, select_classes(splits.test, class_ids))
    return ModelCard(
        name=name,
        arch=arch,
        kwargs=kwargs,
        dataset=splits.name,
        classes=class_ids,
        class_names=[splits.classes[c] for c in class_ids],
        mean=splits.mean,
        std=splits.std,
        input_size=splits.input_size,
        test_accuracy=round(accuracy, 6),
        recipe=recipe,
    )


def train_zoo_model(
    store: ZooStore,
    name: str,
    arch: str,
    dataset: str | DatasetSplits,
    classes: str | Sequence[int | str],
    epochs: int,
    lr: float,
    seed: int,
    data_dir: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    *,
    batch_size: int = 128,
    optimizer: str = "sgd",
    weight_decay: float = 5e-4,
    augment: bool = False,
    validation: float = 0.0,
    progress: bool = True,
    device: DeviceLike | None = None,
) -> ModelCard:
    """Build ``arch`` (initialized from ``seed`` on the CPU: the same weights for every device)
    with one output per class of ``classes``, train it on ``device`` (default: torch's default
    device) on those classes' training images (checkpoints under ``<zoo>/<name>/.ckpt``,
    removed when done), test it on their test images, and save it with its card.

    ``validation``: the share of each class's training images left out
    (:func:`~pnc.zoo.tasks.validation_rows`, recorded in the card's recipe), on which a
    clone between two models trained without the same share chooses R."""
    splits = dataset if isinstance(dataset, DatasetSplits) else load_dataset(dataset, data_dir)
    class_ids = parse_classes(classes, splits.classes)
    kept = validation_rows(splits.train, validation)[0] if validation else None
    train = select_classes(splits.train, class_ids, among=kept)
    kwargs = {**archs.input_kwargs(arch, splits.input_size), **(arch_kwargs or {}), "num_classes": len(class_ids)}
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        model = archs.create(arch, **kwargs)
    model.to(device if device is not None else torch.get_default_device())
    ckpt = store.path(name) / ".ckpt"
    began = time.perf_counter()
    fit(
        model,
        train,
        epochs=epochs,
        lr=lr,
        seed=seed,
        batch_size=batch_size,
        checkpoint=ckpt,
        augment=augment,
        optimizer=optimizer,
        weight_decay=weight_decay,
        progress=progress,
        desc=name,
    )
    seconds = time.perf_counter() - began
    card = measured_card(
        model,
        name,
        arch,
        kwargs,
        splits,
        class_ids,
        recipe={
            "epochs": epochs,
            "lr": lr,
            "seed": seed,
            "batch_size": batch_size,
            "optimizer": optimizer,
            **OPTIMIZERS[optimizer][1],
            "weight_decay": weight_decay,
            "schedule": "cosine per step",
            "augment": augment,
            "loss": "cross_entropy",
            "train_images": len(train.y),
            **({"validation": validation} if validation else {}),
            "train_seconds": round(seconds, 2),
        },
    )
    store.save(name, model, card)
    shutil.rmtree(ckpt, ignore_errors=True)
    return card
