"""mergekit's YAML recipe schema, translated into a metafit recipe (then run by the one recipe path).

A recipe with a top-level ``merge_method`` key is a mergekit recipe. It is translated field by
field into the native dict of :mod:`metafit.merge.recipe` (which validates and runs it); what has
no metafit equivalent is refused, named, before any tensor is read.

==========================  =================================================================
mergekit                    metafit
==========================  =================================================================
``merge_method``            ``method`` (table below)
``base_model``              ``base`` (an entry of ``models`` naming the base is dropped: mergekit
                            gives the base no task vector); ``slerp``: the first model
``models[].model``          ``models[].path``
``models[].parameters``     ``weight``, ``density`` (DARE: ``drop_rate = 1 − density``), ``gamma``
``parameters``              defaults of the per-model values; ``lambda`` -> ``scale``; ``t``;
                            ``normalize``; ``rescale`` (DARE, must be true); ``int8_mask`` (memory only)
``{filter, value}`` lists   ``layers`` rules with glob ``*filter*`` (mergekit: substring match),
                            in order, the entry without a filter being the default
``slices``                  one slice whose sources all span every layer -> ``models``
``dtype`` / ``out_dtype``   ``dtype`` of the output (``out_dtype`` wins); metafit computes in float32
``tokenizer_source``        ``base`` or a model -> ``config_from``
``random_seed``             ``seed``
==========================  =================================================================

Methods (mergekit's defaults: ``normalize`` true for ``ties`` and ``linear`` only; ``density`` 1):

* ``linear`` -> ``linear`` (``normalize`` default true); ``slerp`` -> ``slerp`` ``[base, other]``;
  ``model_stock`` -> ``model_stock``; ``passthrough`` of one model -> ``linear`` with weight 1.
* ``task_arithmetic`` / ``dare_linear`` / ``breadcrumbs`` (no sign election): ``normalize: true``
  divides the weights by their sum, ``Σ w_m δ_m / Σ w_m``.
* ``ties`` / ``dare_ties`` / ``breadcrumbs_ties`` (sign election): ``normalize: true`` is the
  disjoint mean (metafit's ``ties``, ``dare_ties``, ``breadcrumbs_ties``), false the elected sum
  (``ties_sum``, ``dare_ties_sum``, ``breadcrumbs_ties_sum``).

Same maths, different numbers in two places: DARE's random masks come from JAX, not torch, and
metafit rescales survivors by ``1/(1 − p)`` where mergekit matches the L1 norm of the task vector;
metafit computes in float32 where mergekit computes in ``dtype``.
Not translated (a clear error): other methods (della, sce, nuslerp, karcher, ...), gradients
(lists of values interpolated over layers), slices that stack or cut layers, LoRA ``model+lora``
references, ``tokenizer_source: union``, ``tokenizer``/``chat_template``/``modules`` blocks.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from metafit.config import ConfigError

# mergekit method -> (metafit method without / with normalize, normalize default). None: no such variant.
GTA_METHODS = {
    "task_arithmetic": ("task_arithmetic", "task_arithmetic", False),
    "dare_linear": ("dare_linear", "dare_linear", False),
    "breadcrumbs": ("breadcrumbs", "breadcrumbs", False),
    "ties": ("ties_sum", "ties", True),
    "dare_ties": ("dare_ties_sum", "dare_ties", False),
    "breadcrumbs_ties": ("breadcrumbs_ties_sum", "breadcrumbs_ties", False),
}
ELECTING = {"ties", "dare_ties", "breadcrumbs_ties"}
OTHER_METHODS = ("linear", "slerp", "model_stock", "passthrough")
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "random_seed", "name")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
PER_MODEL = ("weight", "density", "gamma")
PER_MODEL_OUT = ("weight", "density", "drop_rate", "gamma")  # metafit's per-model parameters: one value per model


def is_mergekit(raw: Any) -> bool:
    """True for a mergekit recipe (it names ``merge_method``; metafit's own names ``method``)."""
    return isinstance(raw, dict) and "merge_method" in raw


class _Unsupported(ConfigError):
    pass


def _fail(message: str) -> None:
    raise _Unsupported(f"mergekit recipe: {message}")


def from_mergekit(raw: dict, root: Path) -> dict:
    """The metafit recipe dict equivalent to the mergekit recipe ``raw`` (paths relative to ``root``).

    Raises:
      ConfigError: naming the mergekit key, method or value metafit cannot translate.
    """
    for key in raw:
        if key not in TOP_KEYS:
            _fail(f"key '{key}' is not supported by metafit (supported: {', '.join(TOP_KEYS)})")
    source = raw["merge_method"]
    if source not in GTA_METHODS and source not in OTHER_METHODS:
        _fail(f"merge_method '{source}' is not supported by metafit; supported: "
              f"{', '.join([*GTA_METHODS, *OTHER_METHODS])}")
    shared = dict(raw.get("parameters") or {})
    entries = _entries(raw, root)
    base = raw.get("base_model")
    _check_model_ref(base, "base_model")
    if base is not None and source not in ("linear", "passthrough"):  # mergekit: the base has no task vector
        entries = [e for e in entries if e["model"] != base]
    rules: list[dict] = []
    out: dict[str, Any] = {}
    if source in GTA_METHODS:
        params = _gta(source, shared, entries, out)
    elif source == "linear":
        params = _linear(shared, entries, out)
    elif source == "slerp":
        params = _slerp(shared, entries, base, out)
        base = None
    elif source == "model_stock":
        params = _model_stock(shared, entries, out)
    else:
        params = _passthrough(shared, entries, out)
    if base is not None and out["method"] not in ("linear", "slerp"):
        out["base"] = base
    defaults, rules = _split_filters(params, len(out["models"]))
    out["parameters"] = defaults
    if rules:
        out["layers"] = rules
    dtype = raw.get("out_dtype") or raw.get("dtype")
    if dtype is not None:
        if dtype not in DTYPES:
            _fail(f"dtype '{dtype}' is not supported (use one of {', '.join(DTYPES)})")
        out["dtype"] = DTYPES[dtype]
    if raw.get("random_seed") is not None:
        out["seed"] = raw["random_seed"]
    tokenizer = raw.get("tokenizer_source")
    if tokenizer is not None:
        if tokenizer == "union":
            _fail("tokenizer_source: union (a merged vocabulary) is not supported; use 'base' or a model")
        out["config_from"] = base if tokenizer == "base" else tokenizer
        if tokenizer == "base" and base is None:
            _fail("tokenizer_source: base needs base_model")
    return out


def _check_model_ref(model: Any, where: str) -> None:
    if model is not None and (not isinstance(model, str) or "+" in model):
        _fail(f"{where}: {model!r} is not supported: give a local model folder or file "
              "(LoRA 'model+adapter' references and model objects are not translated)")


def _entries(raw: dict, root: Path) -> list[dict]:
    """``models`` entries as ``{"model": str, "parameters": dict}``; ``slices`` of whole models become entries."""
    if ("models" in raw) == ("slices" in raw):
        _fail("give exactly one of `models` and `slices`")
    if "models" in raw:
        items = raw["models"]
        where = "models"
    else:
        slices = raw["slices"]
        if not isinstance(slices, list) or len(slices) != 1:
            _fail(f"slices: {len(slices) if isinstance(slices, list) else slices!r} slices stack or cut layers "
                  "(a passthrough 'frankenmerge'), which metafit does not do; only one slice whose sources "
                  "span every layer is translated")
        items = slices[0].get("sources") if isinstance(slices[0], dict) else None
        where = "slices[0].sources"
        extra = set(slices[0]) - {"sources"} if isinstance(slices[0], dict) else set()
        if extra:
            _fail(f"slices[0]: key '{sorted(extra)[0]}' is not supported")
    if not isinstance(items, list) or not items:
        _fail(f"{where} must be a non-empty list")
    entries = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or "model" not in item:
            _fail(f"{where}[{index}] must be a mapping with `model:`")
        extra = set(item) - {"model", "parameters", "layer_range"}
        if extra:
            _fail(f"{where}[{index}]: key '{sorted(extra)[0]}' is not supported")
        _check_model_ref(item["model"], f"{where}[{index}].model")
        if "layer_range" in item:
            _check_whole(item["model"], item["layer_range"], root, f"{where}[{index}]")
        elif where != "models":
            _fail(f"{where}[{index}]: a slice source needs layer_range")
        entries.append({"model": item["model"], "parameters": dict(item.get("parameters") or {})})
    return entries


def _check_whole(model: str, layer_range: Any, root: Path, where: str) -> None:
    """A slice source must span every layer of its model (``num_hidden_layers`` of its config.json)."""
    path = Path(model).expanduser()
    config = (path if path.is_absolute() else root / path) / "config.json"
    if not config.is_file():
        _fail(f"{where}: cannot check layer_range {layer_range} without {config}")
    layers = json.loads(config.read_text()).get("num_hidden_layers")
    if list(layer_range) != [0, layers]:
        _fail(f"{where}: layer_range {layer_range} is not the whole model ([0, {layers}]); slices that cut or "
              "stack layers (passthrough 'frankenmerges') are not supported")


def _take(shared: dict, allowed: dict[str, Any], method: str) -> dict:
    """Shared parameters with mergekit's defaults; a name the method does not take is an error."""
    for name in shared:
        if name not in allowed and name not in PER_MODEL:
            _fail(f"parameter '{name}' is not supported for merge_method '{method}' "
                  f"(supported: {', '.join([*allowed, *PER_MODEL])})")
    return {name: shared.get(name, default) for name, default in allowed.items()}


def _per_model(entries: list[dict], shared: dict, name: str, default: Any, method: str) -> list[Any]:
    """One value per model: its own parameter, else the shared default, else mergekit's default."""
    values = []
    for index, entry in enumerate(entries):
        value = entry["parameters"].get(name, shared.get(name, default))
        if value is None:
            _fail(f"models[{index}] ({entry['model']}): parameter '{name}' is required by merge_method '{method}'")
        values.append(value)
    return values


def _check_entry_keys(entries: list[dict], allowed: tuple[str, ...], method: str) -> None:
    for index, entry in enumerate(entries):
        for name in entry["parameters"]:
            if name not in allowed:
                _fail(f"models[{index}].parameters.{name} is not supported for merge_method '{method}' "
                      f"(supported: {', '.join(allowed) or 'none'})")


def _gta(method: str, shared: dict, entries: list[dict], out: dict) -> dict:
    plain, normalized, normalize_default = GTA_METHODS[method]
    switches = _take(shared, {"normalize": normalize_default, "lambda": 1.0, "rescale": method.startswith("dare"),
                              "int8_mask": False}, method)
    per_model = ("weight", "density", "gamma") if method.startswith("breadcrumbs") else ("weight", "density")
    _check_entry_keys(entries, per_model, method)
    if method.startswith("dare") and switches["rescale"] is not True:
        _fail(f"{method} with rescale: false is not supported (metafit's DARE always rescales the kept entries)")
    if not method.startswith("dare") and switches["rescale"]:
        _fail(f"rescale: true is not supported for {method}")
    normalize = switches["normalize"]
    out["method"] = normalized if normalize else plain
    out["models"] = [e["model"] for e in entries]
    params: dict[str, Any] = {"scale": switches["lambda"]}
    weights = _per_model(entries, shared, "weight", None, method)
    if normalize and method not in ELECTING:
        weights = _divide_by_sum(weights)
    params["weight"] = weights
    densities = _per_model(entries, shared, "density", 1.0, method)
    if method.startswith("dare"):
        params["drop_rate"] = _map(densities, lambda d: 1.0 - d)
    elif method != "task_arithmetic":
        params["density"] = densities
    elif any(d != 1.0 for d in densities):
        _fail("task_arithmetic does not sparsify: density is not used (drop it, or use ties / dare_linear)")
    if method.startswith("breadcrumbs"):
        params["gamma"] = _per_model(entries, shared, "gamma", 0.01, method)
    return params


def _divide_by_sum(weights: list[Any]) -> list[Any]:
    if any(not isinstance(w, (int, float)) for w in weights):
        _fail("normalize: true with per-layer (filtered) weights and no sign election is not supported; "
              "give each model one weight")
    total = float(sum(weights))
    return [w / total if abs(total) >= 1e-8 else w for w in weights]


def _map(values: list[Any], fn) -> list[Any]:
    out = []
    for value in values:
        if isinstance(value, list):
            out.append([{**item, "value": fn(item["value"])} if isinstance(item, dict) else fn(item) for item in value])
        else:
            out.append(fn(value))
    return out


def _linear(shared: dict, entries: list[dict], out: dict) -> dict:
    switches = _take(shared, {"normalize": True}, "linear")
    _check_entry_keys(entries, ("weight",), "linear")
    out["method"] = "linear"
    out["models"] = [e["model"] for e in entries]
    weights = _per_model(entries, shared, "weight", None, "linear")
    return {"weight": weights, "normalize": bool(switches["normalize"])}


def _slerp(shared: dict, entries: list[dict], base: str | None, out: dict) -> dict:
    switches = _take(shared, {"t": None}, "slerp")
    _check_entry_keys(entries, ("t",), "slerp")
    if base is None or len(entries) != 1:
        _fail(f"slerp needs base_model and exactly one other model (got {len(entries)} besides the base)")
    if switches["t"] is None:
        _fail("slerp needs the parameter t")
    out["method"] = "slerp"
    out["models"] = [base, entries[0]["model"]]  # t = 0 is the base, t = 1 the other model, as in mergekit
    return {"t": switches["t"]}


def _model_stock(shared: dict, entries: list[dict], out: dict) -> dict:
    switches = _take(shared, {"filter_wise": False}, "model_stock")
    _check_entry_keys(entries, (), "model_stock")
    if switches["filter_wise"]:
        _fail("model_stock with filter_wise: true (one ratio per row) is not supported")
    out["method"] = "model_stock"
    out["models"] = [e["model"] for e in entries]
    return {}


def _passthrough(shared: dict, entries: list[dict], out: dict) -> dict:
    _take(shared, {}, "passthrough")
    _check_entry_keys(entries, (), "passthrough")
    if len(entries) != 1:
        _fail(f"passthrough of {len(entries)} sources stacks layers ('frankenmerge'), which metafit does not do; "
              "only one model (a copy, e.g. to change dtype) is translated")
    out["method"] = "linear"
    out["models"] = [entries[0]["model"]]
    return {"weight": [1.0]}


def _split_filters(params: dict[str, Any], n_models: int) -> tuple[dict, list[dict]]:
    """mergekit's ``[{filter: s, value: v}, ..., {value: default}]`` values -> metafit ``layers`` rules.

    mergekit gives a tensor the value of the first entry whose ``filter`` is a substring of its
    name (entries without a filter match everything). Each distinct filter becomes a rule with
    glob ``*s*``; every filtered parameter must list the same filters in the same order, so
    that "first rule that matches" means the same thing on both sides.
    """
    filters: list[str] | None = None
    defaults: dict[str, Any] = {}
    by_filter: dict[str, dict[str, Any]] = {}

    def filtered(value: Any, name: str) -> dict | None:
        """``{filter or None: number}`` of one value, or None when it is a plain number."""
        if not isinstance(value, list):
            return None
        if not value or not all(isinstance(item, dict) for item in value):
            _fail(f"parameter '{name}': {value!r} is a gradient (values interpolated over layers), which is not "
                  "supported; give one number, or [{filter: ..., value: ...}, {value: ...}] entries")
        table = {}
        for item in value:
            if set(item) - {"filter", "value"} or "value" not in item or isinstance(item["value"], list):
                _fail(f"parameter '{name}': entry {item!r} is not supported (give filter and one number as value)")
            table.setdefault(item.get("filter"), item["value"])
        return table

    tables: dict[str, list[Any]] = {}
    for name, value in params.items():
        values = value if name in PER_MODEL_OUT else [value]
        parsed = [filtered(v, name) for v in values]
        if all(p is None for p in parsed):
            defaults[name] = value
            continue
        keys = [tuple(k for k in p if k is not None) for p in parsed if p is not None]
        for key in keys:
            if filters is None:
                filters = list(key)
            elif list(key) != filters:
                _fail(f"parameter '{name}': filters {list(key)} differ from {filters} of another parameter; "
                      "metafit needs every filtered parameter to list the same filters in the same order")
        tables[name] = [p if p is not None else {None: v} for p, v in zip(parsed, values)]
    for name, per in tables.items():
        for table in per:
            if None not in table:
                _fail(f"parameter '{name}': give a default entry ({{value: ...}} without filter) after the filters")
        fallback = [table[None] for table in per]
        defaults[name] = fallback if name in PER_MODEL_OUT else fallback[0]
        for f in filters or []:
            value = [table.get(f, table[None]) for table in per]
            by_filter.setdefault(f, {})[name] = value if name in PER_MODEL_OUT else value[0]
    rules = [{"match": f"*{f}*", "parameters": by_filter[f]} for f in filters or []]
    return defaults, rules
