"""Merge methods: per-tensor merge rules, their presets, and pytree-level merging.

A :class:`MergeMethod` is a per-tensor rule ``merge_tensor(base, models, params, key)``
plus a description of its hyperparameters (per-model ones such as ``weight`` and
``density``, shared ones such as ``scale``). The rules built from
:mod:`metafit.merge.parts` (sparsify -> elect sign -> combine) are the
"generalised task arithmetic" family; presets are registered by name in
``MERGE_METHODS`` (``metafit list`` shows them):

=================  ===========  ======  ==============  ==========================================
preset             sparsify     elect   combine         reference
=================  ===========  ======  ==============  ==========================================
task_arithmetic    none         none    sum             Ilharco et al. 2023
ties               magnitude    sum     disjoint mean   Yadav et al. 2023
dare_linear        random       none    sum             Yu et al. 2024 (DARE)
dare_ties          random       sum     disjoint mean   Yu et al. 2024 (DARE on TIES)
breadcrumbs        breadcrumbs  none    sum             Davari & Belilovsky 2024
breadcrumbs_ties   breadcrumbs  sum     disjoint mean
ties_sum           magnitude    sum     sum             (mergekit's ties with normalize: false)
dare_ties_sum      random       sum     sum             (mergekit's dare_ties default)
breadcrumbs_ties_sum breadcrumbs sum    sum             (mergekit's breadcrumbs_ties default)
linear             weighted average of the models (no base)
slerp              spherical interpolation of two models, per tensor
model_stock        Jang et al. 2024: θ = t·mean(θ_m) + (1−t)·θ_base, t = M cosθ / (1 + (M−1) cosθ)
fisher             Matena & Raffel 2022: θ = Σ w_m F_m θ_m / Σ w_m F_m (diagonal Fisher)
=================  ===========  ======  ==============  ==========================================

All task-arithmetic presets end with ``θ = θ_base + scale · δ``. Tensors are merged
in float32 and cast back to the dtype of the base (first model when there is no base).
Non-floating leaves (step counters, RNG state) are copied from the base, and so is every tensor
that no model changed (:func:`merge_tensor`).

Each tensor is merged by one jitted program (compiled once per method, shape and
sharding), so merges run on sharded parameters as they are (the output keeps GSPMD's
sharding), and the same program streams over safetensors files in
:mod:`metafit.merge.stream`.
Random methods (DARE) draw each tensor's mask from ``fold_in(key, crc32(name))``,
so a tensor's mask depends on its name only: in-memory and streamed merges agree.

Example:
    >>> merged = ties(base, [ft_a, ft_b], density=0.2, scale=1.0)
    >>> merged = merge("dare_ties", base, [ft_a, ft_b], drop_rate=0.9, key=jax.random.key(0))
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metafit.merge import parts
from metafit.registry import Registry, did_you_mean
from metafit.tree import path_name

Array = jax.Array
PyTree = Any


class MergeError(ValueError):
    """Inputs to a merge are inconsistent; the message names the tensor or parameter."""


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A per-tensor merge rule and its hyperparameters.

    Attributes:
      name: registry name.
      merge_tensor: ``(base [*s] | None, [model [*s]] * M, params, key) -> [*s]``, float32.
      needs_base: the rule uses a base model (task vectors are ``θ_m − θ_base``).
      min_models / max_models: how many (non-base) models the rule accepts.
      per_model: ``(name, default)`` of hyperparameters given once per model.
      shared: ``(name, default)`` of hyperparameters given once per merge.
      needs_key: the rule is random (needs ``key=``).
      tensor_inputs: per-model tensors the rule needs beside the weights (``fisher``).
      prepare: host-side ``(size, params) -> params`` turning fractions into counts.
      copies_unchanged: the rule's merge of tensors that all equal the reference is the reference
        (true of every preset, :func:`merge_tensor`), so such tensors are copied without compiling.
        False by default: a user's rule is always run.
    """

    name: str
    merge_tensor: Callable[..., Array]
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    per_model: tuple[tuple[str, float], ...] = (("weight", 1.0),)
    shared: tuple[tuple[str, Any], ...] = (("scale", 1.0),)
    needs_key: bool = False
    tensor_inputs: tuple[str, ...] = ()
    prepare: Callable[[int, Mapping[str, Any]], dict[str, Any]] | None = None
    copies_unchanged: bool = False

    @property
    def param_names(self) -> list[str]:
        return [name for name, _ in self.per_model + self.shared]


