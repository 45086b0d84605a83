r"""The serving engine: dynamic batching over a bounded queue, one generation loop per batch.

A worker thread takes the first waiting request, gathers more for up to ``batch_window_ms``
(or until ``batch_size`` rows), and runs one generation loop for the batch: the prompts are
left-padded to the smallest prompt bucket that holds the longest one, the loop is sized to the
smallest new-token bucket that holds the largest ``max_tokens``, the batch is padded to
``batch_size`` rows with idle rows, and its adapter units (each row's rank in blocks of 8, see
:mod:`metafit.serve.adapters`) are padded to the bank's next unit bucket. The jitted prefill and
step therefore compile once per (prompt bucket, new-token bucket, unit bucket) -- all of them at
start-up (:meth:`Engine.warm_up`) -- and never again, whatever the traffic or the adapters loaded.

Each row carries its own adapter (its units in the :class:`~metafit.serve.adapters.AdapterBank`
pool: the prefill gathers them once and every decode step reuses the gathered weights),
temperature, top-p and random key; greedy rows take the argmax. After every step the
new tokens go to each request's :class:`~metafit.models.generate.TextStream` (stop strings
are checked on decoded text), the text pieces are handed to the request's consumer, and a row
that finished (eos token, stop string or its own ``max_tokens``) is marked done on the device,
so the loop ends as soon as every row is done.

Token choice per row, from logits :math:`z` with temperature :math:`\tau_i` and nucleus mass
:math:`p_i`: :math:`\arg\max z` when :math:`\tau_i = 0`, else a draw from the softmax of
:math:`z/\tau_i` restricted to the nucleus (as :func:`metafit.models.generate`).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import queue
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.models.generate import TextStream, decode_step, filter_logits, start_decoding
from metafit.serve.adapters import AdapterBank, AdapterRows, UnitRoute, lora_modules, select_units


class QueueFull(RuntimeError):
    """The request queue is full (HTTP 429); ``retry_after`` is a suggested wait in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (request queue full); retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(RuntimeError):
    """The engine no longer accepts requests (HTTP 503)."""


@dataclasses.dataclass
class Request:
    """One generation request (already validated and tokenized).

    ``emit(kind, value)`` is called from the worker thread: ``("text", piece)`` for each piece,
    then one ``("done", (finish_reason, completion_tokens))`` or ``("error", message)``.
    """

    prompt_ids: Sequence[int]
    max_tokens: int
    adapter: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    emit: Callable[[str, Any], None] = lambda kind, value: None
    task: str = "base"
    submitted: float = dataclasses.field(default_factory=time.perf_counter)


@dataclasses.dataclass
class BatchStats:
    """What one batch did (for metrics)."""

    rows: int
    tokens: int
    seconds: float
    prompt_bucket: int
    new_bucket: int


def _row_chooser(keys, temperature, top_p):
    """Per-row token choice: argmax where ``temperature == 0``, else nucleus sampling at the row's settings."""

    # The vocabulary-wide sort (nucleus) and Gumbel draw cost more than a decode step's matmuls on CPU
    # (SmolLM2, 8 rows: 135 ms vs ~56 ms), so each runs only when some row of the batch needs it;
    # ``lax.cond`` executes one branch, where ``jnp.where`` would compute both.
    def sample(logits, step):
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        nucleus = jnp.where(temperature > 0, top_p, 1.0)  # a greedy row's top_p must not make the batch sort
        filtered = jax.lax.cond(jnp.any(nucleus < 1.0), lambda x: filter_logits(x, top_p=nucleus[:, None]),
                                lambda x: x, scaled)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        return jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)

    def choose(logits, step):
        logits = logits.astype(jnp.float32)
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        sampled = jax.lax.cond(jnp.any(temperature > 0), sample, lambda _logits, _step: greedy, logits, step)
        return jnp.where(temperature > 0, sampled, greedy)

    return choose


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _prefill(graphdef, rows, rest, route: UnitRoute, ids, mask, keys, temperature, top_p, stops, pad_id, *,
             max_new_tokens):
    """The first token of every row, and the batch's gathered adapter units (``rows``) for the steps."""
    model = nnx.merge(graphdef, rows, rest)
    select_units(lora_modules(model), route)
    carry = start_decoding(model, ids, mask, _row_chooser(keys, temperature, top_p), stops, pad_id,
                           max_new_tokens=max_new_tokens)
    return carry, nnx.state(model, AdapterRows)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"), donate_argnames=("carry",))
