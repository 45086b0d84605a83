"""Load Hugging Face PEFT adapters into metafit models; read peft configs with peft's field names.

    model, _ = metafit.models.load("SmolLM2-135M-Instruct/")
    metafit.peft.load_hf_peft(model, "my-lora/")           # adapter_config.json + adapter_model.safetensors
    cfg = metafit.peft.LoraConfig.from_hf("my-lora/")      # or .from_hf(r=8, lora_alpha=16, target_modules=[...])

:func:`load_hf_peft` is the inverse of :func:`metafit.peft.export_hf_peft`: tensor names and layouts
come from the exporter's tables (:data:`metafit.peft.hf_export.TENSORS`), so an exported folder loads
back to the same weights. peft types read:

=================  =========================================  ==========================================
peft type           metafit module                              notes
=================  =========================================  ==========================================
``LORA``            :class:`~metafit.peft.LoRALinear`           DoRA, rsLoRA, ``rank_pattern``/``alpha_pattern``,
                                                                GPT-2 ``Conv1D`` (``fan_in_fan_out``)
``IA3``             :class:`~metafit.peft.IA3Linear`            ``feedforward_modules`` rescale inputs
``BEFT``            :class:`~metafit.peft.BitFitBias`           peft's BitFit: a bias offset on Linear layers
``PREFIX_TUNING``   :class:`~metafit.peft.KVPrefix`             RoPE models, ``prefix_projection=False``;
                                                                keys rotated by ``-P`` (see hf_export)
=================  =========================================  ==========================================

Every field of a peft config has one rule (:data:`FIELDS`); nothing is silently dropped:

* *read*: translated (``r`` -> ``rank``, ``lora_alpha`` -> ``alpha``, ``target_modules`` -> ``targets``, ...);
* *metadata*: recorded by peft with no effect on what the adapter computes (``peft_version``,
  ``task_type``, ``fan_in_fan_out``: metafit knows each layer's torch layout from its type);
* *init-only*: shapes only the initialisation: irrelevant when weights are loaded, while ``from_hf``
  (which makes a config to train with) accepts only the values metafit can honour;
* *fixed*: a feature metafit does not implement (``modules_to_save``, ``layers_to_transform``,
  ``bias != "none"``, ...): only peft's "off" value passes, anything else is an error naming the field.

A field peft 0.21.2 does not define is an error naming it, with the closest valid field.
Module selection keeps peft's semantics: a string is a regex (``re.fullmatch`` on the module name), a
list entry matches a name equal to it or ending in ``".entry"`` (metafit's bare-name rule, translated to
``re:`` patterns where an entry would read as a glob).

Bad input fails before the model changes: a missing folder/file (``FileNotFoundError``), a pickled
``adapter_model.bin`` without ``allow_pickle=True``, an unknown or unsupported field, or an adapter for
another base model (a tensor for a module the model lacks, a shape that differs -- both named with the
shapes -- or a module the adapter's ``target_modules`` selects in this model but holds no weights for).
All wrappers are built and checked first; only then are they put into the model.
"""
from __future__ import annotations

import collections
import functools
import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.peft.bitfit import BitFitBias
from metafit.peft.config import BitFitConfig, IA3Config, LoraConfig, PrefixConfig
from metafit.peft.core import PeftModule, iter_modules, path_str, set_at
from metafit.peft.hf_export import (KEY_PREFIX, TENSORS, default_module_name, prefix_geometry,
                                    rope_of, rotate_prefix_keys, torch_shapes)
from metafit.peft.ia3 import IA3Linear
from metafit.peft.lora import LoRALinear
from metafit.peft.prefix import KVPrefix
from metafit.registry import did_you_mean

PEFT_VERSION = "0.21.2"  # the peft release whose config fields FIELDS lists
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"


class FieldRule(NamedTuple):
    """How metafit treats one peft config field: ``kind`` is read / metadata / init / fixed."""

    kind: str
    allowed: tuple = ()
    why: str = ""


READ, METADATA = FieldRule("read"), FieldRule("metadata")


