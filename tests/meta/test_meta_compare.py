"""meta_compare (the quick start's main job) and adapted_predictions."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from metafit.data.tasks import get_tasksets
from metafit.experiments import load_run_config, run_experiment
from metafit.meta import MLP, adapted_predictions, functional, make_learner, meta_loss

REPO = Path(__file__).resolve().parents[2]
# val_tasks = eval_tasks: the validation and test batches come from one compiled sampler
TINY = ["train.steps=20", "train.log_every=10", "train.steps_per_dispatch=10", "train.ckpt_every=20",
        "args.widths=[8]", "args.eval_tasks=8", "args.val_tasks=8", "args.plot_points=16",
        "args.learners={anil: {}, r2d2: {}}"]  # ANIL compiles faster than second-order MAML; the wiring is the same


@pytest.mark.parametrize("name", ["maml", "r2d2"])
def test_adapted_predictions_are_what_meta_loss_scores(name):
    tasks = get_tasksets("sinusoid", shots=5, queries=7)
    network, params = functional(MLP(1, (8,), 1, rngs=nnx.Rngs(0)))
    learner = make_learner(name, network, loss="mse", output_dim=1)
    meta_params = learner.init(params)
    task = jax.tree.map(lambda leaf: leaf[0], tasks.test.sample_batch(jax.random.key(0), 1))
    predictions = adapted_predictions(learner, meta_params, task, jax.random.key(1))
    # jitted: run eagerly, each of meta_loss's operations would compile its own program (27 for R2-D2)
    loss, _ = jax.jit(lambda p, t: meta_loss(learner, p, t, jax.random.key(1)))(meta_params, task)
    assert predictions.shape == (7, 1)
    np.testing.assert_allclose(np.mean((predictions - np.asarray(task.query[1])) ** 2), float(loss), rtol=1e-5)


def test_meta_compare_trains_each_learner_on_the_same_tasks(tmp_path):
    run, results = run_experiment(REPO / "configs/quickstart_meta.yaml", TINY, workdir=tmp_path / "run")
    assert set(results["methods"]) == {"anil", "r2d2"}
    for row in results["methods"].values():
        assert row["steps"] == 20 and row["eval_tasks"] == 8 and np.isfinite(row["query_mse"])
    for plot in ("fits.png", "meta_loss.png"):
        assert (run.path / plot).stat().st_size > 1000
    stages = {json.loads(line)["stage"] for line in (run.path / "metrics.jsonl").read_text().splitlines()}
    assert {"anil", "r2d2"} <= stages  # each learner logs (and checkpoints) as its own stage


def test_meta_compare_refuses_classification_and_unknown_learners():
    assert set(load_run_config(REPO / "configs/quickstart_meta.yaml").args.learners) == {"maml", "r2d2"}
    with pytest.raises(ValueError, match="args.taskset must be a regression task set"):
        load_run_config(REPO / "configs/quickstart_meta.yaml", ["args.taskset=glyphs"])
    with pytest.raises(Exception, match="mamll"):
        load_run_config(REPO / "configs/quickstart_meta.yaml", ["args.learners={mamll: {}}"])
