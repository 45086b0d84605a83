"""The fine-tuning search space: a declared, validated config section, and how points are encoded.

A point is a plain ``dict`` of the space's fields (``lr``, ``rank``, ...). The surrogates see it
encoded in ``[0, 1]^d``: a range maps linearly (log-linearly when ``log``) onto ``[0, 1]``, a
choice becomes a one-hot vector. ``version`` names the space; a meta-dataset records the version
it was generated with and refuses to serve another one.

The PEFT family is a generic field: ``peft: [lora, ia3]`` picks among :data:`metafit.peft`'s
methods; ``rank``, ``alpha``, ``dropout`` and ``targets`` apply to LoRA (IA3 uses ``targets`` only).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Range:
    """A continuous interval ``[low, high]``, sampled log-uniformly when ``log``."""

    low: float
    high: float
    log: bool = False

    def check(self, name: str) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"space.{name}: bounds must be finite, got [{self.low}, {self.high}]")
        if not self.low < self.high:
            raise ValueError(f"space.{name}: the range [{self.low}, {self.high}] is empty or inverted; "
                             "give low < high (use a one-value choice list to fix a setting)")
        if self.log and self.low <= 0:
            raise ValueError(f"space.{name}: a log range needs low > 0, got {self.low}")

    def to_unit(self, value: float) -> float:
        lo, hi, v = (np.log(self.low), np.log(self.high), np.log(value)) if self.log else (self.low, self.high, value)
        return float((v - lo) / (hi - lo))

    def from_unit(self, u: float) -> float:
        lo, hi = (np.log(self.low), np.log(self.high)) if self.log else (self.low, self.high)
        v = lo + float(u) * (hi - lo)
        return float(np.exp(v)) if self.log else float(v)


def _choice_key(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Which fine-tuning settings ``metafit tune`` and the meta-dataset explore.

    Attributes:
      version: the space's name; meta-datasets generated over another version are refused.
      lr: peak learning rate (``train.lr``).
      weight_decay: AdamW weight decay (``train.weight_decay``).
      warmup: warm-up as a fraction of the steps (``train.warmup_steps = round(warmup * steps)``).
      dropout: LoRA dropout.
      steps: optimiser steps of a full run (choices; each a multiple of the number of fidelities).
      batch_size: examples per step (choices).
      rank: LoRA rank (choices).
      alpha: LoRA alpha (choices).
      targets: module patterns LoRA/IA3 wrap (choices, each a list of names).
      peft: PEFT family (choices among metafit.peft's methods: lora, dora, ia3).
      fidelities: points on a run's learning curve, at ``k / fidelities`` of its steps.
      default: the default configuration (the "default" baseline and the first trial of a tune).
    """

    version: str = "small-lm-v1"
    lr: Range = Range(1e-4, 5e-2, log=True)
    weight_decay: Range = Range(0.0, 0.1)
    warmup: Range = Range(0.0, 0.25)
    dropout: Range = Range(0.0, 0.2)
    steps: tuple[int, ...] = (16, 32, 48)
    batch_size: tuple[int, ...] = (8, 16)
    rank: tuple[int, ...] = (2, 4, 8, 16)
    alpha: tuple[float, ...] = (4.0, 16.0, 32.0)
    targets: tuple[tuple[str, ...], ...] = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                                            ("q_proj", "v_proj", "up_proj", "down_proj"))
    peft: tuple[str, ...] = ("lora", "ia3")
    fidelities: int = 4
    default: dict[str, Any] = dataclasses.field(default_factory=lambda: {
        "lr": 1e-3, "weight_decay": 0.0, "warmup": 0.1, "dropout": 0.0, "steps": 32, "batch_size": 16,
        "rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"], "peft": "lora"})

    def __post_init__(self):
        for name in self.ranges():
            getattr(self, name).check(name)
        for name in self.choices():
            values = getattr(self, name)
            if not values:
                raise ValueError(f"space.{name}: the choice list is empty; give at least one value")
            if len({_choice_key(v) for v in values}) != len(values):
                raise ValueError(f"space.{name}: repeated choices {list(values)}")
        if self.fidelities < 1:
            raise ValueError(f"space.fidelities must be >= 1, got {self.fidelities}")
        bad_steps = [s for s in self.steps if s < self.fidelities or s % self.fidelities]
        if bad_steps:
            raise ValueError(f"space.steps {bad_steps}: each must be a positive multiple of space.fidelities="
                             f"{self.fidelities} so every fidelity is a whole step")
        for b in self.batch_size:
            if b < 1:
                raise ValueError(f"space.batch_size: choices must be >= 1, got {b}")
        unknown = sorted(set(self.peft) - {"lora", "dora", "ia3"})
        if unknown:
            raise ValueError(f"space.peft: {unknown} not searchable; choose among lora, dora, ia3")
        self.check_point(self.default, "space.default")

    @staticmethod
    def ranges() -> tuple[str, ...]:
        return ("lr", "weight_decay", "warmup", "dropout")

    @staticmethod
    def choices() -> tuple[str, ...]:
        return ("steps", "batch_size", "rank", "alpha", "targets", "peft")

    @property
    def dim(self) -> int:
        """Length of :meth:`encode`'s vector."""
        return len(self.ranges()) + sum(len(getattr(self, n)) for n in self.choices())

    def check_point(self, point: dict, where: str = "point") -> None:
        """Raises ValueError unless ``point`` sets every field to a value inside the space."""
        missing = sorted(set(self.ranges() + self.choices()) - set(point))
        extra = sorted(set(point) - set(self.ranges() + self.choices()))
        if missing or extra:
            raise ValueError(f"{where}: missing fields {missing}, unknown fields {extra}")
        for name in self.ranges():
            r, v = getattr(self, name), point[name]
            if not r.low <= v <= r.high:
                raise ValueError(f"{where}.{name}={v} is outside the space's range [{r.low}, {r.high}]")
        for name in self.choices():
            keys = [_choice_key(c) for c in getattr(self, name)]
            if _choice_key(point[name]) not in keys:
                raise ValueError(f"{where}.{name}={point[name]} is not one of {list(getattr(self, name))}")

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """One point drawn uniformly (log-uniformly for log ranges; uniformly over choices)."""
        point: dict[str, Any] = {n: getattr(self, n).from_unit(rng.uniform()) for n in self.ranges()}
        for name in self.choices():
            values = getattr(self, name)
            value = values[int(rng.integers(len(values)))]
            point[name] = list(value) if isinstance(value, tuple) else value
        return point

    def encode(self, point: dict) -> np.ndarray:
        """The point in ``[0, 1]^dim``: unit-scaled ranges, then one-hot choices."""
        parts = [getattr(self, n).to_unit(point[n]) for n in self.ranges()]
        for name in self.choices():
            keys = [_choice_key(c) for c in getattr(self, name)]
            hot = [0.0] * len(keys)
            hot[keys.index(_choice_key(point[name]))] = 1.0
            parts.extend(hot)
        return np.asarray(parts, np.float32)

    def fidelity_steps(self, point: dict) -> list[int]:
        """The steps at which a run of ``point`` is evaluated (its learning curve's points)."""
        steps = int(point["steps"])
        return [steps * k // self.fidelities for k in range(1, self.fidelities + 1)]


def point_key(point: dict) -> str:
    """A stable text key of a point (for de-duplication and file names)."""
    import json

    return json.dumps({k: point[k] for k in sorted(point)}, sort_keys=True)


def space_from_dict(raw: dict | None) -> SearchSpace:
    """A :class:`SearchSpace` from YAML (``lr: {low: 1e-4, high: 1e-2, log: true}``, choices as lists)."""
    from metafit.config import from_dict

    return from_dict(SearchSpace, raw or {}, "space")
