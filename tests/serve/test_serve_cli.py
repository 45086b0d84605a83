"""`metafit serve` command-line errors (in-process; nothing is loaded before the config is valid) and one real server process."""
from conftest import run_cli

from metafit.serve.config import load_serve_config


def test_bad_serve_configs_fail_naming_the_key(tmp_path):
    cases = {
        "batchsize: 4\n": "unknown key 'batchsize'; did you mean 'batch_size'",
        "slots: {12: 2}\n": "slots.12: slot classes are powers of two",
        "prompt_buckets: [64, 32]\n": "prompt_buckets: a non-empty increasing list",
        "adapters: [{name: a, path: x}, {name: a, path: y}]\n": "adapters[1].name: 'a' appears twice",
        "adapters: [{name: a}]\n": "missing required key 'adapters[0].path'",
    }
    for text, message in cases.items():
        path = tmp_path / "serve.yaml"
        path.write_text(text)
        result = run_cli("serve", str(path))
        assert result.returncode == 2 and message in result.stderr, (text, result.stderr)
    missing = run_cli("serve", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "absent.yaml" in missing.stderr


def test_repo_config_validates_and_cli_overrides_win(repo):
    config = load_serve_config(repo / "configs/serve/smollm2_tasks.yaml", port=9001, api_key="k")
    assert (config.host, config.port, config.api_key, config.model) == ("127.0.0.1", 9001, "k", "smollm2-135m-instruct")
    names = [a.name for a in config.adapters]
    assert len(names) == 12 and "three_stage" in names
    assert all(a.train.startswith("metafit run configs/serve/multitask_") for a in config.adapters)


def test_metafit_serve_in_a_real_process_answers_then_stops_gracefully_on_sigterm(tmp_path):
    """`metafit serve CONFIG --port N` as users start it: it binds loopback, answers a completion equal to
    metafit.models.generate's greedy text, and on SIGTERM stops its engine after the requests, then exits."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx
    import numpy as np

    import metafit.models as mm
    from conftest import REPO
    from metafit.serve.server import free_port
    from serve_tiny import tiny_folder

    folder = tiny_folder(tmp_path / "tiny")
    config = tmp_path / "serve.yaml"
    config.write_text(f"model: {folder}\nname: tiny\nbatch_size: 2\nprompt_buckets: [32]\nnew_token_buckets: [8]\n")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "metafit.cli", "serve", str(config), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120  # start-up: imports, model load, warm-up compilation
        while True:
            assert server.poll() is None, server.communicate()[1][-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "metafit serve did not answer /health within 120 s"
            time.sleep(0.2)
        answer = httpx.post(url + "/v1/completions", timeout=60,
                            content=json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0}))
        assert answer.status_code == 200, answer.text
        model, tokenizer = mm.load(folder)
        ids = tokenizer("hello", add_special_tokens=False)["input_ids"]
        expected = tokenizer.decode(np.asarray(mm.generate(model, np.asarray([ids]), max_new_tokens=8))[0, len(ids):],
                                    skip_special_tokens=True)
        assert answer.json()["choices"][0]["text"] == expected
        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM (143 in a shell)
        assert server.wait(timeout=60) == -signal.SIGTERM
        assert "engine stopped: every queued and running request finished" in server.communicate()[1]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
