"""``metafit`` command line: parse, validate, call the library. Never changes directory.

Commands:
  metafit run CONFIG [--set key=value ...] [--workdir DIR] [--force-new]
  metafit config EXPERIMENT|CONFIG [--set key=value ...]   a documented config that runs as-is
  metafit list                      registered experiments and methods, by family
  metafit show RUN_DIR              the results table of a finished run
  metafit merge RECIPE --out DIR    merge models as a YAML recipe says
  metafit repro PAPER [--scale S] [--jobs N] [--table-only | --run-missing]   run a paper's grid, rebuild its table
  metafit serve CONFIG [--host H] [--port N] [--api-key K]    an OpenAI-compatible server (base + adapters)
  metafit tune CONFIG --budget N --workdir DIR [--method bo]  search fine-tuning settings of a LoRA SFT job
  metafit --version

Also ``python -m metafit``. This module imports only the standard library, PyYAML and
metafit's config helpers at start-up, so ``metafit --help`` answers without importing
JAX; each command imports what it needs when it runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from metafit import __version__
from metafit.config import ConfigError
from metafit.registry import UnknownNameError

EXAMPLES = """\
examples:
  metafit run configs/quickstart.yaml --set train.steps=200
  metafit config quickstart > my.yaml && metafit run my.yaml
  metafit run my.yaml --set experiment=mypackage.mymodule:my_experiment
  metafit repro amfs --table-only        # rebuild a paper's table from its committed results
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ConfigError, UnknownNameError, FileNotFoundError) as err:
        return _fail(err, 2)
    except Exception as err:
        # Error classes of heavy modules are looked up only if the module was loaded, keeping start-up light.
        if _is_instance(err, "metafit.runs", "RunDirError") or _is_instance(err, "metafit.sweep", "SweepError"):
            return _fail(err, 2)
        if _is_instance(err, "metafit.train", "NonFiniteLossError"):
            return _fail(err, 3)
        if isinstance(err, ValueError) and not os.environ.get("METAFIT_DEBUG"):  # library input checks
            return _fail(f"{err}\n(set METAFIT_DEBUG=1 for a traceback)", 2)
        raise