def _fixed(why: str, *allowed: Any) -> FieldRule:
    return FieldRule("fixed", allowed or (None,), why)


def _init(why: str, *allowed: Any) -> FieldRule:
    return FieldRule("init", allowed or (None,), why)


_NOT_IMPLEMENTED = "a peft LoRA variant metafit does not implement"
_COMMON = {
    "peft_type": READ, "task_type": METADATA, "auto_mapping": METADATA, "peft_version": METADATA,
    "base_model_name_or_path": METADATA, "revision": METADATA, "inference_mode": METADATA,
    "modules_to_save": _fixed("full trainable copies of extra modules (e.g. a classification head) are not part "
                              "of a metafit adapter; train such modules with metafit.train's trainable mask", None, []),
}
# Per peft type, every field of peft's config dataclass (peft 0.21.2).
FIELDS: dict[str, dict[str, FieldRule]] = {
    "LORA": {
        **_COMMON,
        "r": READ, "lora_alpha": READ, "lora_dropout": READ, "target_modules": READ, "exclude_modules": READ,
        "use_rslora": READ, "use_dora": READ, "rank_pattern": READ, "alpha_pattern": READ,
        "init_lora_weights": READ,
        "fan_in_fan_out": METADATA, "runtime_config": METADATA, "megatron_core": METADATA,
        "qalora_group_size": METADATA, "ensure_weight_tying": METADATA,
        "bias": _fixed("peft's bias training also replaces base-model biases; metafit reads LoRA weights only "
                       "(BitFit is a separate method: BEFT)", "none"),
        "layers_to_transform": _fixed("metafit selects layers by module-path patterns (LoraConfig.targets, "
                                      "e.g. 're:.*layers\\.[0-3]\\..*q_proj'), not by layer index"),
        "layers_pattern": _fixed("only meaningful with layers_to_transform, which metafit does not implement"),
        "lora_bias": _fixed("LoRA with a trainable bias on B is not implemented", False),
        "use_qalora": _fixed("QA-LoRA is " + _NOT_IMPLEMENTED, False),
        "alora_invocation_tokens": _fixed("activated LoRA (on only after invocation tokens) is " + _NOT_IMPLEMENTED),
        "layer_replication": _fixed("layer replication changes the base model's depth"),
        "target_parameters": _fixed("LoRA on bare nn.Parameters (e.g. MoE experts) is not implemented"),
        "trainable_token_indices": _fixed("trainable token embeddings are not implemented"),
        "megatron_config": _fixed("Megatron parallel layers are not implemented"),
        "loftq_config": _fixed("LoftQ replaces the base weights by quantised ones at init", {}, None),
        "corda_config": _fixed("CorDA changes the base weights at init"),
        "lora_ga_config": _fixed("LoRA-GA changes the base weights at init"),
        "eva_config": _init("EVA initialises A from activations, which metafit does not implement"),
        "velora_config": _fixed("VeLoRA is " + _NOT_IMPLEMENTED),
        "monteclora_config": _fixed("MonteCLoRA is " + _NOT_IMPLEMENTED),
        "arrow_config": _fixed("Arrow routing is " + _NOT_IMPLEMENTED),
        "kasa_config": _fixed("KaSA is " + _NOT_IMPLEMENTED),
        "use_bdlora": _fixed("block-diagonal LoRA is " + _NOT_IMPLEMENTED),
    },
    "IA3": {
        **_COMMON,
        "target_modules": READ, "exclude_modules": READ, "feedforward_modules": READ,
        "fan_in_fan_out": METADATA,
        "init_ia3_weights": _init("metafit starts IA3 vectors at 1 (peft's default)", True),
    },
    "BEFT": {
        **_COMMON,
        "target_modules": READ,
        "init_weights": _init("metafit starts BitFit offsets at 0 (peft's default)", True),
    },
    "PREFIX_TUNING": {
        **_COMMON,
        "num_virtual_tokens": READ, "token_dim": READ, "num_attention_heads": READ, "num_layers": READ,
        "encoder_hidden_size": METADATA,  # only used by prefix_projection
        "num_transformer_submodules": _fixed("encoder-decoder prefixes (2 submodules) are not implemented", 1, None),
        "prefix_projection": _fixed("the reparametrising MLP of prefix_projection=True is not implemented", False),
        "init_weights": _init("metafit draws prefixes from N(0, init_scale^2)"),
    },
}
_TYPE_OF_CONFIG = {LoraConfig: "LORA", IA3Config: "IA3", BitFitConfig: "BEFT", PrefixConfig: "PREFIX_TUNING"}

