"""``metafit`` command line: parse, validate, call the library. Never changes directory.

Commands:
  metafit run CONFIG [--set key=value ...] [--workdir DIR] [--force-new]
  metafit list                      registered experiments and methods, by family
  metafit show RUN_DIR              the results table of a finished run
  metafit merge RECIPE --out DIR    merge models as a YAML recipe says
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from metafit.config import ConfigError
from metafit.registry import UnknownNameError
from metafit.runs import RunDirError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ConfigError, RunDirError, UnknownNameError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # library input checks (bad data, recipes, shapes) raise ValueError subclasses
        if os.environ.get("METAFIT_DEBUG"):
            raise
        print(f"error: {err}\n(set METAFIT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2
    except Exception as err:
        from metafit.train import NonFiniteLossError

        if isinstance(err, NonFiniteLossError):
            print(f"error: {err}", file=sys.stderr)
            return 3
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metafit", description="metafit: efficient and robust model adaptation in JAX."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run (or resume) an experiment config into a run folder")
    run.add_argument("config", type=Path, help="YAML experiment config, e.g. configs/quickstart.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.steps=100 (repeatable)")
    run.add_argument("--workdir", type=Path, default=None, help="run folder (default: runs/<config name>)")
    run.add_argument("--force-new", action="store_true",
                     help="if the run folder holds a run of a different config, move it aside and start fresh")
    run.set_defaults(func=_run)

    listing = commands.add_parser("list", help="list registered experiments and methods by family")
    listing.set_defaults(func=_list)

    show = commands.add_parser("show", help="print the results table of a finished run")
    show.add_argument("run_dir", type=Path)
    show.set_defaults(func=_show)

    merge = commands.add_parser("merge", help="merge models as a YAML recipe says (writes an HF folder)")
    merge.add_argument("recipe", type=Path)
    merge.add_argument("--out", type=Path, required=True, help="output folder")
    merge.set_defaults(func=_merge)
    return parser


def _run(args: argparse.Namespace) -> int:
    from metafit.experiments import run_experiment

    run, results = run_experiment(args.config, args.overrides, workdir=args.workdir, force_new=args.force_new)
    _print_results(results, f"{args.config} -> {run.path}")
    print(f"run folder: {run.path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from metafit.experiments import load_all
    from metafit.registry import catalogue

    load_all()
    table = Table(title="metafit registries")
    table.add_column("family")
    table.add_column("names")
    for family, registry in catalogue().items():
        table.add_row(family, ", ".join(registry.names()))
    Console().print(table)
    return 0


def _show(args: argparse.Namespace) -> int:
    from metafit.runs import load_results

    _print_results(load_results(args.run_dir), str(args.run_dir))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from metafit.merge.recipe import run_recipe

    summary = run_recipe(args.recipe, args.out)
    print(f"{summary['method']}: merged {summary['tensors']} tensors in {summary['seconds']:.1f}s -> {summary['out_dir']}")
    return 0


def _print_results(results: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from metafit.runs import _fmt

    table = Table(title=title)
    if "methods" in results:
        columns = list(dict.fromkeys(k for row in results["methods"].values() for k in row))
        table.add_column("method")
        for column in columns:
            table.add_column(column, justify="right")
        for method, row in results["methods"].items():
            table.add_row(method, *(_fmt(row.get(c, "")) for c in columns))
    else:
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in results.get("metrics", {}).items():
            table.add_row(key, _fmt(value))
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