MERGE_METHODS: Registry[MergeMethod] = Registry("merge-method")


# ----------------------------------------------------------------------------- rules


def general_task_arithmetic(sparsify: str, elect: str, combine: str) -> Callable[..., Array]:
    """Builds the per-tensor rule ``θ_base + scale · combine(elect(sparsify(θ_m − θ_base)))``.

    Args:
      sparsify: one of ``parts.SPARSIFIERS``.
      elect: ``'none' | 'sum' | 'count'``.
      combine: ``'sum' | 'mean' | 'disjoint_mean'``.
    """
    if sparsify not in parts.SPARSIFIERS:
        raise MergeError(f"unknown sparsifier '{sparsify}'; valid: {', '.join(parts.SPARSIFIERS)}")
    elect_fn, combine_fn = parts.ELECTIONS[elect], parts.COMBINERS[combine]

    def rule(base, models, params, key):
        deltas = [m - base for m in models]
        if sparsify == "magnitude":
            deltas = [parts.sparsify_magnitude(d, k) for d, k in zip(deltas, params["k_keep"])]
        elif sparsify == "breadcrumbs":
            deltas = [parts.sparsify_breadcrumbs(d, k, top)
                      for d, k, top in zip(deltas, params["k_keep"], params["k_top"])]
        elif sparsify == "random":
            keys = jax.random.split(key, len(deltas))
            deltas = [parts.sparsify_random(d, p, k) for d, p, k in zip(deltas, params["drop_rate"], keys)]
        weights = params["weight"]
        agree = None
        if elect_fn is not None:
            agree = parts.agreement(deltas, elect_fn([w * d for w, d in zip(weights, deltas)]))
        return base + params["scale"] * combine_fn(deltas, weights, agree)

    return rule


def _prepare_counts(size: int, params: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(params)
    if "density" in params:
        out["k_keep"] = np.array([parts.keep_count(d, size) for d in params["density"]], np.int32)
    if "gamma" in params:
        out["k_top"] = np.array([int(g * size) for g in params["gamma"]], np.int32)
    out.pop("density", None)
    out.pop("gamma", None)
    return out


def _linear_rule(base, models, params, key):
    # resolve_params has already divided the weights by their sum when normalize is set.
    return parts.combine_sum(models, params["weight"])


def slerp_tensor(a: Array, b: Array, t: Array | float, eps: float = 1e-8) -> Array:
    """Spherical linear interpolation of two tensors viewed as flat vectors.

    With ``cos Ω = <a, b> / (|a| |b|)``:
    ``slerp(a, b, t) = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b``, falling back to
    linear interpolation when the vectors are nearly colinear (``|cos Ω| > 0.9995``),
    as in mergekit. ``t = 0`` gives ``a`` and ``t = 1`` gives ``b`` exactly.
    """
    cos = jnp.sum(a * b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), eps)
    colinear = jnp.abs(cos) > 0.9995
    omega = jnp.arccos(jnp.clip(jnp.where(colinear, 0.0, cos), -1.0, 1.0))
    sin_omega = jnp.sin(omega)
    spherical = (jnp.sin((1.0 - t) * omega) * a + jnp.sin(t * omega) * b) / sin_omega
    merged = jnp.where(colinear, (1.0 - t) * a + t * b, spherical)
    # XLA may rewrite the division as a reciprocal multiply; pin the endpoints exactly.
    return jnp.where(t == 0.0, a, jnp.where(t == 1.0, b, merged))


def _slerp_rule(base, models, params, key):
    return slerp_tensor(models[0], models[1], params["t"])


