"""
The ``art-queen`` command (also ``python -m art_queen``).

``art-queen bench`` runs the evaluation grid (by default: digits, every defence and attack, one budget, three seeds,
offline, in a few minutes on two CPU cores), prints the results table and writes ``results.json``, CSV files and the
PNG plots into ``--out``. ``art-queen list`` shows the defences and attacks it knows.

Bad option values end with a message and exit code 2.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_OUT = "art_queen_results"
QUEEN_OPTIONS = (("r", float), ("threshold", float), ("k", int), ("beta", float), ("alpha", float))


def _split_values(values: Sequence[str]) -> list[str]:
    return [part for value in values for part in str(value).split(",") if part.strip()]


def _parse_scalar(text: str) -> Any:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _typed_list(values: Sequence[str] | None, kind: type, option: str) -> list[Any] | None:
    if values is None:
        return None
    parsed = []
    for text in _split_values(values):
        try:
            parsed.append(kind(text))
        except ValueError:
            raise ValueError(f"{option} takes {kind.__name__} values, got {text!r}.") from None
    if not parsed:
        raise ValueError(f"{option} needs at least one value.")
    return parsed


def build_parser() -> argparse.ArgumentParser:
    """
    The argument parser of ``art-queen``.

    :return: The parser.
    """
    from art_queen import __version__

    parser = argparse.ArgumentParser(
        prog="art-queen",
        description="QUEEN for the Adversarial Robustness Toolbox: benchmark model-extraction defences offline.",
    )
    parser.add_argument("--version", action="version", version=f"art-queen {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = commands.add_parser(
        "bench",
        help="run the defences × attacks × budgets × seeds grid and print the results",
        description=(
            "Run defences × extraction attacks × query budgets × seeds, print the results table and write "
            "results.json, results.csv, cells.csv, summary.csv, tradeoff.png and queen_sensitivity_map.png. "
            "Lists take space- or comma-separated values."
        ),
    )
    bench.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default ./{DEFAULT_OUT})")
    bench.add_argument("--dataset", default="digits", help="digits (default), mnist5k, mnist, fashion_mnist, cifar10")
    bench.add_argument("--data-dir", metavar="DIR", help="folder of the MNIST / Fashion-MNIST / CIFAR-10 files")
    bench.add_argument("--limit", type=int, metavar="N", help="use a class-stratified subset of N samples")
    bench.add_argument("--defences", nargs="+", metavar="NAME", help="defences to run (default: all; see `list`)")
    bench.add_argument("--attacks", nargs="+", metavar="NAME", help="attacks or attack variants (default: all)")
    bench.add_argument("--budgets", nargs="+", metavar="N", help="query budgets (default per dataset; digits: 500)")
    bench.add_argument("--seeds", nargs="+", metavar="N", help="seeds (default 0 1 2)")
    bench.add_argument(
        "--quick", action="store_true", help="every defence and attack, smallest budget, one seed (for CI)"
    )
    bench.add_argument("--jobs", type=int, default=None, metavar="N", help="parallel worker processes (default 2)")
    bench.add_argument(
        "--cache-dir", metavar="DIR", help="cache folder of trained victims (default ~/.cache/art_queen)"
    )
    bench.add_argument("--victim-epochs", type=int, metavar="N", help="victim training epochs (default per dataset)")
    bench.add_argument("--clone-epochs", type=int, metavar="N", help="clone training epochs (default per dataset)")
    bench.add_argument(
        "--clone-min-steps",
        type=int,
        default=120,
        metavar="N",
        help="fewest optimiser steps of a clone's training; small budgets get more epochs (default 120)",
    )
    bench.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    noise = bench.add_mutually_exclusive_group()
    noise.add_argument("--verbose", action="store_true", help="also log progress details")
    noise.add_argument("--quiet", action="store_true", help="no progress bars; print only the summary")
    sweep = bench.add_argument_group(
        "QUEEN settings", "Each option takes one or more values; every combination is one QUEEN setting."
    )
    for name, kind in QUEEN_OPTIONS:
        sweep.add_argument(f"--queen-{name}", nargs="+", metavar="V", help=f"QUEEN's {name} ({kind.__name__})")
    sweep.add_argument("--queen-scope", nargs="+", metavar="SCOPE", help="global and/or per_client (default: both)")
    bench.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="DEFENCE.PARAM=V1,V2",
        help="parameter values of a defence to sweep, e.g. --set Rounded.decimals=1,2 (repeatable)",
    )

    commands.add_parser("list", help="list the defences and attacks the benchmark knows")
    return parser


def _defence_settings(args: argparse.Namespace) -> dict[str, tuple[dict[str, Any], ...]]:
    from art_queen.evaluation.registry import select_defences

    sweeps: dict[str, dict[str, list[Any]]] = {}
    for item in args.settings:
        name_param, equals, values = str(item).partition("=")
        defence, dot, param = name_param.partition(".")
        if not equals or not dot or not defence or not param or not values.strip():
            raise ValueError(f"--set takes DEFENCE.PARAM=V1,V2, got {item!r}.")
        key = select_defences([defence])[0]
        sweeps.setdefault(key, {})[param.strip()] = [_parse_scalar(v) for v in _split_values([values])]
    for name, kind in QUEEN_OPTIONS:
        queen_values = _typed_list(getattr(args, f"queen_{name}"), kind, f"--queen-{name}")
        if queen_values is not None:
            sweeps.setdefault("Queen", {})[name] = queen_values
    scopes = _typed_list(args.queen_scope, str, "--queen-scope")
    if scopes is not None:
        sweeps.setdefault("Queen", {})["scope"] = scopes
    elif "Queen" in sweeps:
        sweeps["Queen"]["scope"] = ["global", "per_client"]
    settings = {}
    for defence, params in sweeps.items():
        names = list(params)
        combos = itertools.product(*(params[n] for n in names))
        settings[defence] = tuple(dict(zip(names, combo)) for combo in combos)
    return settings


def config_from_args(args: argparse.Namespace) -> Any:
    """
    Turn parsed ``bench`` options into a resolved, validated configuration.

    :param args: Parsed options.
    :return: A :class:`art_queen.evaluation.grid.BenchmarkConfig`.
    :raises ValueError: On a bad option value.
    """
    from art_queen.evaluation.grid import BenchmarkConfig, available_cpus, quick_config
    from art_queen.evaluation.zoo import DEFAULT_CACHE_DIR

    budgets = _typed_list(args.budgets, int, "--budgets")
    seeds = _typed_list(args.seeds, int, "--seeds")
    jobs = args.jobs if args.jobs is not None else min(2, available_cpus())
    config = BenchmarkConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        limit=args.limit,
        defences=tuple(_split_values(args.defences)) if args.defences else None,
        attacks=tuple(_split_values(args.attacks)) if args.attacks else None,
        defence_settings=_defence_settings(args),
        budgets=tuple(budgets) if budgets else None,
        seeds=tuple(seeds) if seeds else (0, 1, 2),
        victim_epochs=args.victim_epochs,
        clone_epochs=args.clone_epochs,
        clone_min_steps=args.clone_min_steps,
        cache_dir=args.cache_dir or DEFAULT_CACHE_DIR,
        jobs=jobs,
        verbose=not args.quiet,
    )
    return quick_config(config) if args.quick else config.resolved()


def _list() -> int:
    from art_queen.evaluation.registry import ATTACKS, DEFENCES, setting_label

    print("Defences (--defences NAME):")
    for key, spec in DEFENCES.items():
        settings = "; ".join(setting_label(s) for s in spec.settings)
        print(f"  {key:<16} [{settings}]  {spec.description}")
    print("\nAttacks (--attacks NAME or NAME/VARIANT):")
    for key, attack in ATTACKS.items():
        print(f"  {key:<28} {attack.description}")
    return 0


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    print(f"{parser.prog} bench: error: {message}", file=sys.stderr)
    print(f"Run `{parser.prog} bench --help` for the options.", file=sys.stderr)
    return 2


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from art_queen.evaluation.grid import check_defence_settings, run_benchmark
    from art_queen.evaluation.report import format_report, format_summary_table, write_outputs

    try:
        config = config_from_args(args)
        check_defence_settings(config)
    except (ValueError, FileNotFoundError, ImportError) as error:
        return _usage_error(parser, str(error))
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        return _usage_error(parser, f"--out {args.out!r} exists and is not a folder.")

    started = time.perf_counter()
    result = run_benchmark(config)
    paths = write_outputs(result, out, plots=not args.no_plots)
    if args.quiet:
        print(format_summary_table(result.defences))
    else:
        print(format_report(result))
    print(f"\nWrote {', '.join(sorted(paths))} to {out} ({time.perf_counter() - started:.0f} s).")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """
    Entry point of ``art-queen``.

    :param argv: Arguments (default: ``sys.argv[1:]``).
    :return: Exit code (0 on success; bad options exit with code 2 through ``SystemExit``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "list":
        return _list()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return _bench(parser, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