def _fail(message: object, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _is_instance(err: Exception, module: str, name: str) -> bool:
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(err, getattr(loaded, name, ()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metafit", description="metafit: efficient and robust model adaptation in JAX.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"metafit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run (or resume) an experiment config into a run folder",
        description="Run (or resume) an experiment config into a run folder. Everything is validated before "
                    "the folder is created: a bad setting is an error naming the key, and leaves nothing behind.",
        epilog="The config's `experiment:` is a registered name (metafit list) or package.module:function "
               "(looked up on sys.path and in the current directory).",
    )
    run.add_argument("config", type=Path, help="YAML experiment config, e.g. configs/quickstart.yaml")
    _add_overrides(run)
    run.add_argument("--workdir", type=Path, default=None, help="run folder (default: runs/<config name>)")
    run.add_argument("--force-new", action="store_true",
                     help="if the run folder holds a run of a different config, move it aside and start fresh")
    run.set_defaults(func=_run)

    config = commands.add_parser(
        "config", help="print an experiment's default config (or a config file, resolved) with documented fields",
        description="Print YAML that runs as-is with `metafit run`: the default config of EXPERIMENT, or the "
                    "resolved CONFIG file, with each field's documentation as a comment.",
    )
    config.add_argument("target", metavar="EXPERIMENT|CONFIG",
                        help="a registered experiment (metafit list), package.module:function, or a YAML config")
    _add_overrides(config)
    config.set_defaults(func=_config)

    listing = commands.add_parser("list", help="list registered experiments and methods by family")
    listing.set_defaults(func=_list)

    show = commands.add_parser("show", help="print the results table of a finished run")
    show.add_argument("run_dir", type=Path)
    show.set_defaults(func=_show)

    merge = commands.add_parser("merge", help="merge models as a YAML recipe says (writes an HF folder)")
    merge.add_argument("recipe", type=Path)
    merge.add_argument("--out", type=Path, required=True, help="output folder")
    merge.set_defaults(func=_merge)

    repro = commands.add_parser(
        "repro", help="run a paper's grid (experiments/PAPER.yaml) and rebuild its table from the results",
        description="Run the jobs of experiments/PAPER.yaml that the committed results (sweep.json) do not hold yet, "
                    "then rebuild the paper's tables from the results. Finished jobs are skipped; a failed job is "
                    "recorded with its error and shown as failed. With --table-only nothing runs and files change "
                    "only if their contents do; a table is never rebuilt from fewer results than are committed.",
        epilog="Run from the repository root (where experiments/ and paper_repro/ are). Grids: experiments/*.yaml.",
    )
    repro.add_argument("paper", help="a grid in experiments/ (amfs, clear, prompt, atm, compatible, posttrain, context, delift, mt_server) or a grid YAML path")
    repro.add_argument("--scale", default=None, help="a scale of the grid, e.g. cpu or gpu (default: the grid's)")
    repro.add_argument("--jobs", type=int, default=1, help="jobs at once (more than 1: one subprocess per job)")
    repro.add_argument("--table-only", action="store_true", help="run nothing; rebuild the tables from the results")
    repro.add_argument("--run-missing", action="store_true",
                       help="run the jobs without a result also on a fresh clone (committed results, no run folders "
                            "here), where repro otherwise only rebuilds the tables")
    repro.add_argument("--executor", choices=("inprocess", "subprocess", "ray", "slurm"), default=None,
                       help="where jobs run (default: inprocess for --jobs 1, else subprocess); ray and slurm need "
                            "pip install 'metafit[cluster]'")
    repro.add_argument("--budget-s", type=float, default=None, help="start no job after this many seconds")
    repro.add_argument("--only", action="append", default=[], metavar="GLOB", help="run only jobs matching (repeatable)")
    repro.add_argument("--runs-dir", type=Path, default=None, help="run folders (default: runs/repro/PAPER/SCALE)")
    repro.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    repro.set_defaults(func=_repro)
    tune = commands.add_parser(
        "tune", help="search fine-tuning settings of a LoRA SFT config with meta-learned surrogates",
        description="Propose fine-tuning settings for a lora_sft config from surrogates meta-trained on the "
                    "packaged meta-dataset, run each as a run folder under WORKDIR/trials/, promote promising ones "
                    "to higher fidelity by resuming them, and write a leaderboard (results.json/.md) and "
                    "regret_vs_cost.png. Running the same command again resumes a killed tune.",
        epilog="Methods: bo (transfer BO, cost-aware EI, multi-fidelity, surrogate refit), transfer (portfolio, "
               "no refit), random, default, zero_shot. See docs/hpo.md.")
    tune.add_argument("config", type=Path, help="a lora_sft config, e.g. configs/finetune/lora_small.yaml")
    _add_overrides(tune)
    tune.add_argument("--budget", type=float, default=None, help="full-run equivalents (>= 1)")
    tune.add_argument("--budget-s", type=float, default=None, help="seconds of trial time instead of --budget")
    tune.add_argument("--workdir", type=Path, required=True, help="tune folder (trials, tune.json, leaderboard)")
    tune.add_argument("--method", default="bo", help="bo, transfer, random, default or zero_shot (default bo)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--meta-dataset", type=Path, default=None, help="a meta-dataset file (default: the packaged one)")
    tune.set_defaults(func=_tune)
    export = commands.add_parser(
        "export", help="write a run's trained model as an HF folder (adapter merged or kept; sharded safetensors)",
        description="Write the model a run folder holds (an HF PEFT adapter, merged into its base model or kept "
                    "beside it, or an HF model folder) as a folder transformers loads.")
    export.add_argument("run_dir", type=Path)
    export.add_argument("--out", type=Path, required=True, help="a new or empty output folder")
    export.add_argument("--keep-adapter", action="store_true",
                        help="write the base model with adapter/ beside it instead of merging the adapter")
    export.add_argument("--model", default=None, help="which model of the run (its path in the run folder)")
    export.add_argument("--base", default=None, help="the adapter's base model, if not the one it names")
    export.add_argument("--max-shard-size", default="5GB",
                        help="split weights into safetensors shards of at most this size (default 5GB)")
    export.add_argument("--dtype", default=None, help="cast the weights on disk, e.g. bfloat16")
    export.set_defaults(func=_export)
    serve = commands.add_parser(
        "serve", help="serve a base model and its LoRA adapters over an OpenAI-compatible HTTP API",
        description="Serve the model and adapters of a serve config (e.g. configs/serve/smollm2_tasks.yaml) on "
                    "/v1/completions, /v1/chat/completions and /v1/models; requests for different adapters share "
                    "one batched forward. Ctrl-C finishes the requests in flight, then exits.")
    serve.add_argument("config", type=Path)
    serve.add_argument("--host", default=None, help="address to listen on (default from the config: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default from the config: 8000)")
    serve.add_argument("--api-key", default=os.environ.get("METAFIT_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $METAFIT_API_KEY; none = open)")
    serve.set_defaults(func=_serve)
    return parser


def _add_overrides(command: argparse.ArgumentParser) -> None:
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, parsed as YAML, e.g. --set train.steps=100 (repeatable)")


def _user_modules_importable() -> None:
    """Lets ``experiment: module:function`` find modules in the current directory, as ``python -m`` would.

    Appended, not prepended, so a file in the current directory never shadows an installed package.
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def _run(args: argparse.Namespace) -> int:
    _user_modules_importable()
    from metafit.experiments import run_experiment

    run, results = run_experiment(args.config, args.overrides, workdir=args.workdir, force_new=args.force_new)
    _print_results(results, f"{args.config} -> {run.path}")
    print(f"run folder: {run.path}")
    return 0


def _config(args: argparse.Namespace) -> int:
    _user_modules_importable()
    from metafit.config import apply_overrides, load_yaml, to_dict
    from metafit.experiments import config_text, default_config, get_experiment, resolve_config

    target, sets = args.target, "".join(f" --set {o}" for o in args.overrides)
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        cfg = resolve_config(apply_overrides(load_yaml(target), args.overrides), target)
        header = f"{target}{sets}, resolved (defaults filled in)"
    else:
        cfg = default_config(target)
        if args.overrides:
            cfg = resolve_config(apply_overrides(to_dict(cfg), args.overrides), f"metafit config {target}")
        summary = (get_experiment(target).fn.__doc__ or "").strip().splitlines()
        header = (f"{target}: {summary[0]}\n" if summary else "") + (
            f"The default config{' with' + sets if sets else ''}. Run it:\n"
            f"  metafit config {target}{sets} > {target.rpartition(':')[2]}.yaml && "
            f"metafit run {target.rpartition(':')[2]}.yaml")
    print(config_text(cfg, header=header), end="")
    return 0


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from metafit.experiments import load_all
    from metafit.registry import catalogue

    load_all()
    if not sys.stdout.isatty():  # logs and pipes: one line per family, nothing wrapped or cut
        for family, registry in catalogue().items():
            print(f"{family}: {', '.join(registry.names())}")
        return 0
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
    if any((Path(args.run_dir) / "posterior").glob("*.nc")):  # Bayesian runs: ArviZ R-hat / ESS of the draws
        from metafit.bayes.posterior import print_posterior_summaries

        print_posterior_summaries(args.run_dir)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from metafit.merge.recipe import run_recipe

    summary = run_recipe(args.recipe, args.out)
    print(f"{summary['method']}: merged {summary['tensors']} tensors in {summary['seconds']:.1f}s -> {summary['out_dir']}")
    return 0


def _repro(args: argparse.Namespace) -> int:
    _user_modules_importable()
    from metafit.sweep import find_grid, run_sweep

    report = run_sweep(find_grid(args.paper), args.scale, jobs=args.jobs, executor=args.executor,
                       budget_s=args.budget_s, only=args.only, table_only=args.table_only, runs_dir=args.runs_dir,
                       ray_address=args.ray_address, run_missing=args.run_missing)
    for name, text in report.tables.items():
        print(f"--- {name}\n{text}")
    if report.left_missing:
        print(f"ran nothing (committed results, no run folders here): {len(report.left_missing)} jobs have no "
              f"result; add --run-missing to run them")
    elif report.ran:
        print(f"this run: {len(report.done)} jobs done, {len(report.failed)} failed, {len(report.skipped)} already "
              f"done before, {len(report.not_started)} not started (budget spent)")
    print(f"tables from {report.results_done} finished and {report.results_failed} failed jobs; "
          + (f"wrote {', '.join(report.written)}" if report.written else "no file changed"))
    for name, error in report.failed.items():
        print(f"FAILED {name}: {error.splitlines()[0]}", file=sys.stderr)
    return 1 if report.failed else 0


def _tune(args: argparse.Namespace) -> int:
    from metafit.hpo.tune import TuneRequest, check_request, tune

    request = TuneRequest(str(args.config), budget=args.budget, budget_s=args.budget_s, method=args.method,
                          seed=args.seed, overrides=tuple(args.overrides))
    check_request(request)  # before JAX is imported: a bad budget answers at once
    results = tune(request, args.workdir, meta_path=args.meta_dataset)
    _print_results({"methods": results["methods"]}, f"tune {args.config} -> {args.workdir}")
    print(f"tune folder: {args.workdir}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from metafit.export import export_run

    summary = export_run(args.run_dir, args.out, merge=not args.keep_adapter, model=args.model, base=args.base,
                         max_shard_size=args.max_shard_size, dtype=args.dtype)
    how = "merged into its base" if summary["merged"] else "as is"
    print(f"{summary['source']} ({summary['kind']}, {how}) -> {summary['out']}: {', '.join(summary['weight_files'])}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from metafit.serve.config import load_serve_config
    from metafit.serve.server import missing_serve_extra, serve

    config = load_serve_config(args.config, host=args.host, port=args.port, api_key=args.api_key)
    missing = missing_serve_extra()
    if missing:
        return _fail(missing, 2)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    serve(config)
    return 0


def _print_results(results: dict, title: str) -> None:
    """A rich table on a terminal; Markdown elsewhere (logs, CI, nohup), where rich would cut wide tables to 80
    columns and show every number as "0…"."""
    if not sys.stdout.isatty():
        print(_results_markdown(results, title))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=_cell(title))
    if "methods" in results:
        columns = list(dict.fromkeys(k for row in results["methods"].values() for k in row))
        table.add_column(_cell("method"))
        for column in columns:
            table.add_column(_cell(column), justify="right")
        for method, row in results["methods"].items():
            table.add_row(_cell(method), *(_cell(row.get(c, "")) for c in columns))
    else:
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in results.get("metrics", {}).items():
            table.add_row(_cell(key), _cell(value))
    Console().print(table)


def _results_markdown(results: dict, title: str) -> str:
    """The results as a Markdown table with every name and text value made inert (see :func:`_inert`)."""
    from metafit.runs import results_markdown

    def cell(value):
        return _inert(value).replace("|", "\\|") if isinstance(value, str) else value

    def row(mapping):
        return {cell(key): cell(value) for key, value in mapping.items()}

    safe = {}
    if "methods" in results:
        safe["methods"] = {cell(method): row(values) for method, values in results["methods"].items()}
    if "metrics" in results:
        safe["metrics"] = row(results["metrics"])
    return results_markdown(safe, cell(title))


def _inert(text: str) -> str:
    """Control characters shown escaped, so a results file cannot move the cursor or hide lines."""
    import unicodedata

    return "".join(ch if unicodedata.category(ch) != "Cc" else ch.encode("unicode_escape").decode() for ch in text)


def _cell(value):
    """Results text as inert terminal text: no Rich markup, control characters shown escaped.

    ``results.json`` may come from anyone (a shared run folder); printing it raw would let it
    move the cursor, retitle the terminal or hide lines.
    """
    from rich.text import Text

    from metafit.runs import _fmt

    return Text(_inert(_fmt(value)))  # a Text is never parsed as markup


if __name__ == "__main__":
    sys.exit(main())
