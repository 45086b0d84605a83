"""Building a server from a :class:`~metafit.serve.config.ServeConfig` and running it under uvicorn.

:func:`build_state` loads the base model, installs the adapter slots, reads every configured
adapter (a missing folder is skipped with a warning naming the command that trains it; any
other bad adapter stops start-up with its error), and warms the compiled programs up.
:func:`serve` runs the app until SIGINT/SIGTERM; uvicorn then stops accepting connections and
the app's lifespan lets the engine finish every queued and running request before exiting.
:class:`BackgroundServer` runs the same server in a thread on a free loopback port (tests,
benchmarks, notebooks).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import jax.numpy as jnp

from metafit.serve.config import ServeConfig, validate

log = logging.getLogger("metafit.serve")


def missing_serve_extra() -> str | None:
    """None when the HTTP packages are installed, else the install command."""
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        return f"metafit serve needs {', '.join(missing)}: pip install 'metafit[serve]'"
    return None


def context_length(config) -> int:
    """The model's context (positions it was trained for): Llama family ``rope``, GPT-2 ``n_positions``."""
    rope = getattr(config, "rope", None)
    for value in (getattr(rope, "max_position_embeddings", None), getattr(config, "n_positions", None),
                  getattr(config, "max_position_embeddings", None)):
        if value:
            return int(value)
    raise ValueError(f"cannot tell the context length of a {type(config).__name__}")


def build_state(config: ServeConfig, *, warn: Callable[[str], None] = log.warning):
    """The :class:`~metafit.serve.app.ServerState` of ``config``: model, slots, adapters, engine (not started).

    Raises:
      metafit.config.ConfigError: bucket lengths over the model's context, bad values.
      metafit.serve.adapters.AdapterError: an adapter that exists but cannot be served (named).
    """
    import metafit.models as mm
    from metafit.config import ConfigError
    from metafit.serve.adapters import AdapterBank, default_classes, read_lora_adapter
    from metafit.serve.app import AdapterRecord, Metrics, ServerState
    from metafit.serve.engine import Engine

    validate(config)
    model, tokenizer = mm.load(config.model, dtype=jnp.dtype(config.dtype))
    if tokenizer is None:
        raise ConfigError(f"model: {config.model} has no tokenizer files; the server needs one to read prompts")
    context = context_length(model.config)
    longest = config.prompt_buckets[-1] + config.new_token_buckets[-1]
    if longest > context:
        raise ConfigError(f"prompt_buckets[-1] + new_token_buckets[-1] = {longest} is over the model's context of "
                          f"{context} tokens; lower the largest buckets")
    base_view = mm.load(config.model, dtype=jnp.dtype(config.dtype), tokenizer=False)[0]
    read = lambda path, name: read_lora_adapter(base_view, path, name)  # noqa: E731 -- a view, not the served model
    records, adapters = {}, []
    for entry in config.adapters:
        record = AdapterRecord(entry.name, entry.path, entry.train)
        records[entry.name] = record
        if not Path(entry.path).exists():
            record.problem = f"{entry.path} does not exist yet"
            warn(f"adapter '{entry.name}' skipped: {entry.path} does not exist"
                 + (f"; train it with: {entry.train}" if entry.train else ""))
            continue
        adapters.append((record, read(entry.path, entry.name)))
    classes = config.slot_classes() or default_classes([a.rank for _, a in adapters], config.spare_slots)
    bank = AdapterBank(model, classes, targets=config.targets, batch_size=config.batch_size)
    engine = Engine(model, tokenizer, bank, prompt_buckets=config.prompt_buckets,
                    new_token_buckets=config.new_token_buckets, batch_window_ms=config.batch_window_ms,
                    max_queue=config.max_queue, seed=config.seed)
    for record, adapter in adapters:
        record.info = engine.load_adapter(adapter)
    metrics = Metrics(engine)
    engine.on_batch = metrics.on_batch
    if config.warm_up:
        started = time.perf_counter()
        pairs = engine.warm_up()
        log.info("compiled %d bucket pairs in %.1f s", pairs, time.perf_counter() - started)
    return ServerState(engine=engine, tokenizer=tokenizer, name=config.name, context=int(context),
                       max_prompt=config.prompt_buckets[-1], max_new=config.new_token_buckets[-1],
                       max_request_bytes=config.max_request_bytes, api_key=config.api_key, read_adapter=read,
                       adapters=records, metrics=metrics)


def _uvicorn_server(app, host: str, port: int):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                         timeout_graceful_shutdown=60, lifespan="on"))


def serve(config: ServeConfig) -> None:
    """Runs the server in the foreground until interrupted (graceful: in-flight requests finish)."""
    from metafit.serve.app import build_app

    state = build_state(config)
    print(f"serving {config.name} ({config.model}) with "
          f"{sum(r.info is not None for r in state.adapters.values())} adapter(s) at http://{config.host}:{config.port}"
          f"/v1 {'(API key required)' if config.api_key else ''}", flush=True)
    _uvicorn_server(build_app(state), config.host, config.port).run()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class BackgroundServer:
    """The server of ``state`` in a thread on a free loopback port; ``with`` starts and stops it.

    Example:
      >>> with BackgroundServer(build_state(config)) as server:              # doctest: +SKIP
      ...     openai.OpenAI(base_url=server.url + "/v1", api_key="-").models.list()
    """

    def __init__(self, state, *, host: str = "127.0.0.1", port: int | None = None):
        from metafit.serve.app import build_app

        self.state = state
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.server = _uvicorn_server(build_app(state), host, self.port)
        self.thread = threading.Thread(target=self.server.run, name="metafit-serve-http", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(90)


__all__ = ["BackgroundServer", "build_state", "free_port", "missing_serve_extra", "serve"]
