"""``pnc bench {paper,...}``: the paper's tables and figures on the data this machine has.

The work lives in :mod:`pnc.bench.paper` and its siblings; this module only parses flags.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pnc.surgery.errors import TaskError

from .common import (
    add_backend,
    add_data_dir,
    add_device,
    add_old_fraction,
    add_zoo_dir,
    check_backend,
    check_output_dir,
    in_range,
    seed_number,
)
from .zoo import writable_zoo


def _csv(kind, choices=None):  # type: ignore[no-untyped-def]
    """An argparse type: a comma-separated list of ``kind(item)`` (an argparse type or a
    builtin), each in ``choices`` when given, no item twice."""

    def parse(text: str) -> list:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}: {err}") from None
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        unknown = [v for v in values if choices is not None and v not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(map(str, choices))}"
            )
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise argparse.ArgumentTypeError(f"{', '.join(twice)} given twice; list each once")
        return values

    return parse


def _check(args: argparse.Namespace, default_pair_of: tuple[str, str] | None) -> None:
    """Everything a benchmark needs, before it trains or writes: writable --out, --workdir and zoo;
    a dataset that loads and has a default zoo pair for the architecture."""
    check_output_dir(Path(args.out), "--out")
    if args.workdir is not None:
        check_output_dir(args.workdir, "--workdir")
    writable_zoo(args.zoo_dir)
    if default_pair_of is not None:
        from pnc.zoo.datasets import load_dataset
        from pnc.zoo.defaults import default_pair

        dataset, arch = default_pair_of
        default_pair(load_dataset(dataset, args.data_dir).name, arch)


def _command() -> str:
    return "pnc " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _default_pair_of(args: argparse.Namespace) -> tuple[str, str]:
    """(dataset, arch) of the default zoo pair the flags name: Fashion-MNIST LeNet-5, or digits
    CNN4 with --quick."""
    return args.dataset or ("digits" if args.quick else "fashion-mnist"), args.arch or (
        "cnn4" if args.quick else "lenet5"
    )


def _run_options(args: argparse.Namespace) -> dict:
    """The keyword arguments every ``run_*`` benchmark takes from the shared flags."""
    return {
        "quick": args.quick,
        "zoo_dir": args.zoo_dir,
        "data_dir": args.data_dir,
        "out_dir": Path(args.out),
        "workdir": args.workdir,
        "fresh": args.fresh,
        "command": _command(),
        "device": args.device,
    }


def _cmd_paper(args: argparse.Namespace) -> int:
    from pnc.bench.baselines import METHODS
    from pnc.bench.paper import run_paper

    check_backend(args.backend, args.address)
    methods = args.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise TaskError(f"unknown methods {unknown}; choose from {', '.join(repr(m) for m in METHODS)}")
    pair = None
    if args.target or args.source:
        if not (args.target and args.source) or args.dataset or args.arch:
            raise TaskError(
                "give --target NAME and --source NAME together (zoo models; their cards name the "
                "dataset), or --dataset/--arch for a default pair"
            )
        store = writable_zoo(args.zoo_dir)
        pair = (args.target, args.source)
        store.card(args.target), store.card(args.source)  # both exist and read (StoreError otherwise)
    dataset, arch = _default_pair_of(args)
    scales = args.scales or (["S"] if args.quick else ["S", "M"])
    bad = [s for s in scales if s not in ("S", "M")]
    if bad:
        raise TaskError(f"unknown scales {bad}; use S and/or M (--scales S,M)")
    _check(args, (dataset, arch) if pair is None else None)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    result = run_paper(
        dataset,
        arch,
        scales=scales,
        seeds=seeds,
        methods=methods,
        old_fraction=args.old_fraction,
        pair=pair,
        backend=args.backend,
        address=args.address,
        **_run_options(args),
    )
    stem = Path(args.out) / result["stem"]
    print(f"wrote {stem}.md and {stem}.json")
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:
    from pnc.bench.figures import run_figures

    dataset, arch = _default_pair_of(args)
    _check(args, (dataset, arch))
    path = run_figures(dataset, arch, figures=args.figures, seed=(args.seeds or [0])[0], **_run_options(args))
    print(f"wrote {path} and its plots")
    return 0


def _cmd_hetero(args: argparse.Namespace) -> int:
    from pnc.bench.hetero import HETERO_METHODS, run_hetero

    _check(args, None)
    results = run_hetero(
        args.pairs,
        seeds=args.seeds or [0],
        methods=args.methods or HETERO_METHODS,
        **_run_options(args),
    )
    for result in results:
        print(f"wrote {Path(args.out) / result['stem']}.md")
    return 0 if results else 1


def _cmd_incremental(args: argparse.Namespace) -> int:
    from pnc.bench.incremental import INCREMENTAL_METHODS, run_incremental

    dataset, arch = _default_pair_of(args)
    _check(args, (dataset, arch))
    path = run_incremental(
        dataset,
        arch,
        step_sizes=args.step_sizes,
        seeds=args.seeds or [0],
        methods=args.methods or INCREMENTAL_METHODS,
        old_fraction=args.old_fraction,
        **_run_options(args),
    )
    print(f"wrote {path} and its plot")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``pnc bench ...`` to the ``pnc`` command."""
    from pnc.bench.baselines import METHODS
    from pnc.bench.hetero import HETERO_METHODS, PAIRS
    from pnc.bench.incremental import INCREMENTAL_METHODS

    bench = sub.add_parser("bench", help="reproduce the paper's tables and figures")
    cmds = bench.add_subparsers(dest="bench_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_zoo_dir(common)
    add_data_dir(common)
    common.add_argument("--out", default="benchmarks/results", help="where tables, JSON and plots go")
    common.add_argument("--workdir", type=Path, help="checkpoints and caches (default: beside the zoo, bench/)")
    common.add_argument(
        "--fresh",
        action="store_true",
        help="recompute the rows this run selects (not their cached copies); the table's other rows stay cached",
    )
    common.add_argument("--seeds", type=_csv(seed_number), help="comma-separated seeds (task subset + training seeds)")
    add_device(common, "train and evaluate every method")
    quick = argparse.ArgumentParser(add_help=False)
    quick.add_argument("--quick", action="store_true", help="tiny budget on digits (for tests and smoke runs)")

    paper = cmds.add_parser(
        "paper", parents=[common, quick], help="Table 1: PNC against the baselines and ablations, S and M scales"
    )
    paper.add_argument("--dataset", help="default fashion-mnist (digits with --quick)")
    paper.add_argument(
        "--arch",
        help="architecture of the default zoo pair: lenet5, resnetc20, cnn4 (default lenet5; cnn4 with --quick)",
    )
    paper.add_argument("--target", help="a target zoo model (with --source: benchmark any pair the zoo holds)")
    paper.add_argument("--source", help="a source zoo model of the same dataset as --target")
    paper.add_argument("--scales", type=_csv(str), help="S, M or S,M (default S,M; S with --quick)")
    paper.add_argument("--methods", type=_csv(str), help=f"comma-separated, of {', '.join(METHODS)} (default: all)")
    add_old_fraction(paper)
    add_backend(paper, "the table's cells (seed x scale x method)")
    paper.set_defaults(func=_cmd_paper)

    figures = cmds.add_parser(
        "figures",
        parents=[common, quick],
        help="Fig. 3 (accuracy vs mask ratio and R) and Fig. 4 (similarity matrices)",
    )
    figures.add_argument("--dataset", help="default fashion-mnist (digits with --quick)")
    figures.add_argument("--arch", help="architecture of the default zoo pair (default lenet5; cnn4 with --quick)")
    figures.add_argument("--figures", type=_csv(int, (3, 4)), default=[3, 4], help="3, 4 or 3,4 (default)")
    figures.set_defaults(func=_cmd_figures)

    hetero = cmds.add_parser("hetero", parents=[common], help="Table 2: cloning between heterogeneous architectures")
    hetero.add_argument(
        "--pairs",
        type=_csv(str, list(PAIRS)),
        default=list(PAIRS),
        help=f"comma-separated, of {', '.join(PAIRS)} (source-target; default all)",
    )
    hetero.add_argument(
        "--quick",
        action="store_true",
        help="tiny search budget, one seed, tables named table2-<pair>-quick (a smoke run; still Fashion-MNIST)",
    )
    hetero.add_argument(
        "--methods",
        type=_csv(str, HETERO_METHODS),
        help="default Pre-trained,Continual,Continual+KD,Direct Ensemble,Calibrated Ensemble,PNC",
    )
    hetero.set_defaults(func=_cmd_hetero)

    inc = cmds.add_parser("incremental", parents=[common, quick], help="Table 3: class-incremental steps by cloning")
    inc.add_argument("--dataset", help="default fashion-mnist (digits with --quick)")
    inc.add_argument("--arch", help="architecture of the default zoo pair (default lenet5; cnn4 with --quick)")
    inc.add_argument(
        "--step-sizes", type=_csv(in_range(int, 1, 1000)), default=[1], help="classes added per step (default 1)"
    )
    inc.add_argument(
        "--methods", type=_csv(str, INCREMENTAL_METHODS), help="default Direct Ensemble,Continual,Continual+KD,PNC"
    )
    add_old_fraction(inc)
    inc.set_defaults(func=_cmd_incremental)
