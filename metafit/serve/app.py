"""The HTTP server: an OpenAI-compatible Starlette app over the :class:`~metafit.serve.engine.Engine`.

Endpoints:

=================================  =============================================================
``POST /v1/completions``           ``model``, ``prompt``, ``max_tokens``, ``temperature``,
                                   ``top_p``, ``stop``, ``stream``, ``n=1``
``POST /v1/chat/completions``      the same with ``messages`` (the tokenizer's chat template)
``GET /v1/models``                 the base model and each adapter: rank, targets, memory, loaded
``GET /health``                    liveness, queue depth, loaded adapters
``GET /metrics``                   Prometheus text (queue depth, batch sizes, tokens/s, latency
                                   per task)
``POST /admin/adapters``           ``{"name", "path"}``: load an adapter while serving
``DELETE /admin/adapters/{name}``  unload it
=================================  =============================================================

Errors have OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: malformed JSON,
unsupported fields (named), an unknown model, a prompt over the context, bad values -> 400/404
/413; a missing or wrong API key -> 401; a full queue -> 429 with ``Retry-After``; shutting down
-> 503. Bad input never gets a 5xx, and a request that fails never stops the server.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from metafit.serve.engine import Engine, QueueFull, Request, ShuttingDown

log = logging.getLogger("metafit.serve")

COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "stream", "n"}
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
               "n"}
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class AdapterRecord:
    """An adapter the server knows: from the config (maybe not trained yet) or loaded while serving."""

    name: str
    path: str
    train: str = ""
    info: Any = None  # SlotInfo once loaded
    problem: str = ""


@dataclass
class ServerState:
    """Everything the handlers share."""

    engine: Engine
    tokenizer: Any
    name: str
    context: int
    max_prompt: int
    max_new: int
    max_request_bytes: int
    api_key: str | None
    read_adapter: Any  # (path, name) -> LoraAdapter
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    metrics: Any = None
    created: int = field(default_factory=lambda: int(time.time()))


# ---------------------------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics in a registry of their own (one per app)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("metafit_serve_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.queue_depth.set_function(engine.queue.qsize)
        self.batch_rows = Histogram("metafit_serve_batch_size", "Requests per batch", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.tokens_per_second = Gauge("metafit_serve_tokens_per_second", "Generated tokens/s of the last batch",
                                       registry=self.registry)
        self.tokens = Counter("metafit_serve_generated_tokens", "Generated tokens", ["task"], registry=self.registry)
        self.requests = Counter("metafit_serve_requests", "Answered requests", ["task", "status"],
                                registry=self.registry)
        self.latency = Histogram("metafit_serve_request_latency_seconds", "Request latency", ["task"],
                                 registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

    def on_batch(self, stats) -> None:
        self.batch_rows.observe(stats.rows)
        if stats.seconds > 0:
            self.tokens_per_second.set(stats.tokens / stats.seconds)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------- parsing


async def read_json(request, state: ServerState) -> dict[str, Any]:
    """The request body as a JSON object (413 when too large, 400 when not JSON or not an object)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > state.max_request_bytes:
        raise ApiError(413, f"request body of {length} bytes is over this server's limit of "
                            f"{state.max_request_bytes} bytes", code="request_too_large")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > state.max_request_bytes:
            raise ApiError(413, f"request body is over this server's limit of {state.max_request_bytes} bytes",
                           code="request_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a {type(data).__name__}", code="invalid_json")
    return data


def _number(data, key, default, low, high, *, integer=False, low_open=False):
    value = data.get(key, default)
    if value is None:
        value = default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", param=key)
    if (value <= low if low_open else value < low) or value > high:
        raise ApiError(400, f"'{key}' must be in {'(' if low_open else '['}{low}, {high}], got {value}", param=key)
    return value


