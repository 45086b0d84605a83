"""The serve config: a validated frozen dataclass read from YAML (unknown keys fail, naming the key).

A config file is the :class:`ServeConfig` fields at top level; see
``configs/serve/smollm2_tasks.yaml`` for a documented one. ``--host``, ``--port`` and
``--api-key`` of ``metafit serve`` override the file (the API key is best given on the command
line or in ``METAFIT_API_KEY``, not in a committed file).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional

from metafit.config import ConfigError, from_dict, load_yaml
from metafit.serve.adapters import DEFAULT_TARGETS, rank_class

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    """One adapter to serve as ``<name>:<adapter name>``.

    Attributes:
      name: the adapter's name in the ``model`` field (letters, digits, ``_ . -``).
      path: an HF PEFT folder (``adapter_config.json``) or a metafit run folder holding exactly one
        adapter folder; relative paths are relative to the working directory.
      train: the command that produces ``path`` (printed when the folder does not exist yet).
    """

    name: str
    path: str
    train: str = ""


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """What ``metafit serve`` serves and how.

    Attributes:
      model: the base model: an embedded name, an HF folder or a GGUF file (as ``metafit.models.load``).
      name: the base model's name in requests; adapters are ``<name>:<adapter>``.
      adapters: adapters loaded at start (missing folders are skipped with a warning).
      targets: module path patterns given per-row LoRA slots (an adapter may target a subset).
      slots: slot counts per rank class (``{8: 4, 16: 8}``); empty = one per start-up adapter
        of each class plus ``spare_slots`` (and class 8 when there are none).
      spare_slots: free slots per class for adapters loaded while serving.
      batch_size: rows per forward (requests batched together).
      batch_window_ms: how long the first request of a batch waits for more.
      max_queue: waiting requests before 429 (Retry-After).
      prompt_buckets: padded prompt lengths (the longest is the prompt limit).
      new_token_buckets: padded generation lengths (the longest is the max_tokens limit).
      max_request_bytes: request bodies larger than this get 413.
      warm_up: compile every bucket pair before accepting requests.
      dtype: parameter dtype (``float32``, ``bfloat16``).
      host, port: where to listen (loopback by default).
      api_key: if set, requests need ``Authorization: Bearer <key>`` (prefer ``--api-key``).
      seed: root of the per-request sampling keys.
    """

    model: str = "smollm2-135m-instruct"
    name: str = "smollm2"
    adapters: tuple[AdapterEntry, ...] = ()
    targets: tuple[str, ...] = DEFAULT_TARGETS
    slots: dict[str, int] = dataclasses.field(default_factory=dict)
    spare_slots: int = 2
    batch_size: int = 8
    batch_window_ms: float = 5.0
    max_queue: int = 64
    prompt_buckets: tuple[int, ...] = (64, 256)
    new_token_buckets: tuple[int, ...] = (32, 128)
    max_request_bytes: int = 1_000_000
    warm_up: bool = True
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    seed: int = 0

    def slot_classes(self) -> dict[int, int]:
        """``slots`` with integer rank classes."""
        return {int(k): v for k, v in self.slots.items()}


def validate(config: ServeConfig) -> ServeConfig:
    """Checks values the types alone do not; raises :class:`ConfigError` naming the key."""
    if not _NAME.fullmatch(config.name):
        raise ConfigError(f"name: {config.name!r} must be letters, digits, '_', '.', '-' (e.g. smollm2)")
    seen = set()
    for i, entry in enumerate(config.adapters):
        if not _NAME.fullmatch(entry.name):
            raise ConfigError(f"adapters[{i}].name: {entry.name!r} must be letters, digits, '_', '.', '-'")
        if entry.name in seen:
            raise ConfigError(f"adapters[{i}].name: '{entry.name}' appears twice; adapter names must be unique")
        seen.add(entry.name)
    for key, value in config.slots.items():
        if not key.isdigit() or int(key) != rank_class(int(key)) or value < 1:
            raise ConfigError(f"slots.{key}: slot classes are powers of two >= 8 (8, 16, 32, ...) mapped to "
                              f"counts >= 1, got {key}: {value}")
    positive = {"batch_size": config.batch_size, "max_queue": config.max_queue, "port": config.port,
                "max_request_bytes": config.max_request_bytes}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if config.spare_slots < 0 or config.batch_window_ms < 0:
        raise ConfigError("spare_slots and batch_window_ms must be >= 0")
    for key in ("prompt_buckets", "new_token_buckets"):
        buckets = getattr(config, key)
        if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ConfigError(f"{key}: a non-empty increasing list of positive lengths, got {list(buckets)}")
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype: expected float32, bfloat16 or float16, got {config.dtype!r}")
    return config


def load_serve_config(path: str | Path, **overrides) -> ServeConfig:
    """Reads and validates a serve config file; ``overrides`` (non-None values) replace its fields."""
    config = from_dict(ServeConfig, load_yaml(path))
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    return validate(config)


__all__ = ["AdapterEntry", "ServeConfig", "load_serve_config", "validate"]
