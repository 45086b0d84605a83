"""Streaming merges over safetensors folders: one tensor in memory at a time.

For each tensor name (in the base's file order) the base and the models' tensors are
read from disk, merged by the jitted per-tensor rule of the method (the same
:func:`metafit.merge.methods.merge_tensor` that pytree merges use, with the same
per-tensor keys; a tensor no model changed is copied), and appended to the output
file. Peak memory is about ``(M + 3) ×`` the largest tensor, whatever the model size.
Dispatch is asynchronous: tensor ``i + 1`` is read and dispatched before tensor ``i`` is
written, so reading, merging and writing overlap.
"""
from __future__ import annotations

import fnmatch
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np

from metafit.merge import io
from metafit.merge.methods import (MergeError, MergeMethod, device_params, get_method, merge_tensor_jit, resolve_params,
                                   tensor_key, unchanged_tensor)


def check_folders(reference: io.SafetensorsFolder, others: Sequence[io.SafetensorsFolder], what: str = "model") -> None:
    """Raises :class:`MergeError` naming the first tensor missing or shaped differently."""
    names = reference.names()
    for index, other in enumerate(others):
        extra = [n for n in other.names() if n not in reference]
        for name in names:
            if name not in other:
                raise MergeError(f"tensor '{name}' of {reference.path} is missing in {what} {index} ({other.path}); "
                                 "different architectures cannot be merged")
            if other.shape(name) != reference.shape(name):
                raise MergeError(f"tensor '{name}' has shape {other.shape(name)} in {what} {index} ({other.path}) "
                                 f"but {reference.shape(name)} in {reference.path}")
        if extra:
            raise MergeError(f"tensor '{extra[0]}' of {what} {index} ({other.path}) is not in {reference.path}")


def _finite(name: str, result: Any, merged: bool, dtype: np.dtype) -> np.ndarray:
    """``result`` in its output dtype; a merged tensor (or a copy that the dtype overflowed) must be finite.

    Raises:
      MergeError: naming the tensor (the writer then drops its partial file: nothing is written).
    """
    array = np.asarray(result)
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(array, dtype=dtype)
    if not (np.issubdtype(dtype, np.floating) or dtype == np.dtype(ml_dtypes.bfloat16)):
        return out
    finite = np.isfinite(out.astype(np.float64))
    if not finite.all() and (merged or np.isfinite(array.astype(np.float64)).all()):
        bad = int(np.size(out) - finite.sum())
        raise MergeError(f"merged tensor '{name}' has {bad} non-finite values (inf or NaN) in {dtype}: the merge "
                         "parameters (e.g. scale) or the inputs overflow; nothing was written")
    return out


def merge_folders(
    method: str | MergeMethod,
    base: str | Path | None,
    models: Sequence[str | Path],
    out_file: str | Path,
    *,
    params: Mapping[str, Any] | None = None,
    rules: Sequence[tuple[str, Mapping[str, Any] | None]] = (),
    key: jax.Array | None = None,
    dtype: np.dtype | None = None,
    fishers: Sequence[str | Path] | None = None,
    on_tensor: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Merges safetensors checkpoints tensor by tensor into ``out_file``.

    Args:
      method: merge-method name or :class:`MergeMethod`.
      base: base folder/file (``None`` for base-free methods).
      models: model folders/files.
      out_file: output ``.safetensors`` path.
      params: hyperparameters as for :func:`metafit.merge.merge`.
      rules: per-tensor overrides ``[(glob, params_or_None), ...]``; the first glob that matches a
        tensor name applies; ``None`` copies the base tensor (first model without a base).
      key: PRNG key for random methods.
      dtype: output dtype (default: the dtype of each reference tensor).
      fishers: one diagonal-Fisher file/folder per model for ``method='fisher'``.
      on_tensor: progress callback ``(index, total, name)``.
    Returns:
      ``{"tensors": n, "seconds": s, "bytes": b}``.
    """
    method = get_method(method)
    if method.needs_base and base is None:
        raise MergeError(f"merge method '{method.name}' needs a base model")
    if method.needs_key and key is None:
        raise MergeError(f"merge method '{method.name}' is random: pass key=")
    model_views = [io.SafetensorsFolder(p) for p in models]
    base_view = io.SafetensorsFolder(base) if base is not None else None
    reference = base_view if method.needs_base else model_views[0]
    check_folders(reference, model_views)
    tensor_views: dict[str, list[io.SafetensorsFolder]] = {}
    if "fisher" in method.tensor_inputs:
        if not fishers or len(fishers) != len(model_views):
            raise MergeError(f"merge method '{method.name}' needs one Fisher file per model")
        tensor_views["fisher"] = [io.SafetensorsFolder(p) for p in fishers]
        check_folders(reference, tensor_views["fisher"], what="fisher")
    shared = dict(params or {})
    resolved_default = resolve_params(method, len(model_views), shared)
    resolved_rules = [(glob, None if over is None else resolve_params(method, len(model_views), {**shared, **over}))
                      for glob, over in rules]

    names = reference.names()
    layout = [(n, np.dtype(dtype) if dtype is not None and np.issubdtype(reference.dtype(n), np.floating)
               else reference.dtype(n), reference.shape(n)) for n in names]
    out_dtypes = {n: d for n, d, _ in layout}
    start = time.perf_counter()
    pending: tuple[str, Any, bool] | None = None
    with io.SafetensorsWriter(out_file, layout) as writer:
        for index, name in enumerate(names):
            resolved = resolved_default
            for glob, rule_params in resolved_rules:
                if fnmatch.fnmatchcase(name, glob):
                    resolved = rule_params
                    break
            if resolved is None:
                result = reference.read(name)
                merged = False
            else:
                base_tensor = base_view.read(name) if method.needs_base else None
                model_tensors = [view.read(name) for view in model_views]
                result = unchanged_tensor(method, base_tensor, model_tensors)
                merged = result is None  # a copy is the input as read: only a merge result must be finite
                if merged:
                    size = int(np.prod(reference.shape(name), dtype=np.int64))
                    prepared = device_params(method.prepare(size, resolved) if method.prepare else resolved)
                    result = merge_tensor_jit(method, base_tensor, model_tensors, prepared, tensor_key(key, name),
                                              {n: [v.read(name) for v in views] for n, views in tensor_views.items()})
            if pending is not None:
                writer.write(pending[0], _finite(*pending, out_dtypes[pending[0]]))
            pending = (name, result, merged)
            if on_tensor is not None:
                on_tensor(index, len(names), name)
        if pending is not None:
            writer.write(pending[0], _finite(*pending, out_dtypes[pending[0]]))
    return {"tensors": len(names), "seconds": time.perf_counter() - start, "bytes": Path(out_file).stat().st_size}
