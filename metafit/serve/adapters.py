r"""Many LoRA adapters in one batched forward: each row pays only for its own adapter's rank.

Each adapted projection ``W`` (``[in, out]``) of the served model is replaced by a
:class:`BatchedLoRALinear`. An adapter of rank :math:`r` is stored as :math:`u = \lceil r/8 \rceil`
*units*: rank-8 column blocks :math:`A_k \in \mathbb{R}^{in \times 8}` of its :math:`A` and the
matching row blocks :math:`B_k \in \mathbb{R}^{8 \times out}` of its (scaled) :math:`B`, so that
:math:`x A B = \sum_k (x A_k) B_k`. The units of every loaded adapter live in one pool per
projection (``lora_A [chunks, in, 8]``, ``lora_B [chunks, 8, out]``, the last chunk all zeros).
A batch is routed as a list of units :math:`(\rho_j, k_j)` (row, pool chunk), sorted by row, and

.. math::

    y_i = x_i W + \sum_{j:\, \rho_j = i} (x_i A_{k_j})\, B_{k_j},

computed as two batched matmuls over the units and a sorted segment sum back onto the rows
(Punica's SGMV / S-LoRA's MBGMV with the rank split into fixed blocks instead of one
kernel per rank; ``jax.lax.ragged_dot`` is not used because off TPU/GPU it lowers to a dense
product of every row with every group). A row therefore costs its own :math:`\lceil r/8 \rceil` units -- a rank-8 row
in a batch that also holds rank-32 rows computes rank 8, not 8 + 16 + 32 -- and a base-model row
costs none. The unit count of a batch is padded (with zero-chunk units) to the next of a few
fixed sizes, ``batch_size`` times 1, 2, 4, ... up to ``batch_size`` times the largest class's
units (:attr:`AdapterBank.unit_buckets`), so the serving forward compiles once per size, all at
start-up; the padding at most doubles the batch's own LoRA work, except that a batch computes at
least one unit per row (rank 8 per row when most rows are base-model rows).

The pool is laid out in rank-class slots (8, 16, 32, 64, 128, ...): an adapter of rank :math:`r`
(LoRA scaling :math:`s = \alpha / r`, or :math:`\alpha/\sqrt r` for rsLoRA) takes one slot of the
smallest class :math:`r_c \ge r`, i.e. :math:`r_c / 8` consecutive chunks, with :math:`A`
zero-padded on the right and :math:`s B` zero-padded below (which leaves :math:`x A B`
unchanged); only its first :math:`\lceil r/8 \rceil` chunks are routed, so the class sets the
memory, not the compute. There is no largest rank: a rank-300 adapter opens class 512.

The units' weights are gathered from the pool once per batch (:func:`select_units`; the engine
does it in its prefill and hands the gathered rows to every decode step), not at every step.
Shapes depend only on the slot counts and the unit bucket, so loading or unloading an adapter
writes pool chunks and never recompiles the serving forward (one small jitted write per class).
The modules adapted are fixed when the bank is built (``targets``, default every decoder
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
from typing import Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.peft.core import PeftModule, iter_modules, kernel_of, path_str, select_modules, wrap_selected

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "c_attn", "c_proj", "c_fc")
MIN_RANK_CLASS = 8
UNIT_RANK = MIN_RANK_CLASS  # the rank of one unit (pool chunk): every class is a whole number of them


class AdapterSlots(nnx.Variable):
    """The pool of adapter units of one projection (not a ``Param``: never trained here)."""


class AdapterRows(nnx.Variable):
    """One batch's routing: the units' gathered weights (per projection) and their rows (shared)."""


class AdapterRoute(AdapterRows):
    """The row of every unit of the batch, ``[units]`` int32 sorted ascending; shared by all wrappers."""


class AdapterError(ValueError):
    """An adapter that cannot be served as asked; the message names the module, shape or slot."""


class UnitRoute(NamedTuple):
    """A batch's units: ``rows[j]`` is the batch row unit ``j`` adds to, ``chunks[j]`` its pool chunk."""

    rows: np.ndarray
    chunks: np.ndarray


def rank_class(rank: int) -> int:
    """The slot rank for an adapter of rank ``rank``: the smallest power of two >= max(rank, 8)."""
    if rank < 1:
        raise AdapterError(f"LoRA rank must be >= 1, got {rank}")
    return max(MIN_RANK_CLASS, 1 << (int(rank) - 1).bit_length())


def unit_buckets(batch_size: int, max_units_per_row: int) -> tuple[int, ...]:
    """The padded unit counts of a batch: ``batch_size`` times 1, 2, 4, ... up to ``max_units_per_row``.

    One compiled forward each (``log2(max_units_per_row) + 1`` of them). Steps of 2x, not finer:
    steps of 1.5x gave the same tokens/s on the serving benchmark (benchmarks/README.md) with
    twice the programs to compile at start-up.
    """
    sizes = [batch_size]
    while sizes[-1] < batch_size * max_units_per_row:
        sizes.append(2 * sizes[-1])
    return tuple(sizes)