def _model_stock_rule(base, models, params, key):
    count = len(models)
    offsets = [(m - base).reshape(-1) for m in models]
    norms = [jnp.linalg.norm(o) for o in offsets]
    cosines = [
        jnp.clip(jnp.dot(offsets[i], offsets[j]) / jnp.maximum(norms[i] * norms[j], 1e-6), -1.0, 1.0)
        for i in range(count) for j in range(i + 1, count)
    ]
    cos = jnp.mean(jnp.stack(cosines))
    denominator = 1.0 + (count - 1) * cos
    # At the singularity (opposing updates) keep the base rather than amplify.
    ratio = jnp.where(jnp.abs(denominator) < 1e-6, 0.0, count * cos / jnp.where(jnp.abs(denominator) < 1e-6, 1.0, denominator))
    return ratio * (sum(models) / count) + (1.0 - ratio) * base


def _fisher_rule(base, models, params, key):
    weighted = [w * (f + params["fisher_floor"]) for w, f in zip(params["weight"], params["fisher"])]
    return sum(w * m for w, m in zip(weighted, models)) / sum(weighted)


_TA_SHARED = (("scale", 1.0),)
_PRESETS = [
    MergeMethod("task_arithmetic", general_task_arithmetic("none", "none", "sum")),
    MergeMethod("ties", general_task_arithmetic("magnitude", "sum", "disjoint_mean"),
                per_model=(("weight", 1.0), ("density", 0.2)), prepare=_prepare_counts),
    MergeMethod("dare_linear", general_task_arithmetic("random", "none", "sum"),
                per_model=(("weight", 1.0), ("drop_rate", 0.9)), needs_key=True),
    MergeMethod("dare_ties", general_task_arithmetic("random", "sum", "disjoint_mean"),
                per_model=(("weight", 1.0), ("drop_rate", 0.9)), needs_key=True),
    MergeMethod("breadcrumbs", general_task_arithmetic("breadcrumbs", "none", "sum"),
                per_model=(("weight", 1.0), ("density", 0.143), ("gamma", 0.007)), prepare=_prepare_counts),
    MergeMethod("breadcrumbs_ties", general_task_arithmetic("breadcrumbs", "sum", "disjoint_mean"),
                per_model=(("weight", 1.0), ("density", 0.143), ("gamma", 0.007)), prepare=_prepare_counts),
    # Sign election without the disjoint mean: mergekit's ties / dare_ties / breadcrumbs_ties with normalize: false.
    MergeMethod("ties_sum", general_task_arithmetic("magnitude", "sum", "sum"),
                per_model=(("weight", 1.0), ("density", 0.2)), prepare=_prepare_counts),
    MergeMethod("dare_ties_sum", general_task_arithmetic("random", "sum", "sum"),
                per_model=(("weight", 1.0), ("drop_rate", 0.9)), needs_key=True),
    MergeMethod("breadcrumbs_ties_sum", general_task_arithmetic("breadcrumbs", "sum", "sum"),
                per_model=(("weight", 1.0), ("density", 0.143), ("gamma", 0.007)), prepare=_prepare_counts),
    MergeMethod("linear", _linear_rule, needs_base=False, shared=(("normalize", False),)),
    MergeMethod("slerp", _slerp_rule, needs_base=False, min_models=2, max_models=2, per_model=(),
                shared=(("t", 0.5),)),
    MergeMethod("model_stock", _model_stock_rule, min_models=2, per_model=(), shared=()),
    MergeMethod("fisher", _fisher_rule, needs_base=False, shared=(("fisher_floor", 1e-8),),
                tensor_inputs=("fisher",)),
]
for _method in _PRESETS:
    MERGE_METHODS.register(_method.name, dataclasses.replace(_method, copies_unchanged=True))


# ----------------------------------------------------------------------------- parameters