def check_fields(data: dict, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(400, f"unsupported field(s): {', '.join(unknown)}; this server takes "
                            f"{', '.join(sorted(allowed))}", param=unknown[0], code="unsupported_field")


def resolve_model(data: dict, state: ServerState) -> str | None:
    """The adapter named by ``model`` (None = the base model); 404 for unknown or not-loaded adapters."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the base model name or '<base>:<adapter>' (see GET /v1/models)",
                       param="model")
    if model == state.name:
        return None
    base, _, adapter = model.partition(":")
    record = state.adapters.get(adapter) if base == state.name else None
    if record is None:
        names = [state.name] + [f"{state.name}:{a}" for a, r in state.adapters.items() if r.info is not None]
        raise ApiError(404, f"the model '{model}' does not exist; served models: {', '.join(names)}",
                       param="model", code="model_not_found")
    if record.info is None:
        hint = f" Train it with: {record.train}" if record.train else ""
        raise ApiError(404, f"the adapter '{adapter}' is not loaded ({record.problem or 'not loaded'}).{hint}",
                       param="model", code="model_not_found")
    return adapter


def generation_request(data: dict, prompt_ids: list[int], adapter: str | None, state: ServerState,
                       default_max: int) -> Request:
    """Validates the sampling fields and the lengths; builds the engine request."""
    n = data.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise ApiError(400, f"'n' must be 1 (one choice per request), got {n!r}", param="n")
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max, 1, state.max_new, integer=True)
    temperature = float(_number(data, "temperature", 1.0, 0, 2))
    top_p = float(_number(data, "top_p", 1.0, 0, 1, low_open=True))
    stop = data.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or any(not isinstance(s, str) or not s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most 4, got {data.get('stop')!r}",
                       param="stop")
    if not isinstance(data.get("stream", False), bool):
        raise ApiError(400, f"'stream' must be true or false, got {data.get('stream')!r}", param="stream")
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if len(prompt_ids) > state.max_prompt:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this server takes prompts of at most "
                            f"{state.max_prompt} tokens (context {state.context})", param="prompt",
                       code="context_length_exceeded")
    return Request(prompt_ids, int(max_tokens), adapter=adapter, temperature=temperature, top_p=top_p,
                   stop=tuple(stop), task=adapter or "base")


def completion_prompt(data: dict, state: ServerState) -> list[int]:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(state.tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise ApiError(400, f"token ids in 'prompt' must be in [0, {vocab})", param="prompt")
        return list(prompt)
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (or one string in a list, or a list of token ids)",
                       param="prompt")
    return list(state.tokenizer(prompt)["input_ids"])


def chat_prompt(data: dict, state: ServerState) -> list[int]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or \
                not isinstance(message.get("content"), str) or set(message) - {"role", "content", "name"}:
            raise ApiError(400, f"messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": a string}}",
                           param=f"messages[{i}]")
        clean.append({"role": message["role"], "content": message["content"]})
    if getattr(state.tokenizer, "chat_template", None) is None:
        raise ApiError(400, f"the model '{state.name}' has no chat template; use /v1/completions", param="messages")
    ids = state.tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


# ---------------------------------------------------------------------------------------------- handlers


def _authorize(request, state: ServerState) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    if header != f"Bearer {state.api_key}":
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")


def _submit(state: ServerState, job: Request) -> asyncio.Queue:
    """Queues ``job``; its events arrive on the returned asyncio queue."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(kind, value):
        try:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop closed (client gone at shutdown): nothing to deliver to
            pass

    job.emit = emit
    try:
        state.engine.submit(job)
    except QueueFull as err:
        raise ApiError(429, str(err), type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(err.retry_after)}) from None
    except ShuttingDown as err:
        raise ApiError(503, str(err), type="server_error", code="shutting_down") from None
    return events


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _generate(request, state: ServerState, chat: bool):
    from starlette.responses import JSONResponse, StreamingResponse

    _authorize(request, state)
    data = await read_json(request, state)
    check_fields(data, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    adapter = resolve_model(data, state)
    prompt_ids = chat_prompt(data, state) if chat else completion_prompt(data, state)
    job = generation_request(data, prompt_ids, adapter, state, default_max=state.max_new if chat else 16)
    model = data["model"]
    events = _submit(state, job)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    metrics = state.metrics

    def finish(status: str, tokens: int) -> None:
        metrics.requests.labels(job.task, status).inc()
        metrics.tokens.labels(job.task).inc(tokens)
        metrics.latency.labels(job.task).observe(time.perf_counter() - job.submitted)

    if data.get("stream"):
        async def sse():
            if chat:
                yield _sse(_chat_chunk(ident, created, model, {"role": "assistant", "content": ""}, None))
            while True:
                kind, value = await events.get()
                if kind == "text":
                    chunk = _chat_chunk(ident, created, model, {"content": value}, None) if chat else \
                        _text_chunk(ident, created, model, value, None)
                    yield _sse(chunk)
                elif kind == "done":
                    reason, tokens = value
                    finish("ok", tokens)
                    yield _sse(_chat_chunk(ident, created, model, {}, reason) if chat else
                               _text_chunk(ident, created, model, "", reason))
                    yield "data: [DONE]\n\n"
                    return
                else:
                    finish("error", 0)
                    yield _sse(ApiError(500, value, type="server_error").body())
                    return

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    pieces = []
    while True:
        kind, value = await events.get()
        if kind == "text":
            pieces.append(value)
        elif kind == "done":
            break
        else:
            finish("error", 0)
            raise ApiError(500, value, type="server_error")
    reason, tokens = value
    finish("ok", tokens)
    text = "".join(pieces)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason} if chat else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
    return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                         "model": model, "choices": [choice], "usage": _usage(len(prompt_ids), tokens)})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _text_chunk(ident, created, model, text, reason):
    return {"id": ident, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}


