"""``pnc zoo {train,list,show,verify,pretrain-defaults}``."""
from __future__ import annotations

import argparse
import dataclasses
import json

from rich.console import Console
from rich.table import Table

from pnc.surgery.errors import DataError, StoreError
from pnc.zoo.datasets import list_datasets
from pnc.zoo.store import ZooStore

from . import zoo_io
from .common import add_data_dir, add_zoo_dir, json_object, positive


def _cmd_train(args: argparse.Namespace) -> int:
    from pnc.zoo.datasets import load_dataset
    from pnc.zoo.train import train_zoo_model

    store = ZooStore(args.zoo_dir)
    splits = load_dataset(args.dataset, args.data_dir, download=args.download)
    card = train_zoo_model(store, args.name, args.arch, splits, args.classes, args.epochs, args.lr,
                           args.seed, arch_kwargs=args.arch_kwargs, batch_size=args.batch_size,
                           optimizer=args.optimizer, augment=args.augment)
    print(f"{card.name}: {card.arch} on {card.dataset} classes {card.classes}, test accuracy "
          f"{card.test_accuracy:.4f}, {card.recipe['train_seconds']:.1f} s -> {store.path(card.name)}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    store = ZooStore(args.zoo_dir)
    cards = [store.card(n) for n in store.names()]
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in cards], indent=2))
        return 0
    if not cards:
        print(f"no models in {store.root}; run `pnc zoo pretrain-defaults` or `pnc zoo train`")
        return 0
    table = Table(title=f"zoo: {store.root}")
    for col in ("name", "arch", "dataset", "classes", "test acc", "sha256"):
        table.add_column(col)
    for c in cards:
        table.add_row(c.name, c.arch, c.dataset, ",".join(map(str, c.classes)),
                      f"{c.test_accuracy:.4f}", c.sha256[:12])
    Console().print(table)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    card = ZooStore(args.zoo_dir).card(args.name)
    if args.json:
        print(card.to_json())
        return 0
    for key, value in dataclasses.asdict(card).items():
        print(f"{key:>14}: {value}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    store = ZooStore(args.zoo_dir)
    names = [args.name] if args.name else store.names()
    if not names:
        raise StoreError(f"no models in {store.root} to verify; run `pnc zoo pretrain-defaults`")
    bad = [n for n in names if not store.verify(n)]
    for name in names:
        print(f"{'MISMATCH' if name in bad else 'ok':>8}  {name}")
    if bad:
        print(f"{len(bad)} model(s) whose weights do not match their card's sha256; retrain them "
              "with `pnc zoo train` or `pnc zoo pretrain-defaults`")
    return 1 if bad else 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from pnc.zoo.defaults import pretrain_defaults

    store = ZooStore(args.zoo_dir)
    cards = pretrain_defaults(store, args.data_dir, only=args.only)
    for card in cards:
        print(f"{card.name:>24}: test accuracy {card.test_accuracy:.4f} "
              f"({card.recipe['train_seconds']:.1f} s training)")
    if not cards:
        raise DataError("no default model could be built: their data is missing (see above)")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``pnc zoo ...`` to the ``pnc`` command."""
    from pnc.zoo.defaults import DEFAULTS

    zoo = sub.add_parser("zoo", help="train, import, export, list and verify zoo models")
    cmds = zoo.add_subparsers(dest="zoo_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_zoo_dir(common)

    train = cmds.add_parser("train", parents=[common], help="train a model on some classes of a dataset")
    train.add_argument("--arch", required=True, help="lenet5, cnn4, resnetc20 or any timm model name")
    train.add_argument("--dataset", required=True,
                       help=f"{', '.join(list_datasets())} or imagefolder:PATH")
    train.add_argument("--classes", required=True, help='class ids or names: "0-4", "5,7,9", "Sandal,Bag"')
    train.add_argument("--name", required=True, help="zoo model name")
    train.add_argument("--epochs", type=positive(int), default=10)
    train.add_argument("--lr", type=positive(float), default=0.05)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--batch-size", type=positive(int), default=128)
    train.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    train.add_argument("--augment", action="store_true", help="random translations")
    train.add_argument("--arch-kwargs", type=json_object, default=None,
                       help='extra constructor kwargs as JSON, e.g. \'{"width": 16}\'')
    add_data_dir(train)
    train.add_argument("--download", action="store_true", help="download the dataset if missing")
    train.set_defaults(func=_cmd_train)

    lst = cmds.add_parser("list", parents=[common], help="list the zoo's models")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_cmd_list)

    show = cmds.add_parser("show", parents=[common], help="print a model's card")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_cmd_show)

    verify = cmds.add_parser("verify", parents=[common],
                             help="re-hash weights against their cards (exit 1 on a mismatch)")
    verify.add_argument("name", nargs="?")
    verify.set_defaults(func=_cmd_verify)

    pre = cmds.add_parser("pretrain-defaults", parents=[common],
                          help="train (or reuse) the default target/source pairs")
    pre.add_argument("--only", nargs="+", choices=list(DEFAULTS), metavar="NAME",
                     help=f"only these: {', '.join(DEFAULTS)}")
    add_data_dir(pre)
    pre.set_defaults(func=_cmd_pretrain)
    zoo_io.add_commands(cmds, common)
