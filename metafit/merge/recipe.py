"""`metafit merge RECIPE.yaml --out DIR`: YAML merge recipes -> an HF folder transformers loads.

Recipe format (every key is validated; unknown keys fail with a did-you-mean before any
tensor is read)::

    # metafit merge recipe
    method: ties                  # a merge-method name (`metafit list`): task_arithmetic, ties,
                                  # dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, linear,
                                  # slerp, model_stock, fisher
    base: ./smollm2-base          # HF folder, .safetensors file, .gguf file or embedded model name
                                  # (GGUF/embedded are converted once to a cached float32 HF folder);
                                  # required by methods with a base
    models:                       # the models to merge, in order
      - path: ./smollm2-math       # a plain string is short for {path: ...}
        weight: 1.0               # per-model parameters (optional): weight, density, drop_rate,
        density: 0.2              #   gamma, fisher (a safetensors file of diagonal Fisher values)
      - ./smollm2-code
    parameters:                   # shared parameters and defaults of the per-model ones:
      scale: 1.0                  #   scale (λ), t (slerp), normalize (linear), density, ...
    layers:                       # optional per-tensor overrides; the first `match` glob wins
      - match: "model.layers.0.*"
        parameters: {density: 0.5}
      - match: "lm_head.weight"
        copy_base: true           # keep the base tensor (the first model's without a base)
    seed: 0                       # key for random methods (DARE): jax.random.key(seed)
    dtype: null                   # output dtype: float32 | bfloat16 | float16 | null (= input)
    config_from: null             # folder whose config.json/tokenizer files are copied
                                  # (default: base, else the first model)

Relative paths are resolved against the recipe file's folder. Parameter rules: densities in
(0, 1]; drop rates in [0, 1); ``linear`` weights must sum to 1 unless ``normalize: true``;
``slerp`` takes exactly two models and ``t`` in [0, 1]; every model must have the base's
tensor names and shapes (the first mismatching tensor is named).

Output folder: ``model.safetensors`` (streamed tensor by tensor, see
:mod:`metafit.merge.stream`), ``config.json`` and tokenizer/generation files copied from
``config_from``, and ``metafit_merge.yaml`` (the resolved recipe).
It is written complete beside ``--out`` and swapped in: ``--out`` must be new, empty, or an
earlier merge output (replaced as a whole); an input's folder, a file or another non-empty folder
is refused. Copied files must be regular files inside their folder (links out are refused), and
every merged tensor must be finite (the first non-finite one is named; nothing is written).

Example:
    >>> from metafit.merge.recipe import run_recipe
    >>> run_recipe("my_merge.yaml", "out/merged")   # -> {"out_dir": "out/merged", "tensors": ..., ...}
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal, Optional

import jax
import ml_dtypes
import numpy as np

from metafit.cache import cache_dir
from metafit.config import ConfigError, dump_yaml, from_dict, load_yaml, to_dict
from metafit.merge.io import WEIGHTS_NAME, SafetensorsError
from metafit.merge.mergekit import from_mergekit, is_mergekit
from metafit.merge.methods import MergeError, get_method, resolve_params
from metafit.merge.stream import merge_folders
from metafit.models import EMBEDDED, load, resolve, save_folder
from metafit.models.model_files import file_in_folder, present
from metafit.registry import UnknownNameError

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
OUTPUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model of a recipe and its per-model parameters (``None`` = the method's default)."""

    path: str
    weight: Optional[float] = None
    density: Optional[float] = None
    drop_rate: Optional[float] = None
    gamma: Optional[float] = None
    fisher: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """A per-tensor override: tensors whose name matches the glob ``match``."""

    match: str
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    copy_base: bool = False


@dataclasses.dataclass(frozen=True)
class MergeRecipe:
    """A merge recipe (see the module docstring for the YAML format)."""

    method: str
    models: tuple[ModelEntry, ...]
    base: Optional[str] = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    layers: tuple[LayerRule, ...] = ()
    seed: int = 0
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    config_from: Optional[str] = None