# init_lora_weights: values that only initialise A/B (free when loading) -> metafit's LoraConfig.init
_LORA_INITS = {True: "default", "gaussian": "gaussian", False: "random"}
_LORA_INITS_LOADABLE = (True, False, "gaussian", "eva", "orthogonal")


# ----------------------------------------------------------------------------- configs


def check_fields(config: Mapping[str, Any], peft_type: str, *, loading: bool) -> None:
    """Raises ``ValueError`` naming the first unknown field or the first value metafit cannot honour.

    ``loading``: init-only fields are free (the weights come from the file); otherwise (``from_hf``)
    they must hold a value metafit honours.
    """
    rules = FIELDS[peft_type]
    for field, value in config.items():
        rule = rules.get(field)
        if rule is None:
            raise ValueError(
                f"unknown {peft_type} field '{field}' (peft {PEFT_VERSION} has no such field);"
                f"{did_you_mean(field, sorted(rules))} valid fields: {', '.join(sorted(rules))}"
            )
        if (rule.kind == "fixed" or (rule.kind == "init" and not loading)) and value not in rule.allowed:
            raise ValueError(f"{peft_type} field {field}={value!r} cannot be honoured by metafit: {rule.why} "
                             f"(accepted: {' or '.join(map(repr, rule.allowed))})")
    init = config.get("init_lora_weights", True)
    if peft_type == "LORA" and init not in (_LORA_INITS_LOADABLE if loading else tuple(_LORA_INITS)):
        raise ValueError(
            f"LORA field init_lora_weights={init!r} cannot be honoured by metafit: "
            + ("this initialisation changes the base weights or the forward pass, so the adapter fits only "
               "peft's modified base model; save it with peft's path_initial_model_for_weight_conversion "
               "to get a plain LoRA" if loading else
               f"metafit initialises LoRA as one of {list(_LORA_INITS)} (-> init={list(_LORA_INITS.values())})")
        )


def read_adapter_config(folder) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter folder (clear errors for a missing one)."""
    folder = Path(folder)
    if not folder.is_dir():
        hint = f"; pass its folder {folder.parent}" if folder.name == CONFIG_FILE else ""
        raise FileNotFoundError(f"no adapter folder at {folder}{hint}")
    path = folder / CONFIG_FILE
    if not path.exists():
        subfolders = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_FILE}"))
        hint = f"; peft saves several adapters in subfolders: pass one of {subfolders}" if subfolders else ""
        raise FileNotFoundError(
            f"{folder} has no {CONFIG_FILE} (found: {sorted(p.name for p in folder.iterdir())}){hint}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a JSON object of peft fields")
    return config


def _as_fields(source: Any) -> dict[str, Any]:
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        return read_adapter_config(path.parent if path.name == CONFIG_FILE else path)
    if callable(getattr(source, "to_dict", None)):  # a peft config object
        return dict(source.to_dict())
    raise TypeError(f"from_hf takes a dict of peft fields, an adapter folder, or a peft config object; "
                    f"got {type(source).__name__}")


def _get(config: Mapping[str, Any], field: str, types: type | tuple, default: Any) -> Any:
    value = config.get(field, default)
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        value = None  # True is an int in Python, never a rank or a rate
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ValueError(f"peft field {field}={config.get(field, default)!r}: expected {names}")
    return value


def _glob_like(name: str) -> bool:
    return name.startswith("re:") or any(ch in name for ch in "*?[")


def _patterns(spec: Any, field: str) -> tuple[str, ...]:
    """peft's module selection as metafit patterns (see the module docstring)."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        return ("re:" + spec,)
    if isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in spec):
        return tuple("re:(?:.*\\.)?" + re.escape(t) if _glob_like(t) else t for t in sorted(spec))
    raise ValueError(f"peft field {field}={spec!r}: expected a regex string or a list of module names")


