"""Shared checks over every registered learner: jit, no recompilation, tree structure, dtypes, finiteness."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metafit.data.tasks import Task, get_tasksets
from metafit.meta import META_LEARNERS, MLP, Conv4, evaluate, functional, make_learner, meta_value_and_grad, summarize


def classification_tasks(num_tasks=3, ways=3, shots=2, queries=2, side=8):
    # numpy, not eager jax.random: every eager op would compile its own tiny program
    x = np.random.default_rng(0).uniform(size=(num_tasks, ways * (shots + queries), side, side, 1)).astype(np.float32)
    labels = np.tile(np.repeat(np.arange(ways, dtype=np.int32), shots + queries), (num_tasks, 1))
    support = (x[:, : ways * shots], labels[:, : ways * shots])
    query = (x[:, ways * shots:], labels[:, ways * shots:])
    return Task(support, query)


@pytest.mark.parametrize("name", sorted(set(META_LEARNERS.names()) - {"protonet"}))
def test_regression_learner_step_jits_once_and_keeps_structure(name):
    network, params = functional(MLP(1, (8,), 1, rngs=nnx.Rngs(0)))
    learner = make_learner(name, network, loss="mse", output_dim=1)
    meta = learner.init(params)
    sampler = get_tasksets("sinusoid", shots=4, queries=3).train
    traces = []

    @jax.jit
    def step(p, key):
        traces.append(1)  # runs only while tracing
        return meta_value_and_grad(learner, p, sampler.sample_batch(key, 3), key)

    (loss, metrics), grads = step(meta, jax.random.key(0))
    step(meta, jax.random.key(1))
    assert len(traces) == 1, "second call recompiled"
    assert jax.tree.structure(grads) == jax.tree.structure(meta)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(meta)):
        assert g.shape == p.shape and g.dtype == p.dtype
        assert bool(jnp.isfinite(g).all())
    assert bool(jnp.isfinite(loss)) and "query_mse" in metrics


@pytest.mark.parametrize("name", ["maml", "protonet", "amfs"])  # anil and r2d2: dedicated tests below
def test_classification_learners(name):
    network, params = functional(MLP(64, (8,), 3, rngs=nnx.Rngs(0)))
    learner = make_learner(name, network, loss="xent", output_dim=3)
    meta = learner.init(params)
    tasks = classification_tasks()
    (loss, metrics), grads = jax.jit(lambda p: meta_value_and_grad(learner, p, tasks, jax.random.key(0)))(meta)
    assert bool(jnp.isfinite(loss)) and 0.0 <= float(metrics["query_accuracy"]) <= 1.0
    assert jax.tree.structure(grads) == jax.tree.structure(meta)
    body_grad = float(jnp.abs(grads["net"]["dense0"]["kernel"]).sum())
    assert body_grad > 0, f"{name}: no meta-gradient reaches the first layer"


def test_conv4_shapes_and_meta_gradient_structure():
    # abstract modules (shapes only): nothing here is initialised or compiled, only traced
    network, params = functional(nnx.eval_shape(lambda: Conv4(1, 3, hidden=4, image_size=28, rngs=nnx.Rngs(0))))
    features = jax.eval_shape(network.features, params, jnp.zeros((2, 28, 28, 1)))
    assert features.shape == (2, 4 * 2 * 2)  # 28 -> 14 -> 7 -> 4 -> 2
    network, params = functional(nnx.eval_shape(
        lambda: Conv4(1, 3, hidden=4, image_size=8, norm="layer", rngs=nnx.Rngs(0))))
    learner = make_learner("maml", network, loss="xent", output_dim=3, inner_lr=0.1)
    meta = learner.init(params)
    # traced, not compiled: second-order Conv4 compiles slowly on a small CPU; the numerics of the
    # same learner code are checked on MLPs above
    (loss, _), grads = jax.eval_shape(lambda p: meta_value_and_grad(learner, p, classification_tasks(),
                                                                    jax.random.key(0)), meta)
    assert loss.shape == () and jax.tree.structure(grads) == jax.tree.structure(meta)
    assert all(g.shape == p.shape and g.dtype == p.dtype for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(meta)))
    with pytest.raises(ValueError, match="norm"):
        Conv4(1, 3, norm="group", rngs=nnx.Rngs(0))


def test_anil_adapts_only_the_head_and_protonet_prototypes_are_class_means():
    network, params = functional(MLP(4, (5,), 2, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (6, 4))
    y = jnp.array([0, 0, 0, 1, 1, 1])
    anil = make_learner("anil", network, loss="xent", output_dim=2, inner_lr=0.5, inner_steps=2)
    adapted = jax.jit(lambda p: anil.adapt(anil.init(p), (x, y)))(params)
    np.testing.assert_array_equal(adapted["dense0"]["kernel"], params["dense0"]["kernel"])
    assert not np.allclose(adapted["head"]["kernel"], params["head"]["kernel"])
    proto = make_learner("protonet", network, loss="xent", output_dim=2)
    prototypes, features = jax.jit(lambda p: (proto.adapt(proto.init(p), (x, y)), network.features(p, x)))(params)
    np.testing.assert_allclose(prototypes, [features[:3].mean(0), features[3:].mean(0)], rtol=1e-6)


def test_r2d2_head_is_ridge_regression_on_features():
    network, params = functional(MLP(3, (4,), 2, rngs=nnx.Rngs(0)))
    x, xq = jax.random.normal(jax.random.key(0), (5, 3)), jax.random.normal(jax.random.key(1), (2, 3))
    y = jnp.array([0, 1, 0, 1, 1])
    learner = make_learner("r2d2", network, loss="xent", output_dim=2, ridge=0.7)
    meta = learner.init(params)
    out, features, features_q = jax.jit(lambda m: (learner.predict(m, learner.adapt(m, (x, y)), xq),
                                                   network.features(m["net"], x), network.features(m["net"], xq)))(meta)
    phi = np.concatenate([np.asarray(features), np.ones((5, 1))], 1)  # bias feature
    phi_q = np.concatenate([np.asarray(features_q), np.ones((2, 1))], 1)
    weights = np.linalg.solve(phi.T @ phi + 0.7 * np.eye(phi.shape[1]), phi.T @ np.eye(2)[np.asarray(y)])  # primal
    np.testing.assert_allclose(out, phi_q @ weights, rtol=2e-4, atol=2e-5)


def test_evaluate_reports_per_task_values_and_ci():
    network, params = functional(MLP(1, (8,), 1, rngs=nnx.Rngs(0)))
    learner = make_learner("maml", network, loss="mse", output_dim=1)
    tasks = get_tasksets("sinusoid", shots=5, queries=5).test.sample_batch(jax.random.key(0), 7)
    per_task = evaluate(learner, learner.init(params), tasks, jax.random.key(1), chunk=3)
    assert per_task["query_mse"].shape == (7,)
    scores = summarize(per_task)
    assert scores["query_mse_ci95"] > 0 and np.isclose(scores["query_mse"], per_task["query_mse"].mean())


def test_build_backbone_by_name():
    from metafit.meta import build_backbone

    network, params = build_backbone("mlp", (2, 3), 4, seed=5, widths=(6,))
    reference, ref_params = functional(MLP(6, (6,), 4, rngs=nnx.Rngs(5)))
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    x = jnp.ones((7, 2, 3))
    assert network is reference  # one Network per backbone structure, so this compiles once
    apply = jax.jit(network.apply)
    np.testing.assert_array_equal(apply(params, x), apply(ref_params, x))
    conv, conv_params = build_backbone("conv4", (8, 8, 1), 3, seed=0, conv_hidden=4, conv_norm="layer")
    assert jax.eval_shape(conv.apply, conv_params, jnp.zeros((2, 8, 8, 1))).shape == (2, 3)  # traced, not compiled
    with pytest.raises(ValueError, match="conv4 needs image inputs"):
        build_backbone("conv4", (5,), 3, seed=0)
    with pytest.raises(ValueError, match="valid: mlp, conv4"):
        build_backbone("resnet", (5,), 3, seed=0)