def load_recipe(path: str | Path) -> MergeRecipe:
    """Reads and validates a recipe, native or mergekit's (:mod:`metafit.merge.mergekit`).

    Unknown keys, wrong types and mergekit features metafit does not have raise ``ConfigError``.
    """
    raw = load_yaml(path)
    if is_mergekit(raw):  # mergekit's schema: translated, then validated and run like a native recipe
        raw = from_mergekit(raw, Path(path).parent)
    if isinstance(raw.get("models"), list):
        raw["models"] = [{"path": m} if isinstance(m, str) else m for m in raw["models"]]
    return from_dict(MergeRecipe, raw, path="")


def _resolve(root: Path, path: str | None) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _resolve_model(root: Path, path: str | None) -> Path | None:
    """A model entry as something safetensors can stream: an HF folder or ``.safetensors`` file.

    An existing path wins; otherwise an embedded model name (``metafit list``). GGUF files and
    embedded models are converted once to a float32 HF folder in the cache (see
    :func:`hf_folder_of`), so ``base: smollm2-135m-instruct`` works.
    """
    p = _resolve(root, path)
    if p is None:
        return None
    if not p.exists():
        if path not in EMBEDDED:
            return p  # reported as missing by validate_recipe
        return hf_folder_of(path)
    return hf_folder_of(p) if p.suffix == ".gguf" else p


