"""O-AMFS task weights on hand-built gradients; uniform weighting = the unweighted meta-gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metafit.data.tasks import get_tasksets
from metafit.meta import (
    MLP,
    TASK_WEIGHTINGS,
    functional,
    gradient_agreement,
    gradient_agreement_clipped,
    make_learner,
    meta_value_and_grad,
    softmax_cosine,
    task_gram,
)

# three tasks, gradients split over two leaves: g1 = (1, 0 | 0), g2 = (1, 1 | 0), g3 = (-1, 0 | 0)
GRADS = {"a": np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], np.float32), "b": np.zeros((3, 1), np.float32)}
# the weightings jitted, as the meta-gradient runs them: eagerly each of their operations compiles a program
task_gram, gradient_agreement, gradient_agreement_clipped = map(
    jax.jit, (task_gram, gradient_agreement, gradient_agreement_clipped))
softmax_cosine = jax.jit(softmax_cosine, static_argnames="temperature")
ZERO = {"a": np.zeros((2, 3), np.float32)}  # every task's gradient is zero


def test_task_gram_sums_inner_products_over_leaves():
    np.testing.assert_allclose(task_gram(GRADS), [[1, 1, -1], [1, 2, -1], [-1, -1, 1]])


def test_gradient_agreement_matches_hand_computation():
    # row sums of the Gram matrix: 1, 2, -1; normaliser |1| + |2| + |-1| = 4
    np.testing.assert_allclose(gradient_agreement(GRADS), [0.25, 0.5, -0.25], rtol=1e-6)
    identical = {"a": np.ones((4, 3), np.float32)}
    np.testing.assert_allclose(gradient_agreement(identical), [0.25] * 4, rtol=1e-6)  # agreement = uniform
    np.testing.assert_allclose(gradient_agreement(ZERO), [0.5, 0.5])  # no NaN at zero


def test_clipped_gradient_agreement_drops_the_opposing_task_and_renormalises():
    # agreements 1, 2, -1 -> clipped 1, 2, 0 -> divided by 3
    np.testing.assert_allclose(gradient_agreement_clipped(GRADS), [1 / 3, 2 / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(gradient_agreement_clipped(ZERO), [0.5, 0.5])  # no NaN at zero
    for weights in (gradient_agreement_clipped(GRADS), softmax_cosine(GRADS)):
        assert float(weights.min()) >= 0 and float(weights.sum()) == pytest.approx(1.0)


def test_softmax_cosine_matches_hand_computation():
    c = 1 / np.sqrt(2)  # cos(g1, g2)
    mean_other = np.array([(c - 1) / 2, (c - c) / 2, (-1 - c) / 2])
    expected = np.exp(mean_other / 0.5) / np.exp(mean_other / 0.5).sum()
    np.testing.assert_allclose(softmax_cosine(GRADS, temperature=0.5), expected, rtol=1e-5)


def _maml_on_six_sinusoids():
    """Two-step MAML on an MLP 1-16-1, its meta-parameters and a batch of 6 sinusoid tasks."""
    network, params = functional(MLP(1, (16,), 1, rngs=nnx.Rngs(0)))
    tasks = get_tasksets("sinusoid", shots=5, queries=5).train.sample_batch(jax.random.key(0), 6)
    learner = make_learner("maml", network, loss="mse", output_dim=1, inner_steps=2)
    return learner, learner.init(params), tasks


def test_uniform_weights_reproduce_the_unweighted_meta_gradient():
    learner, meta, tasks = _maml_on_six_sinusoids()

    @jax.jit
    def both(p):
        plain = meta_value_and_grad(learner, p, tasks, jax.random.key(1), weighting=None)
        weighted = meta_value_and_grad(learner, p, tasks, jax.random.key(1), weighting=TASK_WEIGHTINGS.get("uniform"))
        return plain, weighted

    ((loss_a, _), grads_a), ((loss_b, metrics_b), grads_b) = both(meta)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)  # float32 summation order differs
    np.testing.assert_allclose(metrics_b["weight_min"], 1 / 6, rtol=1e-6)


def test_gradient_agreement_downweights_an_opposing_task_in_the_meta_gradient():
    # O-AMFS end to end on a linear model: two tasks agree, the third pulls the other way
    from metafit.data.tasks import Task
    from metafit.meta import Network

    net = Network(apply=lambda p, x: x @ p["w"], features=lambda p, x: x, head=lambda h, f: f @ h["w"])
    x = jnp.tile(jnp.eye(2)[None], (3, 1, 1))
    y = jnp.array([[[1.0], [0.0]], [[1.0], [0.0]], [[-1.0], [0.0]]])
    tasks = Task((x, y), (x, y))
    learner = make_learner("o-amfs", net, loss="mse", output_dim=1, inner_lr=0.0, weighting="gradient_agreement")
    (_, metrics), grads = jax.jit(lambda p: meta_value_and_grad(learner, p, tasks, jax.random.key(0)))(
        learner.init({"w": jnp.zeros((2, 1))}))
    # per-task grads of mean((x w - y)^2) at w = 0: -y_0 on w_0 -> (-1, -1, +1); weights (1/3, 1/3, -1/3)
    np.testing.assert_allclose(grads["net"]["w"][:, 0], [-1.0, 0.0], rtol=1e-6)
    assert float(metrics["weight_negative"]) == pytest.approx(1 / 3)


def test_unrolled_tasks_give_the_vmapped_meta_gradient():
    """batching="unroll" (one trace per task) against the vmap of all 6 tasks, for the fused mean and for a
    weighting (per-task gradients), with the same per-task keys; and evaluate one task at a time (chunk=1)."""
    from metafit.meta import batch_meta_loss, evaluate, over_tasks

    learner, meta, tasks = _maml_on_six_sinusoids()

    @jax.jit
    def both(p):
        key = jax.random.key(1)
        return {batching: (meta_value_and_grad(learner, p, tasks, key, weighting=None, batching=batching),
                           meta_value_and_grad(learner, p, tasks, key, batching=batching,
                                               weighting=TASK_WEIGHTINGS.get("softmax_cosine")),
                           batch_meta_loss(learner, p, tasks, key, batching=batching)[0])
                for batching in ("vmap", "unroll")}

    out = both(meta)
    for got, want in zip(jax.tree.leaves(out["unroll"]), jax.tree.leaves(out["vmap"])):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert float(out["vmap"][0][0][0]) == pytest.approx(float(out["vmap"][2]))  # the fused loss is the batch mean
    one, all_ = (evaluate(learner, meta, tasks, jax.random.key(2), chunk=c) for c in (1, 6))
    np.testing.assert_allclose(one["query_loss"], all_["query_loss"], rtol=2e-5)
    with pytest.raises(ValueError, match="'vmap' or 'unroll'"):
        over_tasks(lambda task, k: 0.0, tasks, jax.random.split(jax.random.key(0), 6), "loop")