def _targets(config: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(targets, exclude)`` from ``target_modules``/``exclude_modules``."""
    spec = config.get("target_modules")
    exclude = _patterns(config.get("exclude_modules"), "exclude_modules")
    if spec is None:
        raise ValueError("peft field target_modules is missing: peft fills it from a per-architecture table "
                         "metafit does not copy; name the modules, e.g. target_modules=['q_proj', 'v_proj']")
    if spec == "all-linear":  # peft: every linear layer except the output layer
        return (), exclude + ("lm_head",)
    return _patterns(spec, "target_modules"), exclude


def _lora_config(config: Mapping[str, Any]) -> LoraConfig:
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("peft fields rank_pattern/alpha_pattern cannot be honoured by one metafit LoraConfig "
                         "(one rank and alpha for all targets): apply one LoraConfig per group of targets, or "
                         "load the saved adapter with metafit.peft.load_hf_peft, which honours them")
    targets, exclude = _targets(config)
    return LoraConfig(
        rank=_get(config, "r", int, 8), alpha=float(_get(config, "lora_alpha", (int, float), 8)),
        dropout=float(_get(config, "lora_dropout", (int, float), 0.0)), targets=targets, exclude=exclude,
        use_dora=_get(config, "use_dora", bool, False), use_rslora=_get(config, "use_rslora", bool, False),
        init=_LORA_INITS[config.get("init_lora_weights", True)],
    )


def _ia3_config(config: Mapping[str, Any]) -> IA3Config:
    targets, exclude = _targets(config)
    feedforward = config.get("feedforward_modules")
    if feedforward is None:
        raise ValueError("peft field feedforward_modules is missing: peft fills it from a per-architecture table "
                         "metafit does not copy; name them (e.g. ['down_proj']), or [] for none")
    if isinstance(feedforward, str):
        feedforward = ("re:" + feedforward,)
    else:  # peft: a name is feed-forward when it ends with an entry (no dot needed)
        _patterns(feedforward, "feedforward_modules")  # type check
        feedforward = tuple("re:.*" + re.escape(t) for t in sorted(feedforward))
    return IA3Config(targets=targets, feedforward=feedforward, exclude=exclude)


def _beft_config(config: Mapping[str, Any]) -> BitFitConfig:
    targets, _ = _targets(config)
    return BitFitConfig(targets=targets, target_types=("Linear",), add_missing_bias=True)


def _prefix_config(config: Mapping[str, Any]) -> PrefixConfig:
    # token_dim / num_layers / num_attention_heads follow from the model in both libraries
    return PrefixConfig(num_prefix=_get(config, "num_virtual_tokens", int, None))


_TO_CONFIG = {"LORA": _lora_config, "IA3": _ia3_config, "BEFT": _beft_config, "PREFIX_TUNING": _prefix_config}


def _peft_type(config: Mapping[str, Any], expected: str | None = None) -> str:
    given = config.get("peft_type", expected)
    given = getattr(given, "value", given)  # peft's PeftType enum
    if given not in FIELDS:
        raise ValueError(f"peft_type {given!r} is not one metafit reads; it reads {', '.join(FIELDS)} "
                         "(bottleneck adapters have no peft type: see metafit.peft.hf_export)")
    if expected is not None and given != expected:
        cls = next(c for c, t in _TYPE_OF_CONFIG.items() if t == given)
        raise ValueError(f"peft_type is {given}, not {expected}: use metafit.peft.{cls.__name__}.from_hf")
    return given


def config_from_hf(cls: type, source: Any = None, /, **fields: Any):
    """A metafit method config from peft's fields (what ``LoraConfig.from_hf`` & co. call).

    Args:
      cls: :class:`LoraConfig` (peft ``LORA``, ``use_dora`` for DoRA), :class:`IA3Config` (``IA3``),
        :class:`BitFitConfig` (``BEFT``) or :class:`PrefixConfig` (``PREFIX_TUNING``).
      source: a dict of peft fields, an adapter folder (or its ``adapter_config.json``), or a peft config
        object (anything with ``to_dict()``); None for keyword fields only.
      **fields: peft fields, overriding ``source`` (``r=8, lora_alpha=16, target_modules=[...]``).

    Fields left out take peft's defaults (``r=8, lora_alpha=8``), not metafit's.

    Raises:
      ValueError: an unknown field (named, with the closest valid one), a value metafit cannot honour
        (named, with the reason), a missing ``target_modules``, a config of another peft type.
    """
    peft_type = _TYPE_OF_CONFIG[cls]
    config = {**_as_fields(source), **fields}
    config["peft_type"] = _peft_type(config, peft_type)
    check_fields(config, peft_type, loading=False)
    return _TO_CONFIG[peft_type](config)


# ----------------------------------------------------------------------------- tensors


def _read_tensors(folder: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    from metafit.models.loading import _refuse_pickle, _SafetensorsCheckpoint, _TorchCheckpoint

    if (folder / WEIGHTS_FILE).exists():
        checkpoint = _SafetensorsCheckpoint([folder / WEIGHTS_FILE])
    elif (folder / PICKLED_WEIGHTS_FILE).exists():
        _refuse_pickle(folder / PICKLED_WEIGHTS_FILE, allow_pickle)
        checkpoint = _TorchCheckpoint([folder / PICKLED_WEIGHTS_FILE])
    else:
        raise FileNotFoundError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE} (nor {PICKLED_WEIGHTS_FILE}); "
                                f"found: {sorted(p.name for p in folder.iterdir())}")
    return {name: np.asarray(checkpoint.get_tensor(name)) for name in sorted(checkpoint.names)}


def _peft_selects(spec: Any, name: str) -> bool:
    """peft's rule: a string is ``re.fullmatch``; a list matches ``name == t`` or ``name.endswith('.' + t)``."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _peft_feedforward(spec: Any, name: str) -> bool:
    """peft's IA3 rule: a string is ``re.fullmatch``; a list matches names ending with an entry (no dot needed)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name.endswith(t) for t in spec or ())


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """peft's ``rank_pattern``/``alpha_pattern`` lookup (``get_pattern_key``): first key matching a name tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _module_index(model: nnx.Module, name_of: Callable[[str], str]) -> dict[str, tuple]:
    """HF module name -> ``(path, module)`` of every Linear-like module (2-D kernel) not itself a PEFT module."""
    index = {}
    for path, module in iter_modules(model):
        kernel = getattr(module, "kernel", None)
        if not isinstance(module, PeftModule) and isinstance(kernel, nnx.Variable) and kernel.get_value().ndim == 2:
            index.setdefault(name_of(path_str(path)), (path, module))
    return index


def _group_by_module(tensors: Mapping[str, np.ndarray], peft_type: str) -> dict[str, dict[str, np.ndarray]]:
    suffixes = list(TENSORS[peft_type])
    groups: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        name = key.removesuffix(".weight") if key.endswith(".lora_magnitude_vector.weight") else key  # peft < 0.12
        suffix = next((s for s in suffixes if name.endswith("." + s)), None)
        if not name.startswith(KEY_PREFIX) or suffix is None:
            raise ValueError(f"adapter tensor '{key}' is not a {peft_type} weight metafit reads (expected "
                             f"{KEY_PREFIX}<module>.{{{', '.join(suffixes)}}}; LoRA on embeddings is not implemented)")
        groups[name[len(KEY_PREFIX):-len(suffix) - 1]][suffix] = value
    return groups


def _options(peft_type: str, config: Mapping[str, Any], name: str, found: Mapping[str, np.ndarray]) -> dict:
    """The per-module settings (rank, alpha, DoRA, feed-forward, ...) the config gives module ``name``."""
    if peft_type == "IA3":
        return {"feedforward": _peft_feedforward(config.get("feedforward_modules"), name)}
    if peft_type != "LORA":
        return {}
    rank = _pattern_value(config.get("rank_pattern") or {}, name, _get(config, "r", int, 8))
    if "lora_A.weight" in found and found["lora_A.weight"].shape[0] != rank:
        raise ValueError(f"{name}: lora_A.weight has rank {found['lora_A.weight'].shape[0]}, but the config "
                         f"gives r={rank}")
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, _get(config, "lora_alpha", (int, float), 8))
    return {"rank": rank, "alpha": float(alpha), "dropout": float(_get(config, "lora_dropout", (int, float), 0.0)),
            "use_dora": _get(config, "use_dora", bool, False), "use_rslora": _get(config, "use_rslora", bool, False)}


