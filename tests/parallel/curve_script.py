"""Trains the digits MLP through metafit.train.fit on meshes and writes each loss curve as JSON.

Run by tests/parallel/test_mesh.py in subprocesses so each can choose its device count
(XLA_FLAGS) or join a multi-process cluster before JAX starts. One process trains every layout
it is given in turn (a 1-device mesh, data parallel, data x fsdp), paying the JAX start-up once.
usage: curve_script.py OUT_JSON LAYOUTS [COORDINATOR NUM_PROCESSES PROCESS_ID]
  LAYOUTS: ``data:fsdp:devices`` triples joined by commas, e.g. ``1:1:1,-1:1:-1,4:2:-1``
  (``devices`` = how many of this process's own devices the mesh takes; -1 = all devices of
  every process). In a cluster every process trains its part of the meshes across the processes
  (``-1``); only process 0 trains the meshes of its own devices, the others have nothing to do there.
"""
import json
import sys

import jax

if len(sys.argv) > 3:
    from metafit.parallel import initialize_distributed

    initialize_distributed(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), cpu=True)

from flax import nnx  # noqa: E402

from metafit.data.batching import epoch_batches  # noqa: E402
from metafit.data.digits import digits_split  # noqa: E402
from metafit.models.mlp import MLP  # noqa: E402
from metafit.parallel import MeshConfig, make_mesh  # noqa: E402
from metafit.train import TrainConfig, fit  # noqa: E402
from metafit.train.losses import classification_loss  # noqa: E402
from metafit.train.loop import _compiled_chunk  # noqa: E402

(x, y), _ = digits_split(0, 0.25)
cfg = TrainConfig(steps=40, batch_size=64, lr=1e-2, log_every=5, steps_per_dispatch=5)
curves = []
for layout in sys.argv[2].split(","):
    data, fsdp, devices = (int(v) for v in layout.split(":"))
    if devices != -1 and jax.process_index() != 0:
        continue
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp), None if devices == -1 else jax.local_devices()[:devices])
    graphdef, params = nnx.split(MLP(64, (32,), 10, rngs=nnx.Rngs(0)))
    loss_fn = classification_loss(graphdef)
    result = fit(loss_fn, params, epoch_batches((x, y), 64, 0), cfg, key=jax.random.key(0), mesh=mesh, progress=False)
    curves.append({"devices": mesh.size, "mesh": dict(mesh.shape), "loss": [h["loss"] for h in result.history],
                   "processes": len({d.process_index for d in mesh.devices.flat}),
                   # programs the jitted train chunk compiled on this mesh: one per chunk length (5 steps here)
                   "compiles": _compiled_chunk(loss_fn, None, cfg, None, mesh)._cache_size()})
if jax.process_index() == 0:
    json.dump(curves, open(sys.argv[1], "w"))
