"""One training run on 1 device, 4 fake CPU devices (data x fsdp) and 8 in 2 processes (data): same loss curve.

One pair of subprocesses (4 CPU devices each) forms the cluster: together they train on data x 8
across the processes, then process 0 alone on a mesh of its first device and on data 2 x fsdp 2 over
its own 4 devices.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from metafit.parallel import MeshConfig, make_mesh, param_shardings

SCRIPT = Path(__file__).with_name("curve_script.py")


def _env(devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # the script's folder, not the repository, heads its sys.path: without this a checkout other than the
    # installed one (a git worktree) would test the installed metafit
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPT.parents[2]), os.environ.get("PYTHONPATH")) if p)
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_same_loss_curve_on_1_and_8_devices_and_2_processes(tmp_path):
    coordinator = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "curves.json"
    procs = [
        subprocess.Popen([sys.executable, str(SCRIPT), str(out), "-1:1:-1,1:1:1,2:2:4", coordinator, "2", str(i)],
                         env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    eight, one, fsdp = json.loads(out.read_text())
    assert eight["devices"] == 8 and eight["processes"] == 2  # 2 processes x 4 local CPU devices form one mesh
    assert one["devices"] == 1 and fsdp["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and fsdp["processes"] == 1

    assert len(one["loss"]) == 8 and one["loss"][-1] < one["loss"][0] * 0.5  # it actually trains
    for other in (eight, fsdp):
        np.testing.assert_allclose(other["loss"], one["loss"], rtol=2e-5)
    # The train chunk compiles once on every layout (state shardings are stable across calls).
    assert [run["compiles"] for run in (one, eight, fsdp)] == [1, 1, 1]


def test_mesh_config_errors_and_fsdp_rules():
    devices = jax.devices()[:1]
    assert dict(make_mesh(MeshConfig(), devices).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        make_mesh(MeshConfig(data=-1, fsdp=-1), devices)
    with pytest.raises(ValueError, match="needs 4 devices but 1 are available"):
        make_mesh(MeshConfig(data=2, fsdp=2), devices)
    mesh = make_mesh(MeshConfig(), devices)
    specs = param_shardings({"w": np.zeros((4, 6)), "b": np.zeros(6)}, mesh, rules=[("w", (None, "tensor"))])
    assert specs["w"].spec == jax.sharding.PartitionSpec(None, "tensor")
    assert specs["b"].spec == jax.sharding.PartitionSpec()