def _wrapper(peft_type: str, layer: nnx.Module, options: dict, weights: dict, rngs: nnx.Rngs) -> nnx.Module:
    if peft_type == "LORA":  # built from the weights: no random init, no compiles
        return LoRALinear(layer, **options, rngs=rngs, weights=weights)
    wrapper = IA3Linear(layer, **options) if peft_type == "IA3" else BitFitBias(layer)
    for attr, value in weights.items():
        variable = getattr(wrapper, attr)
        variable.set_value(jnp.asarray(value, variable.get_value().dtype))
    return wrapper


def _plan_modules(model, peft_type, config, tensors, name_of, rngs) -> tuple[list[Callable[[], None]], list[str]]:
    """Checked wrappers for LoRA/IA3/BEFT tensors, as assignments still to run, and the problems found."""
    index = _module_index(model, name_of)
    groups = _group_by_module(tensors, peft_type)
    layouts = TENSORS[peft_type]
    edits, problems = [], []
    for name, found in sorted(groups.items()):
        if name not in index:
            problems.append(f"the model has no Linear-like module '{name}';{did_you_mean(name, sorted(index))} "
                            f"the adapter has {', '.join(f'{s} {tuple(v.shape)}' for s, v in sorted(found.items()))}")
            continue
        path, layer = index[name]
        try:
            options = _options(peft_type, config, name, found)
        except ValueError as err:
            problems.append(str(err))
            continue
        d_in, d_out = layer.kernel.get_value().shape
        expected = torch_shapes(peft_type, d_in, d_out, **{k: v for k, v in options.items()
                                                           if k in ("rank", "use_dora", "feedforward")})
        if set(found) != set(expected):
            problems.append(f"{name}: the adapter has {sorted(found)}, but "
                            f"{'use_dora=' + str(options['use_dora']) if peft_type == 'LORA' else peft_type} "
                            f"needs {sorted(expected)}")
            continue
        wrong = [f"{s} has shape {tuple(found[s].shape)}, but this model's {type(layer).__name__} "
                 f"[in={d_in}, out={d_out}] needs {shape}" for s, shape in expected.items()
                 if tuple(found[s].shape) != shape]
        if wrong:
            problems.append(f"{name}: " + "; ".join(wrong))
            continue
        weights = {layouts[s].attr: layouts[s].from_torch(found[s]) for s in expected}
        edits.append(functools.partial(set_at, model, path, _wrapper(peft_type, layer, options, weights, rngs)))
    spec = config.get("target_modules")
    if spec is not None and spec != "all-linear":
        unmatched = [n for n in sorted(index) if n not in groups and _peft_selects(spec, n)
                     and not _peft_selects(config.get("exclude_modules"), n)]
        if unmatched:
            problems.append(f"target_modules={spec!r} selects {len(unmatched)} module(s) of this model that the "
                            f"adapter holds no weights for: {', '.join(unmatched[:4])}{' ...' if len(unmatched) > 4 else ''}")
    return edits, problems


