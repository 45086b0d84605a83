"""MAML-family correctness against closed forms: quadratic meta-gradient, first order, zero inner lr."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metafit.data.tasks import Task
from metafit.meta import META_LEARNERS, Network, make_learner, meta_loss, meta_value_and_grad
from metafit.meta.learners import inner_sgd
from metafit.registry import UnknownNameError


def linear_network() -> Network:
    """``f(x) = x w``: with squared error every task loss is a quadratic in ``w``."""
    apply = lambda p, x: x @ p["w"]  # noqa: E731
    return Network(apply=apply, features=lambda p, x: x, head=lambda h, f: f @ h["w"])


def quadratic_task(seed: int, d: int = 3, n: int = 6):
    rng = np.random.default_rng(seed)
    xs, xq = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    ys, yq = rng.normal(size=(n, 1)), rng.normal(size=(n, 1))
    return Task((xs, ys), (xq, yq))


def as_jax(task, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), task)


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_on_quadratic_equals_analytic(steps):
    # L_s(w) = |Xs w - ys|^2 / n has gradient H_s (w - w*) with H_s = 2 Xs^T Xs / n, so after k
    # steps w_k = w - a sum ..., d w_k / d w = (I - a H_s)^k and the meta-gradient is
    # (I - a H_s)^k grad L_q(w_k).
    task, lr = quadratic_task(0), 0.05
    (xs, ys), (xq, yq) = task
    n = len(xs)
    w0 = np.random.default_rng(1).normal(size=(3, 1))
    w = w0.copy()
    for _ in range(steps):
        w = w - lr * 2 * xs.T @ (xs @ w - ys) / n
    contraction = np.linalg.matrix_power(np.eye(3) - lr * 2 * xs.T @ xs / n, steps)
    expected = contraction @ (2 * xq.T @ (xq @ w - yq) / n)

    with jax.enable_x64(True):
        learner = make_learner("maml", linear_network(), loss="mse", output_dim=1, inner_lr=lr, inner_steps=steps)
        meta_params = learner.init({"w": jnp.asarray(w0)})
        batch = as_jax(task, jnp.float64)
        grads = jax.jit(jax.grad(lambda p: meta_loss(learner, p, batch, jax.random.key(0))[0]))(meta_params)
        np.testing.assert_allclose(np.asarray(grads["net"]["w"]), expected, rtol=1e-10, atol=1e-12)


def test_fomaml_equals_maml_with_stop_gradient():
    task = as_jax(quadratic_task(2), jnp.float32)
    net, lr = linear_network(), 0.05
    w0 = {"w": jnp.asarray(np.random.default_rng(3).normal(size=(3, 1)), jnp.float32)}
    query_loss = lambda w: jnp.mean((task.query[0] @ w["w"] - task.query[1]) ** 2)  # noqa: E731
    support_loss = lambda w: jnp.mean((task.support[0] @ w["w"] - task.support[1]) ** 2)  # noqa: E731

    def by_hand(w):
        inner = jax.lax.stop_gradient(jax.grad(support_loss)(w))
        return query_loss(jax.tree.map(lambda p, g: p - lr * g, w, inner))

    fomaml = make_learner("fomaml", net, loss="mse", output_dim=1, inner_lr=lr)
    maml = make_learner("maml", net, loss="mse", output_dim=1, inner_lr=lr)
    key = jax.random.key(0)

    @jax.jit  # one program instead of one per eager op
    def gradients(w):
        adapted = maml.adapt(maml.init(w), task.support, key=key)
        return (jax.grad(lambda p: meta_loss(fomaml, p, task, key)[0])(fomaml.init(w))["net"]["w"],
                jax.grad(lambda p: meta_loss(maml, p, task, key)[0])(maml.init(w))["net"]["w"],
                jax.grad(by_hand)(w)["w"], jax.grad(query_loss)(adapted)["w"])

    g_fo, g_so, g_by_hand, g_at_adapted = gradients(w0)
    np.testing.assert_allclose(g_fo, g_by_hand, rtol=1e-5)
    np.testing.assert_allclose(g_fo, g_at_adapted, rtol=1e-5)  # = grad at the adapted point
    assert not np.allclose(g_fo, g_so, rtol=1e-3)  # the second-order term is really dropped


def test_one_step_maml_with_zero_inner_lr_is_plain_training():
    from metafit.train import DeviceSampler, TrainConfig, fit

    net = linear_network()
    w0 = {"w": jnp.zeros((3, 1), jnp.float32)}
    true_w = jnp.array([[1.0], [-2.0], [0.5]])

    def sample(key):  # a batch of 4 linear-regression tasks
        x = jax.random.normal(key, (4, 12, 3))
        y = x @ true_w + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (4, 12, 1))
        return Task((x[:, :6], y[:, :6]), (x[:, 6:], y[:, 6:]))

    learner = make_learner("maml", net, loss="mse", output_dim=1, inner_lr=0.0, inner_steps=1)
    config = TrainConfig(steps=30, lr=0.05, optimizer="adam", log_every=10, steps_per_dispatch=10)
    meta = fit(lambda p, b, k: (jnp.zeros(()), {}), learner.init(w0), DeviceSampler(sample), config,
               key=jax.random.key(0), progress=False,
               grad_fn=lambda p, b, k: meta_value_and_grad(learner, p, b, k))

    def plain_loss(p, batch, key):  # ordinary regression on the query sets, no adaptation
        return jnp.mean((batch.query[0] @ p["net"]["w"] - batch.query[1]) ** 2), {}

    plain = fit(plain_loss, {"net": w0}, DeviceSampler(sample), config, key=jax.random.key(0), progress=False)
    np.testing.assert_allclose(meta.params["net"]["w"], plain.params["net"]["w"], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(meta.params["net"]["w"]).sum()) > 0.1  # it actually trained


def test_inner_sgd_scan_matches_python_loop_and_zero_steps_is_identity():
    loss = lambda p: jnp.sum((p["a"] - 3.0) ** 2) + jnp.sum(p["b"] ** 4)  # noqa: E731
    params = {"a": jnp.array([0.0, 1.0]), "b": jnp.array(0.5)}
    expected = params
    for _ in range(4):
        expected = jax.tree.map(lambda p, g: p - 0.1 * g, expected, jax.grad(loss)(expected))
    np.testing.assert_allclose(inner_sgd(loss, params, 0.1, 4)["a"], expected["a"], rtol=1e-6)
    unchanged = inner_sgd(loss, params, 0.1, 0)
    np.testing.assert_array_equal(unchanged["a"], params["a"])
    np.testing.assert_array_equal(unchanged["b"], params["b"])


def test_metasgd_at_init_equals_maml_and_its_rate_gradient_has_the_closed_form():
    # w' = w - a * g_s (per-parameter rates a, g_s = grad L_s(w)), so d L_q(w') / d a = -grad L_q(w') * g_s
    task = as_jax(quadratic_task(4), jnp.float32)
    (xs, ys), (xq, yq) = jax.tree.map(np.asarray, task)
    w0 = {"w": jnp.ones((3, 1), jnp.float32)}
    maml = make_learner("maml", linear_network(), loss="mse", output_dim=1, inner_lr=0.05)
    msgd = make_learner("metasgd", linear_network(), loss="mse", output_dim=1, inner_lr=0.05)
    key = jax.random.key(0)
    maml_loss, msgd_loss, grads = jax.jit(lambda w: (
        meta_loss(maml, maml.init(w), task, key)[0], meta_loss(msgd, msgd.init(w), task, key)[0],
        jax.grad(lambda p: meta_loss(msgd, p, task, key)[0])(msgd.init(w))))(w0)
    assert np.isclose(maml_loss, msgd_loss)
    w = np.ones((3, 1))
    support_grad = 2 * xs.T @ (xs @ w - ys) / len(xs)
    adapted = w - 0.05 * support_grad
    expected = -(2 * xq.T @ (xq @ adapted - yq) / len(xq)) * support_grad
    np.testing.assert_allclose(grads["inner_lr"]["w"], expected, rtol=1e-4, atol=1e-6)


def test_reptile_direction_is_theta_minus_phi():
    task = as_jax(quadratic_task(5), jnp.float32)
    (xs, ys), _ = jax.tree.map(np.asarray, task)
    w0 = {"w": jnp.ones((3, 1), jnp.float32)}
    reptile = make_learner("reptile", linear_network(), loss="mse", output_dim=1, inner_lr=0.05, inner_steps=3)
    batch = jax.tree.map(lambda a: a[None], task)
    (_, _), grads = jax.jit(lambda p: meta_value_and_grad(reptile, p, batch, jax.random.key(0)))(reptile.init(w0))
    phi = np.ones((3, 1))  # three SGD steps on the support loss, by hand
    for _ in range(3):
        phi = phi - 0.05 * 2 * xs.T @ (xs @ phi - ys) / len(xs)
    np.testing.assert_allclose(grads["net"]["w"], np.ones((3, 1)) - phi, rtol=1e-5, atol=1e-7)


def test_unknown_learner_and_option_names_fail_with_suggestions():
    with pytest.raises(UnknownNameError, match="did you mean 'maml'"):
        make_learner("mamll", linear_network(), loss="mse", output_dim=1)
    with pytest.raises(ValueError, match="unknown key 'learner_args.inner_lrr'; did you mean 'inner_lr'"):
        make_learner("maml", linear_network(), loss="mse", output_dim=1, inner_lrr=0.1)
    with pytest.raises(UnknownNameError, match="gradient_agreement"):
        make_learner("o-amfs", linear_network(), loss="mse", output_dim=1, weighting="gradient_agreemnt")
    with pytest.raises(ValueError, match="classification"):
        make_learner("protonet", linear_network(), loss="mse", output_dim=1)
    assert {"maml", "fomaml", "anil", "metasgd", "reptile", "protonet", "r2d2", "i-amfs", "o-amfs", "amfs"} <= set(
        META_LEARNERS.names())
