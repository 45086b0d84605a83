"""``metafit export RUN_DIR --out DIR``: a run's trained model as an HF folder transformers loads.

A run folder holds its trained model in one of two forms, both found here without the
experiment's code:

* an adapter in the HF PEFT format (``adapter/``: ``adapter_config.json`` +
  ``adapter_model.safetensors``, e.g. from ``lora_sft``), whose ``base_model_name_or_path``
  names the base model (a folder, a GGUF file or an embedded name, as :func:`metafit.models.load`
  takes; ``base=`` overrides it). Exported **merged** (``W + BA`` folded into the base weights:
  one plain HF model) or **kept** (the base model's folder plus ``adapter/`` beside it, for
  ``peft.PeftModel.from_pretrained``);
* HF model folders (``config.json`` + weights, e.g. ``merged/ties`` of ``merge_lm`` or a
  small-LM build), re-saved with the requested shard size and dtype.

When a run holds several models, ``model=`` (``--model``) picks one by its path in the run
folder; the error lists them. Weights over ``max_shard_size`` are split into safetensors shards
with an index, as transformers writes them (:func:`metafit.models.save`).

The output folder must be new or empty: it is written under a temporary name beside it and
renamed when complete, so an interrupted export leaves nothing that looks finished.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

ADAPTER_FILE = "adapter_config.json"


class ExportError(ValueError):
    """A run folder or an output folder cannot be exported as asked; the message says what to do."""


def exportable_models(run_dir: str | Path) -> dict[str, str]:
    """``{path in the run folder: "adapter" | "model"}`` for each model the run holds (two levels deep)."""
    run_dir = Path(run_dir)
    found: dict[str, str] = {}
    for folder in sorted(p for pattern in ("*", "*/*") for p in run_dir.glob(pattern)):
        if folder.is_symlink() or not folder.is_dir() or folder.name.startswith("."):
            continue
        relative = folder.relative_to(run_dir).as_posix()
        if relative.split("/")[0] in ("checkpoints", "tensorboard"):
            continue
        if (folder / ADAPTER_FILE).is_file():
            found[relative] = "adapter"
        elif (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            found[relative] = "model"
    return found


def export_run(run_dir: str | Path, out: str | Path, *, merge: bool = True, model: str | None = None,
               base: str | None = None, max_shard_size: int | str | None = "5GB",
               dtype: str | None = None) -> dict[str, Any]:
    """Writes the trained model of ``run_dir`` to ``out`` as an HF folder; returns a summary.

    Args:
      run_dir: a metafit run folder.
      out: a new or empty folder.
      merge: fold an adapter into the base weights (else write the base folder with ``adapter/``).
      model: which model of the run, by its path in the run folder (needed when there are several).
      base: the adapter's base model, overriding its ``base_model_name_or_path``.
      max_shard_size: shard limit (bytes or ``"5GB"``); ``None`` writes one file.
      dtype: cast the weights on disk (e.g. ``"bfloat16"``).

    Raises:
      ExportError: not a run folder, no or several models without ``model=``, an output folder
        that is a file or not empty, a base model that cannot be found.
    """
    from metafit import models, peft
    from metafit.models.loading import parse_size

    run_dir, out = Path(run_dir), Path(out)
    if max_shard_size is not None:
        parse_size(max_shard_size)  # a bad size fails before any loading
    source, kind = _pick_model(run_dir, model)
    _check_output(out, source)
    if kind == "adapter":
        base_name = base or _adapter_base(source)
        try:
            network, tokenizer = models.load(base_name)
        except FileNotFoundError as err:
            raise ExportError(f"cannot load the adapter's base model {base_name!r} ({err}); pass the base model "
                              "with --base (a folder, a GGUF file or an embedded name)") from err
        if merge:
            peft.merge_all(peft.load_hf_peft(network, source))
            _check_all_merged(network, source)
    else:
        network, tokenizer = models.load(source)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        models.save(network, staging, tokenizer, dtype=dtype, max_shard_size=max_shard_size)
        if kind == "adapter" and not merge:
            shutil.copytree(source, staging / "adapter", symlinks=False)
        if out.is_dir():
            out.rmdir()  # checked empty above
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    return {"source": source.relative_to(run_dir).as_posix(), "kind": kind, "merged": kind == "adapter" and merge,
            "out": str(out), "weight_files": weights}


def _pick_model(run_dir: Path, model: str | None) -> tuple[Path, str]:
    if not run_dir.is_dir() or not ((run_dir / ".metafit-run").exists() or (run_dir / "config.yaml").exists()):
        raise ExportError(f"{run_dir} is not a metafit run folder (no .metafit-run or config.yaml)")
    found = exportable_models(run_dir)
    if model is not None:
        key = Path(model).as_posix().strip("/")
        if key not in found:
            listed = ", ".join(found) or "none"
            raise ExportError(f"{run_dir} has no model at {model!r}; models in this run: {listed}")
        return run_dir / key, found[key]
    if not found:
        raise ExportError(f"{run_dir} holds no exportable model: no adapter folder (adapter_config.json) and no HF "
                          "folder (config.json + safetensors). Runs that save their model (lora_sft, merge_lm, "
                          "pretrain_small_lm) can be exported; for others, save a model from the checkpoint first")
    if len(found) > 1:
        raise ExportError(f"{run_dir} holds {len(found)} models ({', '.join(found)}): pick one with --model PATH")
    (key, kind), = found.items()
    return run_dir / key, kind


def _check_all_merged(network, adapter: Path) -> None:
    """A prefix (or another unmergeable adapter) would be dropped silently by ``save``: refuse instead."""
    from metafit.peft.core import PeftWrapper, iter_modules
    from metafit.peft.prefix import KVPrefix

    left = sorted({type(m).__name__ for _, m in iter_modules(network) if isinstance(m, (PeftWrapper, KVPrefix))})
    if left:
        raise ExportError(f"the adapter in {adapter} cannot be folded into the base weights ({', '.join(left)} "
                          "remain): export it kept beside the base model with --keep-adapter")


def _adapter_base(adapter: Path) -> str:
    from metafit.peft.hf_import import read_adapter_config

    name = read_adapter_config(adapter).get("base_model_name_or_path")
    if not name:
        raise ExportError(f"{adapter / ADAPTER_FILE} names no base_model_name_or_path: pass the base model with --base")
    return str(name)


def _check_output(out: Path, source: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"--out {out} is a file (or link), not a folder: choose a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {out} is not empty: choose a new or empty folder (nothing was written)")
    if out.resolve().is_relative_to(source.resolve()):
        raise ExportError(f"--out {out} is inside the model being exported ({source}): choose another folder")


__all__ = ["export_run", "exportable_models", "ExportError"]