def _set_prefix(attention: nnx.Module, prefix: KVPrefix) -> None:
    attention.kv_prefix = nnx.data(prefix)  # kv_prefix starts as a static None (see metafit.peft.api)


def _plan_prefix(model, peft_type, config, tensors, name_of, rngs) -> tuple[list[Callable[[], None]], list[str]]:
    layers, heads, head_dim = prefix_geometry(model)
    rope_of(model)  # raises for models without rotary positions
    if set(tensors) != {"prompt_embeddings"}:
        return [], [f"a PREFIX_TUNING adapter holds exactly 'prompt_embeddings'; this one holds {sorted(tensors)}"]
    table = tensors["prompt_embeddings"]
    num_prefix = _get(config, "num_virtual_tokens", int, None)
    problems = [f"{field}={config.get(field)} in the adapter, but this model has {value}"
                for field, value in (("num_layers", len(layers)), ("num_attention_heads", heads),
                                     ("token_dim", heads * head_dim))
                if config.get(field) not in (None, value)]
    expected = (num_prefix, len(layers) * 2 * heads * head_dim)
    if tuple(table.shape) != expected:
        problems.append(f"prompt_embeddings has shape {tuple(table.shape)}, but this model ({len(layers)} layers x 2 "
                        f"x {heads} kv heads x {head_dim} dims) needs {expected}")
    taken = [path_str(p) for p, m in layers if m.kv_prefix is not None]
    if taken:
        problems.append(f"these attention modules already have a prefix (metafit.peft.remove_peft first): {taken}")
    if problems:
        return [], problems
    values = table.reshape(num_prefix, len(layers), 2, heads, head_dim).astype(np.float32)
    edits = []
    for i, (_, attention) in enumerate(layers):
        prefix = KVPrefix(num_prefix, heads, head_dim, weights={
            "prefix_k": rotate_prefix_keys(model, values[:, i, 0], -num_prefix), "prefix_v": values[:, i, 1]})
        edits.append(functools.partial(_set_prefix, attention, prefix))
    return edits, problems


