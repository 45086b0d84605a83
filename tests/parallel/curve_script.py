"""Trains the digits MLP through metafit.train.fit on a mesh and prints its loss curve as JSON.

Run by tests/parallel/test_mesh.py in subprocesses so each can choose its device
count (XLA_FLAGS) or join a multi-process cluster before JAX starts.
usage: curve_script.py OUT_JSON [DATA FSDP] [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""
import json
import sys

import jax

if len(sys.argv) > 4:
    from metafit.parallel import initialize_distributed

    initialize_distributed(sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), cpu=True)

from flax import nnx  # noqa: E402

from metafit.data.batching import epoch_batches  # noqa: E402
from metafit.data.digits import digits_split  # noqa: E402
from metafit.models.mlp import MLP  # noqa: E402
from metafit.parallel import MeshConfig, make_mesh  # noqa: E402
from metafit.train import TrainConfig, fit  # noqa: E402
from metafit.train.losses import classification_loss  # noqa: E402
from metafit.train.loop import _compiled_chunk  # noqa: E402

out = sys.argv[1]
data, fsdp = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (-1, 1)
mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp))
(x, y), _ = digits_split(0, 0.25)
graphdef, params = nnx.split(MLP(64, (32,), 10, rngs=nnx.Rngs(0)))
cfg = TrainConfig(steps=40, batch_size=64, lr=1e-2, log_every=5, steps_per_dispatch=5)
loss_fn = classification_loss(graphdef)
result = fit(loss_fn, params, epoch_batches((x, y), 64, 0), cfg, key=jax.random.key(0),
             mesh=mesh, progress=False)
if jax.process_index() == 0:
    json.dump({"devices": jax.device_count(), "mesh": dict(mesh.shape),
               "loss": [h["loss"] for h in result.history],
               # programs the jitted train chunk compiled: one per chunk length (5 steps here)
               "compiles": _compiled_chunk(loss_fn, None, cfg, None, mesh)._cache_size()}, open(out, "w"))
