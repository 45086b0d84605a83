"""The HTTP server through the official openai client: completions, chat (stream and not), models, errors.

One tiny server (1-layer Llama, character tokenizer, one bucket pair) runs on a free loopback port
for the whole module; outputs are checked against metafit.models.generate and metafit.peft.
Every prompt is 6 tokens long (the chat prompt's length), so the reference generation compiles once.
"""
import threading
import time

import httpx
import numpy as np
import pytest
from flax import nnx

import metafit.models as mm
import metafit.peft as peft
from metafit.serve.config import AdapterEntry, ServeConfig
from metafit.serve.engine import Request, compiled_programs
from metafit.serve.server import BackgroundServer, build_state
from serve_tiny import tiny_folder

KEY = "test-key"
NEW = 8


@pytest.fixture(scope="module")
def openai():
    """The official client, imported when the first test here runs: at module level every xdist
    worker would import it while collecting (0.8 s of CPU each), also those that never run these tests."""
    return pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(tmp_path_factory, openai):
    root = tmp_path_factory.mktemp("serve")
    folder = tiny_folder(root / "base", num_hidden_layers=1)
    references = {}
    for seed, (name, spec) in enumerate({"a": dict(rank=4), "c": dict(rank=12, targets=("up_proj",))}.items()):
        model, _ = mm.load(folder, tokenizer=False)
        peft.apply(model, peft.LoraConfig(init="random", alpha=16.0, **spec), rngs=nnx.Rngs(seed))
        peft.export_hf_peft(model, root / name, base_model_name_or_path=folder)
        references[name] = peft.merge_lora(model)  # LoRA folded in by metafit.peft: the base model's program
    config = ServeConfig(model=folder, name="tiny", batch_size=4, prompt_buckets=(24,), new_token_buckets=(NEW,),
                         max_queue=2, api_key=KEY, slots={"8": 1, "16": 1}, max_request_bytes=4000,
                         adapters=(AdapterEntry("a", str(root / "a")),
                                   AdapterEntry("later", str(root / "not-trained"), "metafit run train-later.yaml")))
    warnings = []
    state = build_state(config, warn=warnings.append)
    with BackgroundServer(state) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield dict(server=server, client=client, state=state, references=references, root=root, folder=folder,
                   warnings=warnings, tokenizer=state.tokenizer)


def _expected(served, name, prompt_ids):
    """Greedy text of metafit.models.generate on the base model or the model with the adapter merged."""
    references = served["references"]
    if None not in references:
        references[None] = mm.load(served["folder"], tokenizer=False)[0]
    tokens = np.asarray(mm.generate(references[name], np.asarray(prompt_ids), max_new_tokens=NEW))[len(prompt_ids):]
    ends = np.flatnonzero(tokens == 2)  # <|end|>
    return served["tokenizer"].decode(tokens[:ends[0]] if len(ends) else tokens, skip_special_tokens=True)


def _post(served, path, body=None, *, content=None, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(served["server"].url + path, json=body, content=content, headers=headers, timeout=60)


def test_completions_and_chat_equal_generate_for_base_and_adapter(served):
    client, tokenizer = served["client"], served["tokenizer"]
    prompt = "hello!"  # 6 tokens, as the chat prompt: one compiled reference generation
    text = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0)
    assert text.choices[0].text == _expected(served, None, tokenizer(prompt)["input_ids"])
    assert text.usage.prompt_tokens == len(prompt) and text.choices[0].finish_reason in ("stop", "length")
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="tiny:a", messages=messages, max_tokens=NEW, temperature=0)
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat_ids = chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids
    want = _expected(served, "a", chat_ids)
    assert chat.choices[0].message.content == want and want != _expected(served, None, chat_ids)
    stream = client.chat.completions.create(model="tiny:a", messages=messages, max_tokens=NEW, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    pieces = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == text.choices[0].text
    stop = text.choices[0].text[2:4]
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0, stop=[stop])
    assert cut.choices[0].text == text.choices[0].text[:text.choices[0].text.find(stop)]


def test_models_lists_adapters_and_the_untrained_one(served):
    cards = {m.id: m for m in served["client"].models.list().data}
    assert set(cards) == {"tiny", "tiny:a", "tiny:later"}
    a = cards["tiny:a"].model_dump()
    assert a["loaded"] and a["rank"] == 4 and a["rank_class"] == 8 and set(a["targets"]) >= {"model.layers.0.self_attn.q_proj"}
    assert a["memory_bytes"] == 4 * 4 * ((32 + 32) + (32 + 16))  # float32 A, B of q (32 -> 32) and v (32 -> 16)
    later = cards["tiny:later"].model_dump()
    assert not later["loaded"] and "train-later" in later["train"]
    assert any("metafit run train-later.yaml" in w for w in served["warnings"])


