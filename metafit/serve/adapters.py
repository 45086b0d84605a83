r"""Many LoRA adapters in one batched forward: per-row adapter slots grouped by rank class.

Each adapted projection ``W`` (``[in, out]``) of the served model is replaced by a
:class:`BatchedLoRALinear` holding, for every rank class :math:`c` (8, 16, 32, 64, 128, ...),
stacked slots :math:`A_c \in \mathbb{R}^{(S_c + 1) \times in \times r_c}` and
:math:`B_c \in \mathbb{R}^{(S_c + 1) \times r_c \times out}`. Row :math:`i` of a batch carries a
slot index :math:`k_{c,i}` per class, and

.. math::

    y_i = x_i W + \sum_c (x_i A_c[k_{c,i}])\, B_c[k_{c,i}].

Slot :math:`S_c` of every class is all zeros, so a row uses exactly one slot of one class (the
class of its adapter) and the zero slot of the others; the base model is a row with zero slots
everywhere. An adapter of rank :math:`r` (LoRA scaling :math:`s = \alpha / r`, or
:math:`\alpha/\sqrt r` for rsLoRA) goes into the smallest class :math:`r_c \ge r` with
:math:`A` zero-padded on the right and :math:`s B` zero-padded below, which leaves
:math:`x A B` unchanged and costs at most 2x the adapter's own LoRA compute (one class up from
8). There is no largest rank: a rank-300 adapter opens class 512.

Shapes depend only on the slot counts, so loading or unloading an adapter writes slot values
and never recompiles the serving forward (one small jitted write per class shape). The
modules adapted are fixed when the bank is built (``targets``, default every decoder
projection): an adapter targeting another module is refused, naming it.

Weights come from :mod:`metafit.peft` (:func:`metafit.peft.load_hf_peft` on a view of the base
model), so a served adapter is by construction the one ``metafit.peft`` applies; DoRA, IA3 and
the other non-LoRA adapters are refused (merge them and serve the merged model instead).

References:
  Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA Adapters", MLSys 2024.
  Chen et al., "Punica: Multi-Tenant LoRA Serving", MLSys 2024.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.peft.core import PeftModule, iter_modules, kernel_of, path_str, select_modules, wrap_selected

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "c_attn", "c_proj", "c_fc")
MIN_RANK_CLASS = 8


class AdapterSlots(nnx.Variable):
    """Stacked adapter weights of one rank class (not a ``Param``: never trained here)."""


class AdapterRoute(nnx.Variable):
    """Per-row slot index of every rank class, ``[classes, batch]`` int32; shared by all wrappers."""


class AdapterError(ValueError):
    """An adapter that cannot be served as asked; the message names the module, shape or slot."""


def rank_class(rank: int) -> int:
    """The slot rank for an adapter of rank ``rank``: the smallest power of two >= max(rank, 8)."""
    if rank < 1:
        raise AdapterError(f"LoRA rank must be >= 1, got {rank}")
    return max(MIN_RANK_CLASS, 1 << (int(rank) - 1).bit_length())


class BatchedLoRALinear(nnx.Module):
    """A Linear-like layer plus per-row LoRA from stacked slots (see the module docstring).

    Args:
      base_layer: the wrapped projection (``kernel [in, out]``), unchanged.
      classes: ``{rank class: slot count}``.
      route: the shared :class:`AdapterRoute`.
    """

    def __init__(self, base_layer: nnx.Module, classes: Mapping[int, int], route: AdapterRoute):
        kernel = kernel_of(base_layer).get_value()
        d_in, d_out = kernel.shape
        self.base_layer = base_layer
        self.ranks = tuple(sorted(classes))
        self.lora_A = nnx.List([AdapterSlots(jnp.zeros((classes[r] + 1, d_in, r), kernel.dtype)) for r in self.ranks])
        self.lora_B = nnx.List([AdapterSlots(jnp.zeros((classes[r] + 1, r, d_out), kernel.dtype)) for r in self.ranks])
        self.route = route

    def __call__(self, x, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        route = self.route.get_value()
        for c, (a_slots, b_slots) in enumerate(zip(self.lora_A, self.lora_B)):
            a = a_slots.get_value()[route[c]].astype(x.dtype)   # [b, in, r]
            b = b_slots.get_value()[route[c]].astype(x.dtype)   # [b, r, out]
            low = jnp.einsum("b...i,bir->b...r", x, a)
            y = y + jnp.einsum("b...r,bro->b...o", low, b).astype(y.dtype)
        return y


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """One LoRA adapter read from disk: ``{module path: (A [in, r], s B [r, out])}``."""

    name: str
    source: str
    rank: int
    weights: Mapping[str, tuple[np.ndarray, np.ndarray]]

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.weights)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def adapter_folder(path: str | Path) -> Path:
    """The HF PEFT folder behind ``path``: the folder itself, or the one adapter of a metafit run folder.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      AdapterError: a run folder with no adapter or with several (they are listed).
    """
    from metafit.export import ADAPTER_FILE, exportable_models

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter path {path} does not exist")
    if (path / ADAPTER_FILE).is_file():
        return path
    adapters = [key for key, kind in exportable_models(path).items() if kind == "adapter"]
    if len(adapters) != 1:
        found = ", ".join(str(path / a) for a in adapters) or "none"
        raise AdapterError(f"{path} is neither an adapter folder ({ADAPTER_FILE}) nor a run folder holding exactly "
                           f"one adapter (found: {found}); point path at the adapter folder itself")
    return path / adapters[0]


def read_lora_adapter(base_model: nnx.Module, path: str | Path, name: str) -> LoraAdapter:
    """Reads a LoRA adapter (HF PEFT folder or metafit run folder) through :func:`metafit.peft.load_hf_peft`.

    The adapter is applied to a view of ``base_model`` (same arrays, new modules), its
    :class:`~metafit.peft.LoRALinear` weights are taken with their scaling folded into B, and
    the view is dropped: ``base_model`` itself is not changed.

    Raises:
      AdapterError: not LoRA (DoRA, IA3, prefix, ...) or an adapter for another base model.
    """
    from metafit.peft import LoRALinear, load_hf_peft

    folder = adapter_folder(path)
    view = nnx.merge(*nnx.split(base_model))
    try:
        load_hf_peft(view, folder)
    except ValueError as err:
        raise AdapterError(f"adapter '{name}': {err}") from err
    weights, ranks = {}, set()
    for module_path, module in iter_modules(view):
        if not isinstance(module, PeftModule):
            continue
        if not isinstance(module, LoRALinear) or module.use_dora:
            kind = "DoRA" if isinstance(module, LoRALinear) else type(module).__name__
            raise AdapterError(f"adapter '{name}' ({folder}) is {kind}; batched serving takes LoRA adapters only: "
                               f"merge it into the base (metafit export RUN_DIR --out DIR) and serve that folder")
        a = np.asarray(module.lora_A.get_value())
        b = np.asarray(module.lora_B.get_value()) * module.scaling * float(module.gate.get_value())
        weights[path_str(module_path)] = (a, b)
        ranks.add(module.rank)
    if not weights:
        raise AdapterError(f"adapter '{name}' ({folder}) adapts no module")
    return LoraAdapter(name, str(folder), max(ranks), weights)


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_slot(slots, slot, values):
    """``slots[i][slot] = values[i]`` for every slot array of one rank class, in one program.

    One call per adapter load or unload (not one per module), compiled once per rank class.
    """
    return tuple(jax.lax.dynamic_update_index_in_dim(s, v.astype(s.dtype), slot, 0) for s, v in zip(slots, values))


@dataclasses.dataclass
class SlotInfo:
    adapter: LoraAdapter
    rank_class: int
    slot: int


class AdapterBank:
    """Installs :class:`BatchedLoRALinear` in ``model`` (in place) and manages its slots.

    Args:
      model: the served base model (its ``targets`` projections are wrapped).
      classes: ``{rank class: slot count}`` (each a power of two >= 8); empty = no slots (the base model).
      targets: module path patterns to adapt (as :class:`metafit.peft.LoraConfig` ``targets``).
      batch_size: rows per forward (the route's width).

    Example:
      >>> bank = AdapterBank(model, {8: 4, 16: 2}, batch_size=8)             # doctest: +SKIP
      >>> bank.load(read_lora_adapter(model, "runs/sft/adapter", "sentiment"))
      >>> bank.set_rows(["sentiment", None, ...])   # then call the model
    """

    def __init__(self, model: nnx.Module, classes: Mapping[int, int], *, targets: Iterable[str] = DEFAULT_TARGETS,
                 batch_size: int):
        bad = [r for r in classes if r != rank_class(r)]
        if bad or any(int(n) < 1 for n in classes.values()):
            raise AdapterError(f"slot classes must map powers of two >= {MIN_RANK_CLASS} to slot counts >= 1, "
                               f"got {dict(classes)}")
        self.classes = {int(r): int(n) for r, n in sorted(classes.items())}
        self.batch_size = int(batch_size)
        self.route = AdapterRoute(self._zero_route())
        self.modules: dict[str, BatchedLoRALinear] = {}
        self.loaded: dict[str, SlotInfo] = {}
        self.targets: tuple[str, ...] = ()
        if not self.classes:  # no slots: the plain base model (a baseline for benchmarks)
            return
        selected = [(p, m) for p, m in select_modules(model, tuple(targets), ("Linear",))
                    if not path_str(p).endswith("lm_head")]
        self.targets = tuple(wrap_selected(model, selected,
                                           lambda _, layer: BatchedLoRALinear(layer, self.classes, self.route)))
        self.modules = {path_str(p): m for p, m in iter_modules(model) if isinstance(m, BatchedLoRALinear)}

    def _zero_route(self) -> np.ndarray:
        return np.asarray([[n] * self.batch_size for n in self.classes.values()], np.int32).reshape(
            len(self.classes), self.batch_size)

    def load(self, adapter: LoraAdapter) -> SlotInfo:
        """Writes ``adapter`` into a free slot of its rank class (no recompilation)."""
        if adapter.name in self.loaded:
            raise AdapterError(f"an adapter named '{adapter.name}' is already loaded; unload it first")
        extra = sorted(set(adapter.targets) - set(self.modules))
        if extra:
            raise AdapterError(f"adapter '{adapter.name}' adapts {extra[0]}, which the server does not adapt "
                               f"(served targets: {', '.join(self.targets)}); add it to the serve config's targets")
        for target, (a, b) in adapter.weights.items():
            kernel = kernel_of(self.modules[target].base_layer).get_value()
            if a.shape[0] != kernel.shape[0] or b.shape[1] != kernel.shape[1]:
                raise AdapterError(f"adapter '{adapter.name}': {target} has A {a.shape}, B {b.shape}; the base "
                                   f"kernel is {tuple(kernel.shape)} (an adapter for another base model?)")
        r = rank_class(adapter.rank)
        if r not in self.classes:
            raise AdapterError(f"adapter '{adapter.name}' has rank {adapter.rank} (class {r}) but the server has slots "
                               f"for classes {sorted(self.classes)} only; add class {r} to the serve config's slots")
        used = {info.slot for info in self.loaded.values() if info.rank_class == r}
        free = [s for s in range(self.classes[r]) if s not in used]
        if not free:
            raise AdapterError(f"all {self.classes[r]} slots of rank class {r} are taken; unload an adapter or "
                               "raise the slot count in the serve config")
        info = SlotInfo(adapter, r, free[0])
        self._write(info, adapter.weights)
        self.loaded[adapter.name] = info
        return info

    def unload(self, name: str) -> None:
        """Zeros the adapter's slot and frees it."""
        info = self.loaded.pop(name)
        zeros = {t: (np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32)) for t in self.modules}
        self._write(info, zeros)

    def _write(self, info: SlotInfo, weights: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        c = list(self.classes).index(info.rank_class)
        variables, values = [], []
        for target, module in self.modules.items():
            a, b = weights.get(target, (np.zeros((1, 1), np.float32),) * 2)
            for slots, value in ((module.lora_A[c], a), (module.lora_B[c], b)):
                padded = np.zeros(slots.get_value().shape[1:], np.float32)  # rank padding: zero columns of A, rows of B
                padded[:value.shape[0], :value.shape[1]] = value
                variables.append(slots)
                values.append(padded)
        written = _write_slot(tuple(v.get_value() for v in variables), jnp.int32(info.slot), tuple(values))
        for slots, value in zip(variables, written):
            slots.set_value(value)

    def rows(self, names: Iterable[str | None]) -> np.ndarray:
        """The route ``[classes, batch_size]`` for rows serving ``names`` (None = base model; missing rows too)."""
        route = self._zero_route()
        for row, name in enumerate(names):
            if name is not None:
                info = self.loaded[name]
                route[list(self.classes).index(info.rank_class), row] = info.slot
        return route

    def set_rows(self, names: Iterable[str | None]) -> None:
        """Routes the next forward's rows (outside jit; the engine passes routes into its jitted step instead)."""
        self.route.set_value(jnp.asarray(self.rows(names)))

    def slot_bytes(self, rank: int) -> int:
        """Memory of one slot of class ``rank`` over all adapted modules."""
        itemsize = next(iter(self.modules.values())).lora_A[0].get_value().dtype.itemsize
        return sum(rank * sum(kernel_of(m.base_layer).get_value().shape) for m in self.modules.values()) * itemsize


def default_classes(ranks: Iterable[int], spare: int) -> dict[int, int]:
    """Slot counts fitting ``ranks`` (one slot each) plus ``spare`` free slots per class (at least class 8)."""
    counts: dict[int, int] = {}
    for r in ranks:
        counts[rank_class(r)] = counts.get(rank_class(r), 0) + 1
    counts = counts or {MIN_RANK_CLASS: 0}
    return {r: n + spare for r, n in counts.items() if n + spare > 0} or {MIN_RANK_CLASS: 1}


__all__ = ["AdapterBank", "AdapterError", "AdapterRoute", "AdapterSlots", "BatchedLoRALinear", "LoraAdapter",
           "DEFAULT_TARGETS", "adapter_folder", "default_classes", "rank_class", "read_lora_adapter"]