def _chat_chunk(ident, created, model, delta, reason):
    return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}


def model_cards(state: ServerState) -> list[dict[str, Any]]:
    """``/v1/models`` entries: the base model, then each adapter with rank, targets, memory and whether loaded."""
    bank = state.engine.bank
    cards = [{"id": state.name, "object": "model", "created": state.created, "owned_by": "metafit", "loaded": True,
              "adapter": False}]
    for name, record in state.adapters.items():
        card = {"id": f"{state.name}:{name}", "object": "model", "created": state.created, "owned_by": "metafit",
                "adapter": True, "loaded": record.info is not None, "path": record.path}
        if record.info is not None:
            adapter = record.info.adapter
            card.update(rank=adapter.rank, rank_class=record.info.rank_class, targets=list(adapter.targets),
                        memory_bytes=adapter.nbytes, slot_memory_bytes=bank.slot_bytes(record.info.rank_class))
        else:
            card.update(problem=record.problem, train=record.train)
        cards.append(card)
    return cards


def load_adapter(state: ServerState, name: str, path: str, train: str = "") -> AdapterRecord:
    """Reads and loads an adapter into a free slot (no recompilation); records it by name."""
    from metafit.serve.adapters import AdapterError

    existing = state.adapters.get(name)
    if existing is not None and existing.info is not None:
        raise ApiError(409, f"an adapter named '{name}' is already loaded; unload it first", param="name",
                       code="adapter_exists")
    record = AdapterRecord(name, str(path), train or (existing.train if existing else ""))
    try:
        adapter = state.read_adapter(path, name)
        record.info = state.engine.load_adapter(adapter)
    except (FileNotFoundError, AdapterError) as err:
        raise ApiError(400, f"cannot load adapter '{name}': {err}", param="path", code="adapter_invalid") from None
    state.adapters[name] = record
    return record


def build_app(state: ServerState, *, on_shutdown=()):
    """The Starlette app for ``state`` (the engine is started and stopped by the app's lifespan)."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def completions(request):
        return await _generate(request, state, chat=False)

    async def chat_completions(request):
        return await _generate(request, state, chat=True)

    async def models(request):
        _authorize(request, state)
        return JSONResponse({"object": "list", "data": model_cards(state)})

    async def health(request):
        return JSONResponse({"status": "ok", "queue_depth": state.engine.queue.qsize(),
                             "adapters_loaded": sorted(n for n, r in state.adapters.items() if r.info is not None)})

    async def metrics(request):
        return Response(state.metrics.text(), media_type="text/plain; version=0.0.4")

    async def admin_load(request):
        _authorize(request, state)
        data = await read_json(request, state)
        check_fields(data, {"name", "path", "train"})
        name, path = data.get("name"), data.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise ApiError(400, "send {\"name\": adapter name, \"path\": adapter or run folder}", param="name")
        from metafit.serve.config import _NAME

        if not _NAME.fullmatch(name):
            raise ApiError(400, f"adapter name {name!r} must be letters, digits, '_', '.', '-'", param="name")
        record = await run_in_threadpool(load_adapter, state, name, path, data.get("train", ""))
        card = next(c for c in model_cards(state) if c["id"] == f"{state.name}:{record.name}")
        return JSONResponse(card, status_code=201)

    async def admin_unload(request):
        _authorize(request, state)
        name = request.path_params["name"]
        record = state.adapters.get(name)
        if record is None or record.info is None:
            raise ApiError(404, f"no adapter named '{name}' is loaded", param="name", code="model_not_found")
        await run_in_threadpool(state.engine.unload_adapter, name)
        record.info = None
        record.problem = "unloaded"
        return JSONResponse({"id": f"{state.name}:{name}", "loaded": False})

    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: {exc.detail}", "type": kind,
                                       "param": None, "code": None}}, status_code=exc.status_code)

    async def server_error(request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                            status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.engine.stop)  # finishes queued and running requests
            log.info("engine stopped: every queued and running request finished")
            for hook in on_shutdown:
                hook()

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/admin/adapters", admin_load, methods=["POST"]),
        Route("/admin/adapters/{name}", admin_unload, methods=["DELETE"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


__all__ = ["ApiError", "ServerState", "Metrics", "build_app", "load_adapter", "model_cards"]
