"""I-AMFS closed forms vs explicit gradient descent on the linearised network and independent kernel ridge."""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from metafit.meta import (
    MLP,
    IllConditionedWarning,
    flow_coefficients,
    functional,
    make_learner,
    ntk_gram,
    ridge_coefficients,
)


def tiny_problem(outputs: int = 1):
    """A 2-6-6-o tanh-free (ReLU) MLP in float64 with a 5-point support and 4-point query set.

    The tests use ``outputs`` 1 and 3 only, so the Jacobians below compile once per shape.
    """
    network, params = functional(MLP(2, (6, 6), outputs, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    rng = np.random.default_rng(0)
    xs, xq = jnp.asarray(rng.normal(size=(5, 2))), jnp.asarray(rng.normal(size=(4, 2)))
    ys = jnp.asarray(rng.normal(size=(5, outputs)))
    return network, params, xs, ys, xq


@functools.partial(jax.jit, static_argnums=0)
def explicit_jacobian(network, params, x):
    """``[n*o, P]`` by forward-mode on the flattened parameters (independent of ntk_gram's jacrev)."""
    flat, unravel = ravel_pytree(params)
    return jax.jacfwd(lambda v: network.apply(unravel(v), x).reshape(-1))(flat)


def linearised_gd(network, params, xs, ys, xq, lr, steps, weight_decay=0.0):
    """Plain GD on delta for 1/2 |f0(X) + J delta - Y|^2 + wd/2 |delta|^2; returns f0(X*) + J(X*) delta."""
    js, jq = explicit_jacobian(network, params, xs), explicit_jacobian(network, params, xq)
    residual = (ys - network.apply(params, xs)).reshape(-1)

    @jax.jit
    def descend(delta):
        def step(delta, _):
            return delta - lr * (js.T @ (js @ delta - residual) + weight_decay * delta), None

        return jax.lax.scan(step, delta, None, length=steps)[0]

    delta = descend(jnp.zeros(js.shape[1]))
    return network.apply(params, xq) + (jq @ delta).reshape(xq.shape[0], -1)


def adapt_and_predict(learner, meta_params, xs, ys, xq):
    return jax.jit(lambda p: learner.predict(p, learner.adapt(p, (xs, ys)), xq))(meta_params)


@pytest.mark.parametrize("outputs", [1, 3])
def test_ntk_gram_equals_explicit_jacobian_product(outputs):
    with jax.enable_x64(True):
        network, params, xs, _, _ = tiny_problem(outputs)
        j = explicit_jacobian(network, params, xs)
        gram = jax.jit(lambda p, x: ntk_gram(network, p, x))(params, xs)
        np.testing.assert_allclose(gram, j @ j.T, rtol=1e-10)


def test_flow_form_equals_gradient_descent_on_linearised_model():
    with jax.enable_x64(True):
        network, params, xs, ys, xq = tiny_problem()
        learner = make_learner("i-amfs", network, loss="mse", output_dim=1, form="flow", flow_time=0.2)
        meta = learner.init(params)
        closed = adapt_and_predict(learner, meta, xs, ys, xq)
        # t = lr * steps = 0.2; discretisation error of GD is O(lr)
        gd = linearised_gd(network, params, xs, ys, xq, lr=1e-5, steps=20_000)
        np.testing.assert_allclose(closed, gd, rtol=1e-3, atol=1e-4)
        assert not np.allclose(closed, network.apply(params, xq), atol=1e-3)  # adaptation moved the predictions


def test_ridge_form_equals_converged_weight_decay_gd_and_independent_kernel_ridge():
    with jax.enable_x64(True):
        network, params, xs, ys, xq = tiny_problem(outputs=3)
        ridge = 0.3
        learner = make_learner("i-amfs", network, loss="mse", output_dim=3, form="ridge", ridge=ridge)
        meta = learner.init(params)
        closed = np.asarray(adapt_and_predict(learner, meta, xs, ys, xq))

        # independent kernel ridge: explicit Jacobians, numpy solve
        js, jq = (np.asarray(explicit_jacobian(network, params, x)) for x in (xs, xq))
        residual = (np.asarray(ys) - np.asarray(network.apply(params, xs))).reshape(-1)
        alpha = np.linalg.solve(js @ js.T + ridge * np.eye(len(residual)), residual)
        reference = np.asarray(network.apply(params, xq)) + (jq @ js.T @ alpha).reshape(4, 3)
        np.testing.assert_allclose(closed, reference, rtol=1e-8, atol=1e-10)

        # GD with weight decay converges to the ridge solution
        top = np.linalg.eigvalsh(js @ js.T).max()
        gd = linearised_gd(network, params, xs, ys, xq, lr=1.0 / (top + ridge), steps=40_000, weight_decay=ridge)
        np.testing.assert_allclose(closed, gd, rtol=1e-5, atol=1e-7)


def test_flow_form_is_finite_for_a_singular_kernel_and_tends_to_t_times_residual():
    flow = jax.jit(flow_coefficients)  # one program, not one per eager op of expm
    gram = jnp.zeros((3, 3))  # Theta = 0: phi1(0) = 1, so alpha = t r
    residual = jnp.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(flow(gram, residual, 0.7), 0.7 * residual, rtol=1e-6)
    # and matches the eigendecomposition formula on a well-conditioned kernel
    with jax.enable_x64(True):
        a = np.random.default_rng(0).normal(size=(4, 4))
        gram = a @ a.T + np.eye(4)
        r = np.arange(4.0)
        s, u = np.linalg.eigh(gram)
        expected = u @ np.diag((1 - np.exp(-0.5 * s)) / s) @ u.T @ r
        np.testing.assert_allclose(flow(jnp.asarray(gram), jnp.asarray(r), 0.5), expected, rtol=1e-9)


def test_ill_conditioned_solve_adds_jitter_and_warns_instead_of_nan():
    features = jnp.ones((4, 1))  # rank one: four identical support points
    gram = features @ features.T
    with pytest.warns(IllConditionedWarning, match="jitter"):
        alpha, jitter = ridge_coefficients(gram, jnp.array([1.0, 1.0, 1.0, 1.0]), 0.0)
    assert float(jitter) > 0 and bool(jnp.isfinite(alpha).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-posed system stays silent
        _, jitter = ridge_coefficients(gram, jnp.ones(4), 1.0)
    assert float(jitter) == 0.0


def test_ill_conditioned_kernel_learner_gives_finite_meta_gradients_and_warns_under_jit():
    from metafit.data.tasks import Task
    from metafit.meta import meta_value_and_grad

    network, params = functional(MLP(1, (8,), 1, rngs=nnx.Rngs(0)))
    learner = make_learner("i-amfs", network, loss="mse", output_dim=1, ridge=0.0)
    x = jnp.zeros((2, 6, 1))  # every support point identical: a rank-one NTK
    tasks = Task((x, jnp.ones((2, 6, 1))), (x[:, :3] + 1.0, jnp.ones((2, 3, 1))))
    step = jax.jit(lambda p, t: meta_value_and_grad(learner, p, t, jax.random.key(0)))
    with pytest.warns(IllConditionedWarning):
        (loss, metrics), grads = jax.block_until_ready(step(learner.init(params), tasks))
    assert bool(jnp.isfinite(loss)) and float(metrics["kernel_jitter"]) > 0
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_small_ridge_fits_the_support_exactly_when_the_ntk_spans_it_and_projects_otherwise():
    # At Flax's zero-bias init a ReLU MLP on 1-D inputs is positively homogeneous on each side of 0, so every
    # Jacobian row lies in span{x 1[x>0], x 1[x<0], 1[x>0], 1[x<0]}: the NTK has rank <= 4 and no ridge can
    # fit 6 support points; the closed form then returns the least-squares projection onto those 4 features.
    # Once the biases are non-zero (as after meta-training) the NTK has full rank and a tiny ridge interpolates.
    with jax.enable_x64(True):
        network, params = functional(MLP(1, (12, 12), 1, rngs=nnx.Rngs(0)))
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.uniform(-5, 5, size=(6, 1)))
        y = jnp.asarray(rng.normal(size=(6, 1)))
        learner = make_learner("i-amfs", network, loss="mse", output_dim=1, ridge=1e-10)

        @jax.jit
        def support_fit(p):
            meta = learner.init(p)
            return learner.predict(meta, learner.adapt(meta, (x, y)), x), network.apply(p, x)

        eigenvalues = np.linalg.eigvalsh(np.asarray(jax.jit(ntk_gram, static_argnums=0)(network, params, x)))
        assert int((eigenvalues > 1e-9 * eigenvalues[-1]).sum()) <= 4
        fitted, f0 = map(np.asarray, support_fit(params))
        xv = np.asarray(x)[:, 0]
        features = np.stack([xv * (xv > 0), xv * (xv < 0), 1.0 * (xv > 0), 1.0 * (xv < 0)], axis=1)
        residual = np.asarray(y) - f0
        projection = features @ np.linalg.lstsq(features, residual, rcond=None)[0]
        np.testing.assert_allclose(fitted - f0, projection, atol=1e-4)
        assert float(np.mean((fitted - np.asarray(y)) ** 2)) > 0.1  # really does not fit

        biased = jax.tree_util.tree_map_with_path(
            lambda path, leaf: jnp.asarray(rng.normal(size=leaf.shape)) if "bias" in jax.tree_util.keystr(path) else leaf,
            params)
        np.testing.assert_allclose(support_fit(biased)[0], np.asarray(y), atol=1e-6)
