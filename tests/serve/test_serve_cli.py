"""`metafit serve` command-line errors (in-process; nothing is loaded before the config is valid).

The real server process is tested in tests/test_cli.py (one subprocess test per command)."""
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

