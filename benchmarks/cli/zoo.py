"""``pnc zoo {train,list,show,verify,pretrain-defaults}``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from rich.console import Console
from rich.table import Table

from pnc.surgery.errors import DataError, ModelNotFoundError, OutputError, StoreError
from pnc.zoo.checkpoints import export_model, import_model
from pnc.zoo.datasets import DEFAULT_IMAGE_SIZE, IMAGEFOLDER_PREFIX, list_datasets
from pnc.zoo.store import ModelCard, ZooStore

from .common import (
    add_data_dir,
    add_device,
    add_force,
    add_zoo_dir,
    check_input_file,
    check_output_dir,
    check_output_file,
    in_range,
    input_size,
    json_object,
    seed_number,
)


def writable_zoo(zoo_dir: str | None) -> ZooStore:
    """The zoo store, if its folder exists or can be created and is writable (OutputError)."""
    store = ZooStore(zoo_dir)
    check_output_dir(store.root, "the zoo folder (--zoo-dir or $PNC_ZOO_DIR)")
    return store


def _check_new_model(store: ZooStore, name: str, force: bool) -> None:
    """Refuse to replace an existing zoo model without --force (its patches would go stale)."""
    folder = store.path(name)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file; remove it or choose another --name")
    if store.exists(name) and not force:
        raise OutputError(
            f"zoo model {name!r} already exists in {store.root}; `pnc zoo train ... --force` "
            "replaces it (the .pnc patches made on it will then be refused), or choose another --name"
        )


def _check_buildable(arch: str, kwargs: dict, input_size: tuple[int, int, int]) -> None:
    """Build ``arch(**kwargs)`` once and run it on zeros, so bad --arch-kwargs fail before training."""
    import torch

    from pnc.surgery.devices import device_of
    from pnc.zoo import archs

    try:
        with torch.no_grad():
            model = archs.create(arch, **kwargs).eval()
            model(torch.zeros(2, *input_size, device=device_of(model)))
    except ModelNotFoundError:
        raise
    except (TypeError, ValueError, RuntimeError, AssertionError, IndexError, KeyError) as err:
        raise ModelNotFoundError(
            f"cannot build and run {arch}({kwargs}) on {input_size} images: {err}; check --arch-kwargs"
        ) from None


def _cmd_train(args: argparse.Namespace) -> int:
    from pnc.zoo import archs
    from pnc.zoo.datasets import load_dataset
    from pnc.zoo.tasks import parse_classes
    from pnc.zoo.train import train_zoo_model

    store = writable_zoo(args.zoo_dir)
    _check_new_model(store, args.name, args.force)
    if args.image_size is not None and not args.dataset.startswith(IMAGEFOLDER_PREFIX):
        raise DataError(
            f"--image-size applies to {IMAGEFOLDER_PREFIX}PATH datasets only; {args.dataset} images keep "
            "their own size: drop --image-size"
        )
    splits = load_dataset(
        args.dataset, args.data_dir, download=args.download, image_size=args.image_size or DEFAULT_IMAGE_SIZE
    )
    ids = parse_classes(args.classes, splits.classes)
    kwargs = {**archs.input_kwargs(args.arch, splits.input_size), **(args.arch_kwargs or {}), "num_classes": len(ids)}
    _check_buildable(args.arch, kwargs, splits.input_size)
    card = train_zoo_model(
        store,
        args.name,
        args.arch,
        splits,
        args.classes,
        args.epochs,
        args.lr,
        args.seed,
        arch_kwargs=args.arch_kwargs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        augment=args.augment,
        validation=args.validation,
        device=args.device,
    )
    print(
        f"{card.name}: {card.arch} on {card.dataset} classes {card.classes}, test accuracy "
        f"{card.test_accuracy:.4f}, {card.recipe['train_seconds']:.1f} s -> {store.path(card.name)}"
    )
    return 0


def _cards(store: ZooStore) -> tuple[list[ModelCard], dict[str, str]]:
    """(the readable cards, name -> reason of each broken one): one bad card breaks only itself."""
    _check_zoo_folder(store)
    broken = store.broken()
    return [store.card(n) for n in store.names() if n not in broken], broken


def _check_zoo_folder(store: ZooStore) -> None:
    if store.root.exists() and not store.root.is_dir():
        raise StoreError(f"the zoo folder {store.root} is a file; point --zoo-dir or $PNC_ZOO_DIR at a folder")


def _report_broken(broken: dict[str, str]) -> None:
    for name, reason in broken.items():
        print(f"BROKEN {name}: {reason}", file=sys.stderr)


def _cmd_list(args: argparse.Namespace) -> int:
    store = ZooStore(args.zoo_dir)
    cards, broken = _cards(store)
    if args.json:
        print(
            json.dumps(
                [dataclasses.asdict(c) for c in cards]
                + [{"name": n, "broken": reason} for n, reason in broken.items()],
                indent=2,
            )
        )
        _report_broken(broken)
        return 0
    if not cards and not broken:
        print(f"no models in {store.root}; run `pnc zoo pretrain-defaults` or `pnc zoo train`")
        return 0
    table = Table(title=f"zoo: {store.root}")
    for col in ("name", "arch", "dataset", "classes", "validation", "test acc", "sha256"):
        table.add_column(col)
    for c in cards:
        validation = c.recipe.get("validation", 0.0)
        table.add_row(
            c.name,
            c.arch,
            c.dataset,
            ",".join(map(str, c.classes)),
            f"{validation:g}" if validation else "-",
            f"{c.test_accuracy:.4f}",
            c.sha256[:12],
        )
    for name in broken:
        table.add_row(name, "BROKEN card (see below)", "", "", "", "", "")
    Console().print(table)
    _report_broken(broken)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    store = ZooStore(args.zoo_dir)
    card = store.card(args.name)
    if not card.state_dict_sha256:  # a card from before pnc recorded it: compute it from the weights
        from pnc.surgery.io import state_dict_sha256

        card.state_dict_sha256 = state_dict_sha256(store.load(args.name)[0])
    if args.json:
        print(card.to_json())
        return 0
    for key, value in dataclasses.asdict(card).items():
        print(f"{key:>14}: {value}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    store = ZooStore(args.zoo_dir)
    _check_zoo_folder(store)
    names = [args.name] if args.name else store.names()
    if not names:
        raise StoreError(f"no models in {store.root} to verify; run `pnc zoo pretrain-defaults`")
    if args.name:
        store.card(args.name)  # an unknown or broken model named on the command line: one error line
    broken = store.broken() if not args.name else {}
    bad = [n for n in names if n not in broken and not store.verify(n)]
    for name in names:
        print(f"{'BROKEN' if name in broken else 'MISMATCH' if name in bad else 'ok':>8}  {name}")
    if bad:
        print(
            f"{len(bad)} model(s) whose weights do not match their card's sha256; retrain them "
            "with `pnc zoo train --force` or `pnc zoo pretrain-defaults`"
        )
    _report_broken(broken)
    return 1 if bad or broken else 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from pnc.zoo.defaults import pretrain_defaults

    store = writable_zoo(args.zoo_dir)
    cards = pretrain_defaults(store, args.data_dir, only=args.only, device=args.device)
    for card in cards:
        print(
            f"{card.name:>24}: test accuracy {card.test_accuracy:.4f} ({card.recipe['train_seconds']:.1f} s training)"
        )
    if not cards:
        raise DataError("no default model could be built: their data is missing (see above)")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    store = writable_zoo(args.zoo_dir)
    _check_new_model(store, args.name, args.force)
    check_input_file(args.weights, "a weights file", "give FILE.safetensors or a .pt/.pth state dict", StoreError)
    card = import_model(
        store,
        args.name,
        args.arch,
        args.weights,
        args.dataset,
        args.classes,
        input_size=args.input_size,
        arch_kwargs=args.arch_kwargs,
        data_dir=args.data_dir,
        force=args.force,
    )
    print(
        f"{card.name}: {card.arch} on {card.dataset} classes {card.classes} loads strictly and runs; test accuracy "
        f"{card.test_accuracy:.4f} -> {store.path(card.name)}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    out = check_output_file(args.out)
    size = export_model(ZooStore(args.zoo_dir), args.name, out)
    print(f"{args.out}: {size:,} bytes, weights + card (use it as MODEL: `pnc cuts {args.out}`)")
    return 0


def _add_import_export(cmds: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``import`` and ``export`` to ``pnc zoo``."""
    imp = cmds.add_parser(
        "import",
        parents=[common],
        help="register a model trained elsewhere (timm names too)",
        description="Build ARCH with one output per class, load WEIGHTS strictly "
        "(.safetensors, or a .pt/.pth state dict read with weights_only=True), run it, "
        "measure its accuracy and save it in the zoo.",
    )
    imp.add_argument("name", help="zoo name for it")
    imp.add_argument("--arch", required=True, help="lenet5, cnn4, resnetc20 or any timm model name")
    imp.add_argument("--weights", required=True, help="FILE.safetensors (or a .pt/.pth state dict)")
    imp.add_argument("--dataset", required=True, help=f"{', '.join(list_datasets())} or imagefolder:PATH")
    imp.add_argument("--classes", required=True, help='its output classes in order: "0-4", "5,7,9", names')
    imp.add_argument("--input-size", type=input_size, help="C,H,W (default and only: the dataset's)")
    imp.add_argument("--arch-kwargs", type=json_object, help="extra constructor kwargs as JSON")
    add_force(imp, "a zoo model of the same name")
    add_data_dir(imp)
    imp.set_defaults(func=_cmd_import)

    exp = cmds.add_parser("export", parents=[common], help="write a zoo model as one self-describing safetensors file")
    exp.add_argument("name")
    exp.add_argument("--out", required=True, help="FILE.safetensors")
    exp.set_defaults(func=_cmd_export)


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``pnc zoo ...`` to the ``pnc`` command."""
    from pnc.zoo.defaults import DEFAULTS

    zoo = sub.add_parser("zoo", help="train, import, export, list and verify zoo models")
    cmds = zoo.add_subparsers(dest="zoo_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_zoo_dir(common)

    train = cmds.add_parser("train", parents=[common], help="train a model on some classes of a dataset")
    train.add_argument("--arch", required=True, help="lenet5, cnn4, resnetc20 or any timm model name")
    train.add_argument("--dataset", required=True, help=f"{', '.join(list_datasets())} or imagefolder:PATH")
    train.add_argument("--classes", required=True, help='class ids or names: "0-4", "5,7,9", "Sandal,Bag"')
    train.add_argument("--name", required=True, help="zoo model name")
    train.add_argument("--epochs", type=in_range(int, 1, 10_000), default=10)
    train.add_argument("--lr", type=in_range(float, 0.0, 10.0, low_open=True), default=0.05)
    train.add_argument("--seed", type=seed_number, default=0)
    train.add_argument("--batch-size", type=in_range(int, 1, 65_536), default=128)
    train.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    train.add_argument("--augment", action="store_true", help="random translations")
    train.add_argument(
        "--validation",
        type=in_range(float, 0.0, 0.5),
        default=0.0,
        help="share of each class's training images never trained on (the same seeded rows for every "
        "model of the dataset); `pnc clone` between two models trained with the same share chooses R on "
        "them (default 0: train on every image)",
    )
    train.add_argument(
        "--image-size",
        type=in_range(int, 4, 4096),
        default=None,
        help=f"side in pixels that {IMAGEFOLDER_PREFIX}PATH images are resized to (default {DEFAULT_IMAGE_SIZE}); "
        "the images are decoded on demand, never all at once",
    )
    train.add_argument(
        "--arch-kwargs", type=json_object, default=None, help="extra constructor kwargs as JSON, e.g. '{\"width\": 16}'"
    )
    add_data_dir(train)
    train.add_argument("--download", action="store_true", help="download the dataset if missing")
    add_force(train, "an existing zoo model of that name (its .pnc patches will no longer load)")
    add_device(train, "train")
    train.set_defaults(func=_cmd_train)

    lst = cmds.add_parser("list", parents=[common], help="list the zoo's models")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_cmd_list)

    show = cmds.add_parser("show", parents=[common], help="print a model's card")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_cmd_show)

    verify = cmds.add_parser(
        "verify", parents=[common], help="re-hash weights against their cards (exit 1 on a mismatch)"
    )
    verify.add_argument("name", nargs="?")
    verify.set_defaults(func=_cmd_verify)

    pre = cmds.add_parser(
        "pretrain-defaults", parents=[common], help="train (or reuse) the default target/source pairs"
    )
    pre.add_argument(
        "--only", nargs="+", choices=list(DEFAULTS), metavar="NAME", help=f"only these: {', '.join(DEFAULTS)}"
    )
    add_data_dir(pre)
    add_device(pre, "train")
    pre.set_defaults(func=_cmd_pretrain)
    _add_import_export(cmds, common)