def hf_folder_of(source: str | Path) -> Path:
    """A float32 HF folder with the weights of a GGUF file or embedded model (converted once, cached).

    The cache key is the source file's absolute path, size and modification time, so a changed
    file is converted again. The folder is written under a temporary name and renamed, so a
    conversion killed midway leaves nothing that looks complete.
    """
    file = resolve(source).resolve()
    stat = file.stat()
    digest = hashlib.sha1(f"{file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    root = cache_dir("hf")
    if root is None:
        raise ValueError(f"{source} must be converted to an HF folder once, but caching is off (METAFIT_CACHE="
                         f"{os.environ.get('METAFIT_CACHE')!r}); set METAFIT_CACHE to a folder, or pass an HF folder")
    folder = root / f"{file.stem}-{digest}"
    if (folder / WEIGHTS_NAME).is_file():
        return folder
    model, tokenizer = load(file)
    return save_folder(model, folder, tokenizer)


def _per_model_params(recipe: MergeRecipe) -> dict[str, Any]:
    """Shared parameters with the per-model entries folded in as one value per model."""
    params = dict(recipe.parameters)
    defaults = dict(get_method(recipe.method).per_model)
    for field in ("weight", "density", "drop_rate", "gamma"):
        given = [getattr(m, field) for m in recipe.models]
        if any(v is not None for v in given):
            fallback = params.get(field, defaults.get(field))
            params[field] = tuple(fallback if v is None else v for v in given)
    return params


def validate_recipe(recipe: MergeRecipe, root: Path) -> dict[str, Any]:
    """Checks names, paths and parameters before any tensor is read; returns merge arguments."""
    try:
        method = get_method(recipe.method)
    except UnknownNameError as err:
        raise ConfigError(f"method: {err}") from None
    if not recipe.models:
        raise MergeError("the recipe lists no models")
    if method.needs_base and recipe.base is None:
        raise MergeError(f"merge method '{method.name}' needs `base:` (the model the task vectors start from)")
    fishers = None
    if "fisher" in method.tensor_inputs:
        if any(m.fisher is None for m in recipe.models):
            raise MergeError("method 'fisher' needs `fisher:` (a safetensors file) for every model")
        fishers = [_resolve(root, m.fisher) for m in recipe.models]
    elif any(m.fisher is not None for m in recipe.models):
        raise MergeError(f"`fisher:` is only used by method 'fisher', not '{method.name}'")
    _check_param_types(recipe)
    params = _per_model_params(recipe)
    resolve_params(method, len(recipe.models), params)  # fail fast on bad values
    rules = []
    for index, rule in enumerate(recipe.layers):
        if rule.copy_base and rule.parameters:
            raise MergeError(f"layers[{index}] ('{rule.match}'): give either copy_base or parameters, not both")
        over = None if rule.copy_base else {**params, **rule.parameters}
        if over is not None:
            resolve_params(method, len(recipe.models), over)
        rules.append((rule.match, None if over is None else dict(rule.parameters)))
    # Paths last: GGUF files and embedded names are converted here, after everything cheap is checked.
    paths = [_resolve_model(root, m.path) for m in recipe.models]
    base = _resolve_model(root, recipe.base) if method.needs_base else None
    for label, p in [("base", base)] + [(f"models[{i}]", p) for i, p in enumerate(paths)]:
        if p is not None and not p.exists():
            raise MergeError(f"{label}: model not found: {p} (give an HF folder, a .safetensors or .gguf file, "
                             f"or an embedded model name: {', '.join(EMBEDDED.names())})")
    config_from = _resolve_model(root, recipe.config_from) or base or paths[0]
    return {"method": method, "base": base, "models": paths, "params": params, "rules": rules,
            "key": jax.random.key(recipe.seed) if method.needs_key else None,
            "dtype": OUTPUT_DTYPES[recipe.dtype] if recipe.dtype else None,
            "fishers": fishers, "config_from": config_from}


def _number(value: Any) -> bool:
    """A number, or a string YAML 1.1 leaves unparsed (``1e300``) that reads as one."""
    if isinstance(value, (int, float)):
        return True
    try:
        return isinstance(value, str) and (float(value) or True)
    except ValueError:
        return False


def _check_param_types(recipe: MergeRecipe) -> None:
    """Parameter values are numbers, booleans or lists of numbers; anything else names its key."""
    groups = [("parameters", recipe.parameters)] + [
        (f"layers[{i}].parameters", rule.parameters) for i, rule in enumerate(recipe.layers)]
    for where, group in groups:
        if not isinstance(group, dict):
            raise ConfigError(f"{where}: expected a mapping of parameter names to values, got {group!r}")
        for name, value in group.items():
            values = value if isinstance(value, list) else [value]
            if not values or not all(_number(v) for v in values) or (
                    isinstance(value, list) and any(isinstance(v, bool) for v in values)):
                raise ConfigError(f"{where}.{name}: expected a number (or a list of numbers, one per model), "
                                  f"got {value!r}")


def run_recipe(path: str | Path, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Runs a merge recipe and writes an HF folder that ``transformers`` loads.

    The new folder is written complete beside ``out_dir`` (``.NAME.partial-PID``) and then swapped
    in, so an existing output is replaced as a whole (no stale shard, index or tokenizer survives)
    and a failed or killed merge leaves the previous output as it was. Leftovers of killed merges
    (``*.partial-PID`` of processes that are gone) are removed on the next run.

    Args:
      path: the recipe YAML (format in the module docstring).
      out_dir: output folder: new, empty, or an earlier ``metafit merge`` output (replaced).
      progress: show a rich progress bar over tensors.
    Returns:
      ``{"out_dir": str, "tensors": int, "seconds": float, "bytes": int, "method": str}``.
    Raises:
      ConfigError: unknown keys / wrong types / unknown method in the recipe.
      MergeError: missing models, mismatched tensors (first one named), bad parameter values,
        non-finite merged tensors (named), an output that is an input, a file, or a non-empty
        folder that is not an earlier merge output.
      MalformedWeightsError: an input file is malformed, or a copied config/tokenizer file is a
        link out of its folder or not a regular file (named).
    """
    path = Path(path)
    recipe = load_recipe(path)
    args = validate_recipe(recipe, path.parent)
    out = Path(out_dir)
    fisher_inputs = list(args["fishers"] or [])
    _remove_dead_partials(out)
    _check_output(out, [args["base"], *args["models"], args["config_from"], *fisher_inputs])
    side_files = _side_files(Path(args["config_from"]))  # checked before any tensor is merged
    params, rules = args["params"], args["rules"]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()

    def run(on_tensor=None):
        return merge_folders(args["method"], args["base"], args["models"], staging / WEIGHTS_NAME,
                             params=params, rules=rules, key=args["key"], dtype=args["dtype"],
                             fishers=args["fishers"], on_tensor=on_tensor)

    try:
        try:
            if progress:
                from rich.progress import Progress

                with Progress(transient=True) as bar:
                    task = bar.add_task(f"merge ({args['method'].name})", total=None)
                    summary = run(lambda i, n, name: bar.update(task, completed=i + 1, total=n))
            else:
                summary = run()
        except SafetensorsError as err:
            raise MergeError(str(err)) from None
        _copy_side_files(side_files, staging, recipe.dtype)
        (staging / "metafit_merge.yaml").write_text(dump_yaml(to_dict(recipe)))
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"out_dir": str(out), "method": args["method"].name, **summary}


MERGE_MARKER = "metafit_merge.yaml"
_PARTIAL = re.compile(r"\.partial-(\d+)$|\.old-(\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's) or cannot be told: keep it
    return True


def _remove_dead_partials(out: Path) -> None:
    """Removes leftovers of killed merges whose process is gone (a live merge's are kept).

    That is ``model.safetensors.partial-PID`` in ``out`` and the ``.OUT.partial-PID`` /
    ``.OUT.old-PID`` folders beside it, names only a merge writes.
    """
    candidates = []
    if out.is_dir() and not out.is_symlink():
        # only the writer's own names: a user's file that merely ends in ".partial-N" is not touched
        candidates += [p for p in out.iterdir() if re.fullmatch(re.escape(WEIGHTS_NAME) + r"\.partial-\d+", p.name)]
    if out.parent.is_dir():
        candidates += [p for p in out.parent.iterdir() if _PARTIAL.search(p.name)
                       and p.name[:_PARTIAL.search(p.name).start()] == f".{out.name}"]
    for entry in candidates:
        match = _PARTIAL.search(entry.name)
        if not match or _pid_alive(int(match.group(1) or match.group(2))):
            continue
        if match.group(2) and entry.is_dir() and not os.path.lexists(out):
            os.replace(entry, out)  # killed between the two renames of a swap: the old output comes back
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _check_output(out: Path, inputs: list[Path | None]) -> None:
    """Refuses an output that is a file, holds or is an input, or is a non-empty folder not written by a merge."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise MergeError(f"--out {out} is a file (or link), not a folder: choose a folder for the merged model")
    target = out.resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        folder = source if source.is_dir() else source.parent
        if folder == target or source.is_relative_to(target):
            raise MergeError(f"--out {out} is the folder of an input model ({source}); writing there would "
                             "replace that model: choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MERGE_MARKER).is_file():
        found = sorted(p.name for p in out.iterdir())[:5]
        raise MergeError(f"--out {out} is a non-empty folder ({', '.join(found)}, ...) that is not the output of an "
                         "earlier `metafit merge`; it would be replaced as a whole: choose a new or empty folder")


def _swap_in(staging: Path, out: Path) -> None:
    """Replaces ``out`` by the complete folder ``staging`` (the old one is removed after the rename)."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _side_files(source: Path) -> list[tuple[str, Path]]:
    """Config/tokenizer files to copy: regular files inside ``source`` only (links out are refused, named)."""
    folder = source if source.is_dir() else source.parent
    return [(name, file_in_folder(folder, name, f"{name} (copied into the merged folder)"))
            for name in COPIED_FILES if present(folder, name)]


def _copy_side_files(files: list[tuple[str, Path]], out: Path, dtype: str | None) -> None:
    for name, source in files:
        shutil.copyfile(source.resolve(), out / name)
    config = out / "config.json"
    if dtype and config.is_file():
        data = json.loads(config.read_text())
        for field in ("torch_dtype", "dtype"):
            if field in data:
                data[field] = dtype
        config.write_text(json.dumps(data, indent=2))
