"""``pnc zoo import`` and ``pnc zoo export``: models trained elsewhere, in and out of the zoo."""
from __future__ import annotations

import argparse
from pathlib import Path

from pnc.zoo.checkpoints import export_model, import_model
from pnc.zoo.datasets import list_datasets
from pnc.zoo.store import ZooStore

from .common import add_data_dir, input_size, json_object


def _cmd_import(args: argparse.Namespace) -> int:
    store = ZooStore(args.zoo_dir)
    card = import_model(store, args.name, args.arch, args.weights, args.dataset, args.classes,
                        input_size=args.input_size, arch_kwargs=args.arch_kwargs, data_dir=args.data_dir,
                        force=args.force)
    print(f"{card.name}: {card.arch} on {card.dataset} classes {card.classes} loads strictly and runs; test accuracy "
          f"{card.test_accuracy:.4f} -> {store.path(card.name)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    size = export_model(ZooStore(args.zoo_dir), args.name, Path(args.out))
    print(f"{args.out}: {size:,} bytes, weights + card (use it as MODEL: `pnc cuts {args.out}`)")
    return 0


def add_commands(cmds: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``import`` and ``export`` to ``pnc zoo``."""
    imp = cmds.add_parser("import", parents=[common], help="register a model trained elsewhere (timm names too)",
                          description="Build ARCH with one output per class, load WEIGHTS strictly "
                                      "(.safetensors, or a .pt/.pth state dict read with weights_only=True), run it, "
                                      "measure its accuracy and save it in the zoo.")
    imp.add_argument("name", help="zoo name for it")
    imp.add_argument("--arch", required=True, help="lenet5, cnn4, resnetc20 or any timm model name")
    imp.add_argument("--weights", required=True, help="FILE.safetensors (or a .pt/.pth state dict)")
    imp.add_argument("--dataset", required=True, help=f"{', '.join(list_datasets())} or imagefolder:PATH")
    imp.add_argument("--classes", required=True, help='its output classes in order: "0-4", "5,7,9", names')
    imp.add_argument("--input-size", type=input_size, help="C,H,W (default and only: the dataset's)")
    imp.add_argument("--arch-kwargs", type=json_object, help='extra constructor kwargs as JSON')
    imp.add_argument("--force", action="store_true", help="replace a zoo model of the same name")
    add_data_dir(imp)
    imp.set_defaults(func=_cmd_import)

    exp = cmds.add_parser("export", parents=[common], help="write a zoo model as one self-describing safetensors file")
    exp.add_argument("name")
    exp.add_argument("--out", required=True, help="FILE.safetensors")
    exp.set_defaults(func=_cmd_export)