def test_bad_requests_get_openai_errors_never_5xx(served, openai):
    client = served["client"]
    cases = [
        (dict(model="nope", prompt="x"), 404, "does not exist"),
        (dict(model="tiny:later", prompt="x"), 404, "train-later"),
        (dict(model="tiny", prompt="x" * 30), 400, "at most 24 tokens"),
        (dict(model="tiny", prompt="x", max_tokens=NEW + 1), 400, "max_tokens"),
        (dict(model="tiny", prompt="x", temperature=5), 400, "temperature"),
        (dict(model="tiny", prompt="x", n=2), 400, "'n' must be 1"),
        (dict(model="tiny", prompt="x", extra_body={"logprobs": 1, "echo": True}), 400, "echo, logprobs"),
    ]
    for kwargs, status, words in cases:
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(**{"max_tokens": 2, **kwargs})
        assert caught.value.status_code == status and words in caught.value.body["message"], kwargs
    for content, words in ((b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
                           (b'{"model": "tiny", "prompt": "' + b"x" * 5000 + b'"}', "limit")):
        response = _post(served, "/v1/completions", content=content)
        assert response.status_code in (400, 413) and words in response.json()["error"]["message"]
    response = _post(served, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": 1}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0]"
    unauthorized = _post(served, "/v1/completions", {"model": "tiny", "prompt": "x"}, key=None)
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(served["server"].url + "/nowhere").status_code == 404
    assert httpx.get(served["server"].url + "/health").json()["status"] == "ok"


def test_full_queue_answers_429_with_retry_after(served):
    engine = served["state"].engine
    with engine._lock:  # the worker blocks on its next batch; the queue then fills
        engine.submit(Request([5], max_tokens=1))
        deadline = time.monotonic() + 10
        # wait until the batch is formed (busy_rows): a worker still in its batching window could
        # take a request after the queue was seen full, and the POST below would then wait on the lock
        while not engine.busy_rows and time.monotonic() < deadline:
            time.sleep(0.01)
        while not engine.queue.full():
            engine.submit(Request([5], max_tokens=1))
        response = _post(served, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["code"] == "queue_full"


def test_adapter_load_and_unload_while_serving_without_recompiling(served, openai):
    client, root = served["client"], served["root"]
    compiled = compiled_programs()
    loaded = _post(served, "/admin/adapters", {"name": "c", "path": str(root / "c")})
    assert loaded.status_code == 201 and loaded.json()["rank_class"] == 16
    prompt = "abcdef"
    out = client.completions.create(model="tiny:c", prompt=prompt, max_tokens=NEW, temperature=0)
    assert out.choices[0].text == _expected(served, "c", served["tokenizer"](prompt)["input_ids"])
    assert compiled_programs() == compiled
    bad = _post(served, "/admin/adapters", {"name": "d", "path": str(root / "missing")})
    assert bad.status_code == 400 and "does not exist" in bad.json()["error"]["message"]
    gone = httpx.delete(served["server"].url + "/admin/adapters/c", headers={"Authorization": f"Bearer {KEY}"})
    assert gone.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny:c", prompt=prompt, max_tokens=2)
    metrics = httpx.get(served["server"].url + "/metrics").text
    assert 'metafit_serve_request_latency_seconds_count{task="c"}' in metrics
    assert "metafit_serve_queue_depth" in metrics and "metafit_serve_batch_size_bucket" in metrics


def test_concurrent_mixed_requests_are_batched_and_each_matches_alone(served, openai):
    tokenizer = served["tokenizer"]  # the queue holds 2: the client retries 429s after their Retry-After
    client = openai.OpenAI(base_url=served["server"].url + "/v1", api_key=KEY, max_retries=8, timeout=60)
    jobs = [("tiny", "first!"), ("tiny:a", "second"), ("tiny", "third!"), ("tiny:a", "fourth")]
    results = {}

    def call(i, model, prompt):
        results[i] = client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0)

    threads = [threading.Thread(target=call, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (model, prompt) in enumerate(jobs):
        want = _expected(served, "a" if ":" in model else None, tokenizer(prompt)["input_ids"])
        assert results[i].choices[0].text == want


def test_graceful_shutdown_finishes_in_flight_requests(served):  # last: it stops the module's server
    server, engine = served["server"], served["state"].engine
    body = {"model": "tiny", "prompt": "byebye", "max_tokens": NEW, "temperature": 0}
    result = {}
    with engine._lock:  # the request is taken by the worker and held there while shutdown starts
        thread = threading.Thread(target=lambda: result.update(response=_post(served, "/v1/completions", body)))
        thread.start()
        deadline = time.monotonic() + 30
        while not engine.busy_rows and time.monotonic() < deadline:
            time.sleep(0.01)
        server.server.should_exit = True
        time.sleep(0.5)
    thread.join(60)
    assert result["response"].status_code == 200
    assert result["response"].json()["choices"][0]["text"] == _expected(served, None, served["tokenizer"]("byebye")["input_ids"])
    server.thread.join(60)
    assert not server.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)