class BatchedLoRALinear(nnx.Module):
    """A Linear-like layer plus per-row LoRA from a pool of rank-8 units (see the module docstring).

    Args:
      base_layer: the wrapped projection (``kernel [in, out]``), unchanged.
      chunks: pool size in units (the zero chunk is added after them).
      route: the shared :class:`AdapterRoute` (its size is the batch's unit count).
    """

    def __init__(self, base_layer: nnx.Module, chunks: int, route: AdapterRoute):
        kernel = kernel_of(base_layer).get_value()
        d_in, d_out = kernel.shape
        units = route.get_value().shape[0]
        self.base_layer = base_layer
        self.lora_A = AdapterSlots(jnp.zeros((chunks + 1, d_in, UNIT_RANK), kernel.dtype))
        self.lora_B = AdapterSlots(jnp.zeros((chunks + 1, UNIT_RANK, d_out), kernel.dtype))
        self.rows_A = AdapterRows(jnp.zeros((units, d_in, UNIT_RANK), kernel.dtype))
        self.rows_B = AdapterRows(jnp.zeros((units, UNIT_RANK, d_out), kernel.dtype))
        self.route = route

    def select(self, chunks) -> None:
        """Gathers the batch's units from the pool (once per batch, not per forward)."""
        self.rows_A.set_value(self.lora_A.get_value()[chunks])
        self.rows_B.set_value(self.lora_B.get_value()[chunks])

    def __call__(self, x, *args, **kwargs):
        y = self.base_layer(x, *args, **kwargs)
        rows = self.route.get_value()
        low = jnp.einsum("u...i,uir->u...r", x[rows], self.rows_A.get_value().astype(x.dtype))
        lora = jnp.einsum("u...r,uro->u...o", low, self.rows_B.get_value().astype(x.dtype))
        return y + jax.ops.segment_sum(lora, rows, num_segments=x.shape[0], indices_are_sorted=True).astype(y.dtype)


def lora_modules(model: nnx.Module) -> list[BatchedLoRALinear]:
    """Every :class:`BatchedLoRALinear` of ``model``, in traversal order."""
    return [m for _, m in iter_modules(model) if isinstance(m, BatchedLoRALinear)]


def select_units(modules: Iterable[BatchedLoRALinear], route: UnitRoute) -> None:
    """Routes the next forwards: every module gathers ``route``'s units and the shared route takes its rows.

    Traceable: the engine calls it inside its jitted prefill; :meth:`AdapterBank.set_rows` eagerly.
    """
    modules = list(modules)
    for module in modules:
        module.select(route.chunks)
    if modules:
        modules[0].route.set_value(jnp.asarray(route.rows))  # one variable shared by every module


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
def _write_slot(pools, first_chunk, values):
    """``pools[i][first_chunk:first_chunk + n] = values[i]`` for every pool, in one program.

    One call per adapter load or unload (not one per module), compiled once per rank class
    (``n`` = the class's chunks).
    """
    return tuple(jax.lax.dynamic_update_slice_in_dim(pool, value.astype(pool.dtype), first_chunk, 0)
                 for pool, value in zip(pools, values))