def _step(graphdef, rows, rest, carry, mask, keys, temperature, top_p, stops, pad_id, *, max_new_tokens):
    model = nnx.merge(graphdef, rows, rest)
    return decode_step(model, carry, mask, _row_chooser(keys, temperature, top_p), stops, pad_id,
                       max_new_tokens=max_new_tokens)


def compiled_programs() -> int:
    """How many prefill and step programs have been compiled (for no-recompilation checks)."""
    return _prefill._cache_size() + _step._cache_size()


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (callers check n against the largest first)."""
    return min(b for b in buckets if b >= n)


class Engine:
    """Batches requests for one model and its adapters (see the module docstring).

    Args:
      model: the served model with an :class:`AdapterBank` installed (``bank``).
      tokenizer: its tokenizer (decoding of the stream).
      bank: the adapter bank of ``model``.
      prompt_buckets, new_token_buckets: the padded lengths (sorted ascending).
      batch_window_ms: how long the first request of a batch waits for others.
      max_queue: requests waiting beyond the running batch before :class:`QueueFull`.
      seed: the root of the per-request sampling keys.
    """

    def __init__(self, model, tokenizer, bank: AdapterBank, *, prompt_buckets: Sequence[int],
                 new_token_buckets: Sequence[int], batch_window_ms: float = 5.0, max_queue: int = 64, seed: int = 0,
                 on_batch: Callable[[BatchStats], None] = lambda stats: None):
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.batch_size = bank.batch_size
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.new_token_buckets = tuple(sorted(new_token_buckets))
        self.window = batch_window_ms / 1000.0
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.on_batch = on_batch
        config = model.config
        generation = getattr(config, "generation", None)
        eos = generation.eos_token_ids if generation is not None and generation.eos_token_ids is not None else None
        self.stops = np.asarray(tuple(eos if eos is not None else config.eos_token_ids) or (-1,), np.int32)
        self.pad_id = int(config.pad_token_id if config.pad_token_id is not None else max(int(self.stops[0]), 0))
        self.keys = jax.random.split(jax.random.key(seed), 1)  # replaced per batch
        self._counter = itertools.count()
        self._seed = seed
        self._lock = threading.Lock()  # adapter writes vs batches
        self._refresh()
        self._accepting = True
        self._stopped = threading.Event()
        self._worker: threading.Thread | None = None
        self.busy_rows = 0
        self.seconds_per_batch = 0.5  # running estimate for Retry-After

    # ------------------------------------------------------------------ state
    def _refresh(self) -> None:
        """Splits the model again (after adapter slots changed); ``rows`` is only a placeholder of the batch's units."""
        self.graphdef, self.rows, self.rest = nnx.split(self.model, AdapterRows, ...)

    def load_adapter(self, adapter) -> Any:
        with self._lock:
            info = self.bank.load(adapter)
            self._refresh()
        return info

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            self.bank.unload(name)
            self._refresh()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        self._worker = threading.Thread(target=self._loop, name="metafit-serve-engine", daemon=True)
        self._worker.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stops accepting, finishes every queued and running request, then ends the worker."""
        self._accepting = False
        self._stopped.set()
        if self._worker is not None:
            self._worker.join(timeout)

    def submit(self, request: Request) -> None:
        """Queues ``request``; raises :class:`QueueFull` or :class:`ShuttingDown` at once instead of waiting."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down; no new requests are taken")
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            waiting_batches = self.queue.qsize() / self.batch_size + 1
            raise QueueFull(max(1, int(np.ceil(waiting_batches * self.seconds_per_batch)))) from None

    def warm_up(self) -> int:
        """Compiles the prefill and step for every bucket pair and unit bucket now; returns the number of pairs."""
        pairs = [(p, n) for p in self.prompt_buckets for n in self.new_token_buckets]
        for p, n in pairs:
            for units in self.bank.unit_buckets:
                self._run([Request([self.pad_id] * p, max_tokens=2)], p, n, min_units=units)
        return len(pairs)

    # ------------------------------------------------------------------ batching
    def _loop(self) -> None:
        while True:
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                if self._stopped.is_set():
                    return
                continue
            batch = [first]
            deadline = time.perf_counter() + self.window
            while len(batch) < self.batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    batch.append(self.queue.get(timeout=remaining))
                except queue.Empty:
                    break
            self.run_batch(batch)

    def run_batch(self, batch: list[Request]) -> None:
        """Runs one batch; a failure is reported to each of its requests, never raised (the server keeps going)."""
        self.busy_rows = len(batch)
        try:
            p = bucket(max(len(r.prompt_ids) for r in batch), self.prompt_buckets)
            n = bucket(max(r.max_tokens for r in batch), self.new_token_buckets)
            started = time.perf_counter()
            tokens = self._run(batch, p, n)
            seconds = time.perf_counter() - started
            self.seconds_per_batch = 0.8 * self.seconds_per_batch + 0.2 * seconds
            self.on_batch(BatchStats(len(batch), tokens, seconds, p, n))
        except Exception as err:  # noqa: BLE001 -- reported to the requests; the worker must survive
            for request in batch:
                request.emit("error", f"generation failed: {type(err).__name__}: {err}")
        finally:
            self.busy_rows = 0

    def _inputs(self, batch: list[Request], p: int, min_units: int):
        rows = self.batch_size
        ids = np.full((rows, p), self.pad_id, np.int32)
        mask = np.zeros((rows, p), np.int32)
        mask[:, -1] = 1  # idle rows: one token, so attention has a key (their output is ignored)
        temperature = np.zeros(rows, np.float32)
        top_p = np.ones(rows, np.float32)
        for row, request in enumerate(batch):
            prompt = np.asarray(request.prompt_ids, np.int32)
            ids[row, p - len(prompt):] = prompt
            mask[row] = 0
            mask[row, p - len(prompt):] = 1
            temperature[row], top_p[row] = request.temperature, request.top_p
        keys = jax.random.split(jax.random.fold_in(jax.random.key(self._seed), next(self._counter)), rows)
        route = self.bank.rows([r.adapter for r in batch], min_units=min_units)
        return route, ids, mask, keys, temperature, top_p

    def _run(self, batch: list[Request], p: int, n: int, min_units: int = 0) -> int:
        with self._lock:
            route, ids, mask, keys, temperature, top_p = self._inputs(batch, p, min_units)
            arrays = (jnp.asarray(mask), keys, jnp.asarray(temperature), jnp.asarray(top_p), jnp.asarray(self.stops),
                      jnp.int32(self.pad_id))
            route = UnitRoute(*map(jnp.asarray, route))
            carry, rows = _prefill(self.graphdef, self.rows, self.rest, route, jnp.asarray(ids), *arrays,
                                   max_new_tokens=n)
            state = (self.graphdef, rows, self.rest)
            texts = [TextStream(self.tokenizer, r.stop) for r in batch]
            finished = np.zeros(self.batch_size, bool)
            finished[len(batch):] = True
            produced = np.zeros(len(batch), np.int64)
            reasons: list[str | None] = [None] * len(batch)
            stops = set(int(s) for s in self.stops)
            for step in range(1, n + 1):
                token = np.asarray(carry.tokens[:, p + step - 1])
                for row, request in enumerate(batch):
                    if finished[row]:
                        continue
                    if int(token[row]) in stops:
                        reasons[row], finished[row] = "stop", True
                        continue
                    produced[row] += 1
                    piece = texts[row].push(int(token[row]))
                    if piece:
                        request.emit("text", piece)
                    if texts[row].stopped:
                        reasons[row], finished[row] = "stop", True
                    elif produced[row] >= request.max_tokens:
                        reasons[row], finished[row] = "length", True
                if finished.all() or step == n:
                    break
                carry = carry._replace(done=carry.done | jnp.asarray(finished))
                carry = _step(*state, carry, *arrays, max_new_tokens=n)
        for row, request in enumerate(batch):
            rest = "" if texts[row].stopped else texts[row].flush()
            if rest:
                request.emit("text", rest)
            request.emit("done", (reasons[row] or "length", int(produced[row])))
        return int(produced.sum())


__all__ = ["Engine", "Request", "QueueFull", "ShuttingDown", "BatchStats", "bucket", "compiled_programs"]