_PLANS = {"LORA": _plan_modules, "IA3": _plan_modules, "BEFT": _plan_modules, "PREFIX_TUNING": _plan_prefix}


def load_hf_peft(model: nnx.Module, folder, *, allow_pickle: bool = False,
                 module_name: Callable[[str], str] | None = None, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Adds an adapter saved by the ``peft`` library (or :func:`export_hf_peft`) to ``model``, in place.

    Args:
      model: a metafit model of the adapter's base model (e.g. from :func:`metafit.models.load`). PEFT modules
        already in it stay; the new wrappers go around the base layers (they stack).
      folder: the adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``.
      allow_pickle: also read a pickled ``adapter_model.bin`` (unpickling can run code; refused by default).
      module_name: maps a metafit module path to its HF module name (default: as :func:`export_hf_peft`).
      rngs: for the LoRA dropout stream (``lora_dropout > 0``); default ``nnx.Rngs(0)``. Dropout applies in
        :func:`metafit.train.fit`'s training steps only (see :func:`metafit.peft.dropout_enabled`).

    Returns:
      ``model``, now with gated PEFT modules (gate 1) holding the adapter's weights.

    Raises:
      FileNotFoundError: no folder, no ``adapter_config.json``, or no weights file.
      ValueError: a pickle without ``allow_pickle``; an unknown peft field or one metafit cannot honour
        (named); an adapter for another base model (modules and shapes named). The model is unchanged.

    Example:
      >>> model, tok = metafit.models.load("base-model/")                       # doctest: +SKIP
      >>> metafit.peft.load_hf_peft(model, "lora-adapter/").eval()              # doctest: +SKIP
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    peft_type = _peft_type(config)
    check_fields(config, peft_type, loading=True)
    tensors = _read_tensors(folder, allow_pickle)
    if not tensors:
        raise ValueError(f"{folder / WEIGHTS_FILE} holds no tensors")
    edits, problems = _PLANS[peft_type](model, peft_type, config, tensors,
                                        module_name or default_module_name(model), rngs or nnx.Rngs(0))
    problems = list(dict.fromkeys(problems))  # e.g. one bad config value, reported once not per module
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"the {peft_type} adapter in {folder} does not fit this {type(model).__name__} (saved for "
                         f"base model {config.get('base_model_name_or_path')!r}?); the model is unchanged:\n  {shown}")
    for edit in edits:
        edit()
    return model