def _as_units(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """One adapter's ``A [in, r]`` and ``B [r, out]`` as the units of a rank-``rank`` slot.

    Zero-padded to rank ``rank``, then cut into ``[rank/8, in, 8]`` and ``[rank/8, 8, out]``.
    """
    a_padded = np.zeros((a.shape[0], rank), np.float32)
    a_padded[:, :a.shape[1]] = a
    b_padded = np.zeros((rank, b.shape[1]), np.float32)
    b_padded[:b.shape[0]] = b
    units = rank // UNIT_RANK
    return (a_padded.reshape(a.shape[0], units, UNIT_RANK).transpose(1, 0, 2),
            b_padded.reshape(units, UNIT_RANK, b.shape[1]))


@dataclasses.dataclass
class SlotInfo:
    """Where a loaded adapter lives: slot ``slot`` of ``rank_class``, pool chunks from ``first_chunk``."""

    adapter: LoraAdapter
    rank_class: int
    slot: int
    first_chunk: int

    @property
    def units(self) -> int:
        """The chunks a row of this adapter computes: ceil(rank / 8) (the rest of the slot is zero padding)."""
        return -(-self.adapter.rank // UNIT_RANK)


class AdapterBank:
    """Installs :class:`BatchedLoRALinear` in ``model`` (in place) and manages its slots.

    Args:
      model: the served base model (its ``targets`` projections are wrapped).
      classes: ``{rank class: slot count}`` (each a power of two >= 8); empty = no slots (the base model).
      targets: module path patterns to adapt (as :class:`metafit.peft.LoraConfig` ``targets``).
      batch_size: rows per forward.

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
        class_chunks = [r // UNIT_RANK * n for r, n in self.classes.items()]  # each class's slots, back to back
        self.first_chunks = dict(zip(self.classes, np.cumsum([0] + class_chunks).tolist()))
        self.zero_chunk = sum(class_chunks)
        self.unit_buckets = unit_buckets(self.batch_size, max(self.classes) // UNIT_RANK) if self.classes else (0,)
        self.route = AdapterRoute(jnp.full(self.unit_buckets[0], self.batch_size - 1, jnp.int32))
        self.modules: dict[str, BatchedLoRALinear] = {}
        self.loaded: dict[str, SlotInfo] = {}
        self.targets: tuple[str, ...] = ()
        if not self.classes:  # no slots: the plain base model (a baseline for benchmarks)
            return
        selected = [(p, m) for p, m in select_modules(model, tuple(targets), ("Linear",))
                    if not path_str(p).endswith("lm_head")]
        self.targets = tuple(wrap_selected(model, selected,
                                           lambda _, layer: BatchedLoRALinear(layer, self.zero_chunk, self.route)))
        self.modules = {path_str(p): m for p, m in iter_modules(model) if isinstance(m, BatchedLoRALinear)}

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
        info = SlotInfo(adapter, r, free[0], self.first_chunks[r] + free[0] * r // UNIT_RANK)
        self._write(info, adapter.weights)
        self.loaded[adapter.name] = info
        return info

    def unload(self, name: str) -> None:
        """Zeros the adapter's slot and frees it."""
        info = self.loaded.pop(name)
        self._write(info, {})

    def _write(self, info: SlotInfo, weights: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Writes ``weights`` (zeros for modules it lacks) over the slot's chunks in every pool."""
        pools, values = [], []
        for target, module in self.modules.items():
            d_in, d_out = module.lora_A.get_value().shape[1], module.lora_B.get_value().shape[2]
            a, b = weights.get(target, (np.zeros((d_in, 0), np.float32), np.zeros((0, d_out), np.float32)))
            for pool, value in zip((module.lora_A, module.lora_B), _as_units(a, b, info.rank_class)):
                pools.append(pool)
                values.append(value)
        written = _write_slot(tuple(p.get_value() for p in pools), jnp.int32(info.first_chunk), tuple(values))
        for pool, value in zip(pools, written):
            pool.set_value(value)

    def rows(self, names: Iterable[str | None], *, min_units: int = 0) -> UnitRoute:
        """The units of rows serving ``names`` (None = base model: no units), padded to a unit bucket.

        Padding units add the zero chunk to the last row, keeping ``rows`` sorted. ``min_units``
        forces a larger bucket (the engine's warm-up compiles every bucket with it).
        """
        rows, chunks = [], []
        for row, name in enumerate(names):
            if name is not None:
                info = self.loaded[name]
                rows += [row] * info.units
                chunks += range(info.first_chunk, info.first_chunk + info.units)
        size = min(b for b in self.unit_buckets if b >= max(len(rows), min_units))
        pad = size - len(rows)
        return UnitRoute(np.asarray(rows + [self.batch_size - 1] * pad, np.int32),
                         np.asarray(chunks + [self.zero_chunk] * pad, np.int32))

    def set_rows(self, names: Iterable[str | None]) -> None:
        """Routes the model's next forwards (eagerly; the engine routes inside its jitted prefill instead)."""
        select_units(self.modules.values(), self.rows(names))

    def slot_bytes(self, rank: int) -> int:
        """Memory of one slot of class ``rank`` over all adapted modules."""
        itemsize = next(iter(self.modules.values())).lora_A.get_value().dtype.itemsize
        return sum(rank * sum(kernel_of(m.base_layer).get_value().shape) for m in self.modules.values()) * itemsize


def default_classes(ranks: Iterable[int], spare: int) -> dict[int, int]:
    """Slot counts fitting ``ranks`` (one slot each) plus ``spare`` free slots per class (at least class 8)."""
    counts: dict[int, int] = {}
    for r in ranks:
        counts[rank_class(r)] = counts.get(rank_class(r), 0) + 1
    counts = counts or {MIN_RANK_CLASS: 0}
    return {r: n + spare for r, n in counts.items() if n + spare > 0} or {MIN_RANK_CLASS: 1}


__all__ = ["AdapterBank", "AdapterError", "AdapterRoute", "AdapterRows", "AdapterSlots", "BatchedLoRALinear",
           "LoraAdapter", "UnitRoute", "DEFAULT_TARGETS", "adapter_folder", "default_classes", "rank_class",
           "lora_modules", "read_lora_adapter", "select_units", "unit_buckets"]

