"""TensorBoard event files beside metrics.jsonl, read back with the tensorboard package's own reader."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metafit.runs import RunDir, plot_curves
from metafit.train import TrainConfig, fit


def scalars(folder, tag):
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def loss(w, batch, key):
    return jnp.sum((w - batch) ** 2), {}


def test_scalars_and_plots_reach_tensorboard_and_a_resume_purges_the_lost_tail(tmp_path):
    data = lambda step: np.full(2, 1.0, np.float32)
    cfg = TrainConfig(steps=20, lr=0.1, optimizer="sgd", log_every=5, ckpt_every=10)
    with RunDir.open(tmp_path / "run", "a: 1\n") as run:
        full = fit(loss, jnp.zeros(2), data, cfg, key=jax.random.key(0), log=run.metrics, progress=False,
                   workdir=tmp_path / "ck")
        run.metrics.tensorboard.close()
        logged = scalars(tmp_path / "run" / "tensorboard" / "train", "train/loss")
        assert [s for s, _ in logged] == [5, 10, 15, 20]
        np.testing.assert_allclose([v for _, v in logged], [h["loss"] for h in full.history], rtol=1e-6)

        # a killed run that wrote points 15 and 20 after its checkpoint at 10: resume purges them
        shutil.rmtree(tmp_path / "ck" / "20")
        run.metrics.write({"stage": "train", "split": "train", "step": 15, "loss": 999.0})
        fit(loss, jnp.zeros(2), data, cfg, key=jax.random.key(0), log=run.metrics, progress=False,
            workdir=tmp_path / "ck")
        plot_curves(run.plot_path("curve"), {"loss": ([1, 2], [3, 4])}, xlabel="step", ylabel="loss")
        run.write_results({"metrics": {"loss": 1.0}})
    resumed = dict(scalars(tmp_path / "run" / "tensorboard" / "train", "train/loss"))
    assert 999.0 not in resumed.values() and sorted(resumed) == [5, 10, 15, 20]
    images = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "plots"), size_guidance={"images": 0})
    images.Reload()
    assert images.Tags()["images"] == ["curve"]