def resolve_params(method: MergeMethod, num_models: int, params: Mapping[str, Any]) -> dict[str, Any]:
    """Fills defaults, broadcasts per-model scalars to tuples of length M and validates.

    Raises:
      MergeError: unknown parameter, wrong count, density outside (0, 1], drop rate outside
        [0, 1), linear weights that do not sum to 1 (without ``normalize``), ``t`` outside [0, 1].
    """
    valid = method.param_names
    for name in params:
        if name not in valid:
            raise MergeError(
                f"unknown parameter '{name}' for merge method '{method.name}';"
                f"{did_you_mean(name, valid)} valid: {', '.join(valid) or '(none)'}"
            )
    if num_models < method.min_models or (method.max_models and num_models > method.max_models):
        want = method.min_models if method.max_models == method.min_models else f">= {method.min_models}"
        raise MergeError(f"merge method '{method.name}' needs {want} models, got {num_models}")
    out: dict[str, Any] = {}
    for name, default in method.per_model:
        value = params.get(name, default)
        if name == "weight" and method.name == "linear" and name not in params:
            value = 1.0 / num_models
        values = tuple(float(v) for v in value) if isinstance(value, (list, tuple, np.ndarray)) else (float(value),) * num_models
        if len(values) != num_models:
            raise MergeError(f"'{name}' has {len(values)} values but there are {num_models} models")
        for v in values:
            _check_value(method.name, name, v)
        out[name] = values
    for name, default in method.shared:
        out[name] = params.get(name, default)
        if not isinstance(out[name], bool):
            _check_value(method.name, name, float(out[name]))
    if method.name == "linear" and not out["normalize"] and abs(sum(out["weight"]) - 1.0) > 1e-6:
        raise MergeError(
            f"linear merge weights {list(out['weight'])} sum to {sum(out['weight']):.6g}, not 1; "
            "give weights that sum to 1 or set normalize: true"
        )
    if out.pop("normalize", False):
        total = sum(out["weight"])
        if abs(total) < 1e-12:
            raise MergeError(f"{method.name}: weights sum to 0 and cannot be normalised")
        out["weight"] = tuple(w / total for w in out["weight"])
    if "density" in out and "gamma" in out:
        for d, g in zip(out["density"], out["gamma"]):
            if d + g > 1.0 + 1e-9:
                raise MergeError(f"breadcrumbs needs density + gamma <= 1, got {d} + {g}")
    return out


def _check_value(method: str, name: str, value: float) -> None:
    if not math.isfinite(value):
        raise MergeError(f"{method}: '{name}' must be finite, got {value}")
    bad = {
        "density": not 0.0 < value <= 1.0,
        "drop_rate": not 0.0 <= value < 1.0,
        "gamma": not 0.0 <= value < 1.0,
        "t": not 0.0 <= value <= 1.0,
        "fisher_floor": value < 0.0,
    }.get(name, False)
    if bad:
        ranges = {"density": "(0, 1]", "drop_rate": "[0, 1)", "gamma": "[0, 1)", "t": "[0, 1]", "fisher_floor": ">= 0"}
        raise MergeError(f"{method}: '{name}' must be in {ranges[name]}, got {value}")


