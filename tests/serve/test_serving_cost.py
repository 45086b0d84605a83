"""paper_repro/mt_server/serving_cost.py: a deployment's figures from its processes, and the table built from them."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2] / "paper_repro" / "mt_server"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _part(task, latencies, seconds, memory, em):
    return {"requests": len(latencies), "seconds": seconds, "build_and_compile_s": 1.0, "generated_tokens": 2 * len(latencies),
            "latencies_s": latencies, "resident_mb": memory, "base_parameters": 100, "adapter_parameters": 10,
            "adapters_held": 1, "exact_match": {task: em}, "load_average": 2.0}


def test_processes_serving_at_once_count_wall_time_and_sum_memory():
    cost = _module("serving_cost")
    parts = [_part("a", [0.1, 0.2, 0.3], 2.0, 500.0, 0.5), _part("b", [0.4, 1.0], 4.0, 700.0, 0.25)]
    figures = cost.summary(parts)
    assert figures["requests_per_s"] == pytest.approx(5 / 4.0)  # five requests over the slower process's 4 s
    assert figures["tokens_per_s"] == pytest.approx(10 / 4.0)
    assert figures["p50_latency_s"] == pytest.approx(np.percentile([0.1, 0.2, 0.3, 0.4, 1.0], 50))
    assert figures["p99_latency_s"] == pytest.approx(np.percentile([0.1, 0.2, 0.3, 0.4, 1.0], 99))
    assert figures["resident_mb"] == 1200.0 and figures["parameters"] == 220
    assert figures["mean_exact_match"] == pytest.approx(0.375)


def test_serving_cost_table_states_memory_against_the_eleven_processes(tmp_path):
    table = _module("make_table")
    deployment = dict(processes=1, adapters_held=11, parameters=2.9e6, resident_mb=700.0, requests_per_s=50.0,
                      tokens_per_s=150.0, p50_latency_s=1.0, p99_latency_s=2.0, mean_exact_match=0.148,
                      tasks_served_differently=[], load_average=[3.0])
    fleet = dict(deployment, processes=11, resident_mb=7000.0, load_average=[4.0])
    (tmp_path / "serving_cost_s1.json").write_text(json.dumps({"seed": 1, "deployments": {
        "eleven_processes": fleet, "one_server_eleven_adapters": deployment}}))
    lines = table.serving_cost_lines(tmp_path)
    row = next(line for line in lines if "one server, the 11 single-task adapters" in line)
    assert "700 MB (-90.0%)" in row and "| 50.0 |" in row and "| yes |" in row
    assert lines[-1].startswith("Load average during these measurements 3.0-4.0")
    assert table.serving_cost_lines(tmp_path / "none")[0].startswith("Serving cost: not measured")


def test_processes_served_in_turn_count_their_summed_time():
    cost = _module("serving_cost")
    parts = [_part("a", [0.1, 0.2, 0.3], 2.0, 500.0, 0.5), _part("b", [0.4, 1.0], 4.0, 700.0, 0.25)]
    figures = cost.summary(parts, in_turn=True)
    assert figures["requests_per_s"] == pytest.approx(5 / 6.0)  # one after another: 2 s + 4 s of serving
    assert figures["tokens_per_s"] == pytest.approx(10 / 6.0)
    assert figures["resident_mb"] == 1200.0 and figures["in_turn"] is True
    assert cost.summary(parts)["in_turn"] is False


def test_serving_cost_table_marks_processes_run_in_turn(tmp_path):
    table = _module("make_table")
    deployment = dict(processes=1, adapters_held=11, parameters=2.9e6, resident_mb=700.0, requests_per_s=50.0,
                      tokens_per_s=150.0, p50_latency_s=1.0, p99_latency_s=2.0, mean_exact_match=0.148,
                      tasks_served_differently=[], load_average=[3.0], in_turn=False)
    fleet = dict(deployment, processes=11, resident_mb=7000.0, in_turn=True)
    (tmp_path / "serving_cost_s0.json").write_text(json.dumps({"seed": 0, "deployments": {
        "eleven_processes": fleet, "one_server_eleven_adapters": deployment}}))
    lines = table.serving_cost_lines(tmp_path)
    assert any("11 processes, one single-task adapter each (run one after another**)" in line for line in lines)
    assert not any("the 11 single-task adapters (run one after another" in line for line in lines)
    assert any(line.startswith("\\** one after another") for line in lines)