def device_params(prepared: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as numpy arrays: they enter the jitted merge as data, so new values do not recompile."""
    out = {}
    for name, value in prepared.items():
        if isinstance(value, tuple):
            out[name] = np.asarray(value, np.float32)
        elif isinstance(value, np.ndarray):
            out[name] = value
        else:
            out[name] = np.float32(value)
    return out


def tensor_key(key: Array | None, name: str) -> Array | None:
    """The per-tensor key ``fold_in(key, crc32(name))`` (independent of tree order)."""
    if key is None:
        return None
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def merge_one(method: MergeMethod, base: Array | None, models: Sequence[Array], params: Mapping[str, Any],
              key: Array | None, tensors: Mapping[str, Sequence[Array]] | None = None) -> Array:
    """Merges one tensor (traceable). Float32 maths, result in the reference dtype."""
    reference = base if base is not None else models[0]
    if not jnp.issubdtype(reference.dtype, jnp.floating):
        return reference
    models32 = [jnp.asarray(m, jnp.float32) for m in models]
    params = dict(params)
    for name, values in (tensors or {}).items():
        params[name] = [jnp.asarray(v, jnp.float32) for v in values]
    base32 = None if base is None else jnp.asarray(base, jnp.float32)
    return method.merge_tensor(base32, models32, params, key).astype(reference.dtype)


# ----------------------------------------------------------------------------- pytrees


def _flatten(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_name(p) for p, _ in with_paths], [leaf for _, leaf in with_paths], treedef


def check_compatible(reference: PyTree, others: Sequence[PyTree], what: str = "model") -> None:
    """Raises :class:`MergeError` naming the first tensor whose name or shape differs."""
    names, leaves, _ = _flatten(reference)
    for index, other in enumerate(others):
        other_names, other_leaves, _ = _flatten(other)
        for name, other_name in zip(names, other_names):
            if name != other_name:
                raise MergeError(f"{what} {index} has tensor '{other_name}' where the reference has '{name}' "
                                 "(different architectures cannot be merged)")
        if len(names) != len(other_names):
            longer = names if len(names) > len(other_names) else other_names
            raise MergeError(f"{what} {index} has {len(other_names)} tensors, the reference {len(names)}; "
                             f"first unmatched tensor: '{longer[min(len(names), len(other_names))]}'")
        for name, leaf, other_leaf in zip(names, leaves, other_leaves):
            if jnp.shape(leaf) != jnp.shape(other_leaf):
                raise MergeError(f"tensor '{name}' has shape {tuple(jnp.shape(other_leaf))} in {what} {index} "
                                 f"but {tuple(jnp.shape(leaf))} in the reference")


def get_method(method: str | MergeMethod) -> MergeMethod:
    return method if isinstance(method, MergeMethod) else MERGE_METHODS.get(method)


def merge(method: str | MergeMethod, base: PyTree | None, finetuned: Sequence[PyTree], *,
          key: Array | None = None, **params: Any) -> PyTree:
    """Merges pytrees (dicts, ``nnx.State``, ...) tensor by tensor with a registered method.

    Args:
      method: a name in ``MERGE_METHODS`` (see the module table) or a :class:`MergeMethod`.
      base: the pre-trained pytree; ``None`` for methods without a base (linear, slerp, fisher).
      finetuned: the models to merge, each with the structure and shapes of ``base``.
      key: PRNG key for random methods (DARE).
      **params: hyperparameters: per-model ones take a scalar or one value per model
        (``weight``, ``density``, ``drop_rate``, ``gamma``), shared ones a scalar (``scale``, ``t``);
        ``fisher=[pytree, ...]`` for the Fisher merge.
    Returns:
      The merged pytree (structure and dtypes of the base / first model).
    """
    method = get_method(method)
    models = list(finetuned)
    tensor_inputs = {name: list(params.pop(name)) for name in method.tensor_inputs if name in params}
    for name in method.tensor_inputs:
        if name not in tensor_inputs:
            raise MergeError(f"merge method '{method.name}' needs {name}=[one pytree per model]")
    if method.needs_base and base is None:
        raise MergeError(f"merge method '{method.name}' needs a base model")
    if method.needs_key and key is None:
        raise MergeError(f"merge method '{method.name}' is random: pass key=jax.random.key(seed)")
    resolved = resolve_params(method, len(models), params)
    reference = base if method.needs_base else models[0]
    check_compatible(reference, models)
    for name, trees in tensor_inputs.items():
        if len(trees) != len(models):
            raise MergeError(f"'{name}' has {len(trees)} pytrees but there are {len(models)} models")
        check_compatible(reference, trees, what=name)
    names, ref_leaves, treedef = _flatten(reference)
    base_leaves = _flatten(base)[1] if method.needs_base else None
    model_leaves = [_flatten(m)[1] for m in models]
    input_leaves = {name: [_flatten(t)[1] for t in trees] for name, trees in tensor_inputs.items()}
    out = []
    for i, (name, leaf) in enumerate(zip(names, ref_leaves)):
        size = int(np.prod(jnp.shape(leaf)))
        prepared = device_params(method.prepare(size, resolved) if method.prepare else resolved)
        out.append(merge_tensor(
            method, None if base_leaves is None else base_leaves[i], [m[i] for m in model_leaves], prepared,
            tensor_key(key, name), {n: [t[i] for t in trees] for n, trees in input_leaves.items()},
        ))
    return jax.tree_util.tree_unflatten(treedef, out)


# One compiled program per (method, shape, dtype, sharding): a model's few distinct tensor shapes
# compile once and are reused by later merges, streamed or in memory, whatever the hyperparameters.
merge_tensor_jit = jax.jit(merge_one, static_argnums=(0,))


def merge_tensor(method: MergeMethod, base: Array | None, models: Sequence[Array], params: Mapping[str, Any],
                 key: Array | None, tensors: Mapping[str, Sequence[Array]] | None = None) -> Array:
    """:func:`merge_one`, compiled; a tensor that no model changed is copied, compiling nothing.

    When every model's tensor equals the reference's (the base's; the first model's for base-free
    methods), every method's merge is that tensor: each task vector is exactly 0 (``x − y = 0``
    exactly when ``x == y``), so the task-arithmetic presets give ``θ_base + scale · 0`` and
    model_stock's ratio is 0 (``θ_base``); linear, slerp and fisher average one tensor with weights
    summing to 1 (the kernel up to float rounding, the copy exactly). Embeddings and norms that no
    expert trained are most of an LM's tensors, and each shape would otherwise compile its own program.
    """
    copied = unchanged_tensor(method, base, models)
    return copied if copied is not None else merge_tensor_jit(method, base, models, params, key, tensors)


def unchanged_tensor(method: MergeMethod, base: Array | None, models: Sequence[Array]) -> Array | None:
    """A copy of the reference tensor when no model changed it (the merge of every method), else ``None``.

    The copy is the input itself, not a merge result: a streaming merge writes it as read, ±inf
    included (a causal-mask buffer stored as -inf), where the kernel would give ``inf - inf = NaN``.
    """
    reference = base if method.needs_base else models[0]
    if method.copies_unchanged and _unchanged(reference, models):
        return jax.device_put(reference, may_alias=False)  # a copy, like the kernel's output: never the input
    return None


def _unchanged(reference: Any, models: Sequence[Any]) -> bool:
    """Every model's tensor equals ``reference`` in value (host arrays compared on the host).

    A NaN equals nothing, so a tensor holding one is merged by the kernel, as before.
    """
    if any(isinstance(x, jax.core.Tracer) for x in (reference, *models)):
        return False  # values unknown while tracing: the kernel merges
    others = [m for m in models if m is not reference]
    if not others:
        return True
    if all(isinstance(x, np.ndarray) for x in (reference, *others)):
        return all(np.array_equal(reference, m) for m in others)
    if any(jnp.shape(m) != jnp.shape(reference) for m in others):
        return False
    return bool(_all_equal(reference, others))


@jax.jit
def _all_equal(reference: Array, models: Sequence[Array]) -> Array:
    """One program and one wait for all models (eager ``array_equal`` dispatched and synced per model)."""
    return jnp.all(jnp.stack([jnp.all(reference == m) for m in models]))


# ----------------------------------------------------------------------------- public presets


def task_vector(base: PyTree, finetuned: PyTree) -> PyTree:
    """``τ = θ_finetuned − θ_base`` leaf by leaf."""
    return jax.tree.map(lambda b, f: f - b, base, finetuned)


def apply_task_vector(base: PyTree, vector: PyTree, scale: float | Array = 1.0) -> PyTree:
    """``θ_base + scale · τ`` leaf by leaf (dtype of the base)."""
    return jax.tree.map(lambda b, t: (b + scale * t).astype(b.dtype), base, vector)


def task_arithmetic(base: PyTree, finetuned: Sequence[PyTree], scale: float = 1.0, *, weights=None) -> PyTree:
    """Task arithmetic: ``θ = θ_base + scale · Σ_m w_m (θ_m − θ_base)`` (Ilharco et al. 2023)."""
    return merge("task_arithmetic", base, finetuned, scale=scale, **_weights(weights))


def ties(base: PyTree, finetuned: Sequence[PyTree], density: float = 0.2, scale: float = 1.0, *,
         weights=None) -> PyTree:
    """TIES-merging (Yadav et al. 2023).

    Per tensor: keep each task vector's top-``density`` fraction of entries by magnitude
    (``max(1, ⌊density·n⌋)`` entries), elect each entry's sign ``s = sign(Σ_m τ̃_m)``, average the
    entries that agree with ``s`` (disjoint mean ``Σ_m [sign τ̃_m = s] τ̃_m / Σ_m [sign τ̃_m = s]``),
    scale and add to the base. With ``density = 1`` and no sign conflicts this is task arithmetic
    with ``scale / M``.
    """
    return merge("ties", base, finetuned, density=density, scale=scale, **_weights(weights))


def dare(base: PyTree, finetuned: Sequence[PyTree], drop_rate: float = 0.9, scale: float = 1.0, *,
         key: Array, weights=None) -> PyTree:
    """DARE (Yu et al. 2024) with task-arithmetic combination.

    Each entry of each task vector is dropped with probability ``p = drop_rate`` and survivors are
    rescaled by ``1/(1−p)``; then ``θ = θ_base + scale · Σ_m w_m τ̃_m``. ``p = 0`` is task arithmetic.
    """
    return merge("dare_linear", base, finetuned, drop_rate=drop_rate, scale=scale, key=key, **_weights(weights))


def dare_ties(base: PyTree, finetuned: Sequence[PyTree], drop_rate: float = 0.9, scale: float = 1.0, *,
              key: Array, weights=None) -> PyTree:
    """DARE sparsification followed by TIES sign election and disjoint mean."""
    return merge("dare_ties", base, finetuned, drop_rate=drop_rate, scale=scale, key=key, **_weights(weights))


def breadcrumbs(base: PyTree, finetuned: Sequence[PyTree], density: float = 0.143, gamma: float = 0.007,
                scale: float = 1.0, *, weights=None) -> PyTree:
    """Model Breadcrumbs (Davari & Belilovsky 2024): drop the top-``gamma`` outliers and all but the
    next ``density`` fraction of each task-vector tensor, then task arithmetic. The paper's
    β = 0.85, γ = 0.993 percentiles are ``density = 0.143, gamma = 0.007``."""
    return merge("breadcrumbs", base, finetuned, density=density, gamma=gamma, scale=scale, **_weights(weights))


def linear(models: Sequence[PyTree], weights: Sequence[float] | None = None) -> PyTree:
    """Weighted average ``Σ_m w_m θ_m``; ``weights`` must sum to 1 (default uniform)."""
    return merge("linear", None, models, **_weights(weights))


def slerp(a: PyTree, b: PyTree, t: float) -> PyTree:
    """Per-tensor spherical interpolation between two models (see :func:`slerp_tensor`)."""
    return merge("slerp", None, [a, b], t=t)


def model_stock(base: PyTree, finetuned: Sequence[PyTree]) -> PyTree:
    """Model Stock (Jang et al. 2024), per tensor, from the angle between task vectors."""
    return merge("model_stock", base, finetuned)


def fisher_merge(models: Sequence[PyTree], fishers: Sequence[PyTree], weights=None,
                 fisher_floor: float = 1e-8) -> PyTree:
    """Fisher-weighted average ``Σ_m w_m F_m θ_m / Σ_m w_m F_m`` (diagonal Fishers, floored)."""
    return merge("fisher", None, models, fisher=fishers, fisher_floor=fisher_floor, **_weights(weights))


def _weights(weights) -> dict[str, Any]:
    return {} if weights is None else {"weight": tuple(float(w) for w in weights)}
