"""Frozen probe heads against scikit-learn's LogisticRegression; the losses that close over them; a smoke
run of the ATM experiment, which trains in this setting.

The smoke is here, not beside the compatible-merge smoke in test_merge_routing.py: xdist (loadfile) gives
each file to one worker, the two smokes are the family's longest tests, and the probe heads and this
smoke both import scikit-learn (a second of CPU) in the worker that runs this file.
"""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metafit.merge import heads
from metafit.models.mlp import MLP

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "merge"


def _features_and_labels():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 120, 5)).astype(np.float32)
    multi = (features[0] @ rng.standard_normal((5, 3))).argmax(-1)       # 3 classes
    binary = (features[1, :, 0] + 0.3 * rng.standard_normal(120) > 0)    # 2 classes
    return features, np.stack([multi, binary]).astype(np.int32)


# The slow tests come first: xdist (loadfile) hands a worker its next file once at most two of its current
# file's tests are left, so a slow test at the end keeps a worker busy after it took more work.

@pytest.mark.slow
def test_atm_experiment_smoke(tmp_path):
    from metafit.experiments import run_experiment

    overrides = ["args.num_tasks=2", "args.budgets=[1]", "args.hidden=[8]", "args.pretrain_epochs=1",
                 "args.ph_rounds=1", "args.scales=[0.5,1.0]", "args.atm_sum=false", "train.batch_size=250"]
    _, results = run_experiment(CONFIGS / "atm_digits.yaml", overrides, workdir=tmp_path / "atm")
    rows = results["methods"]
    assert rows["PA-ATM"]["K=1"] == pytest.approx(rows["TA (1/T)"]["K=1"])  # ATM = TA at K = 1
    assert all(0 <= v <= 100 for row in rows.values() for v in row.values())


def test_probe_heads_give_sklearn_probabilities_and_block_unused_classes():
    from sklearn.linear_model import LogisticRegression

    features, labels = _features_and_labels()
    w, b = heads.fit_probe_heads(features, labels, c=0.5, num_classes=10)
    assert w.shape == (2, 5, 10) and b.shape == (2, 10) and w.dtype == np.float32
    for t in range(2):
        probe = LogisticRegression(C=0.5, max_iter=300).fit(features[t], labels[t])
        logits = (features[t] @ w[t] + b[t]).astype(np.float64)  # numpy softmax: no eager jnp programs
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        k = probe.classes_.size
        np.testing.assert_allclose(probs[:, :k], probe.predict_proba(features[t]), atol=1e-5)
        assert float(probs[:, k:].max()) == 0.0 and np.all(b[t, k:] == heads.UNUSED_CLASS_BIAS)


def numpy_cross_entropy(logits, labels):
    """Mean of ``logsumexp(z) − z_y`` over the rows."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return np.mean(log_norm - logits[np.arange(len(labels)), labels])


def _setup():
    graphdef, params = nnx.split(MLP(4, (6,), 3, rngs=nnx.Rngs(0)), nnx.Param)
    encode = heads.relu_encoder(graphdef)
    rng = np.random.default_rng(1)
    head_w = jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)  # indexed by a traced task: device arrays
    head_b = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
    # host inputs: slicing them per task compiles nothing (a device array's x[t] is a program per shape)
    x = rng.standard_normal((2, 8, 4)).astype(np.float32)
    y = rng.integers(0, 4, (2, 8)).astype(np.int32)
    return encode, params, head_w, head_b, x, y


def test_task_joint_losses_and_accuracies_agree_with_direct_formulas():
    encode, params, head_w, head_b, x, y = _setup()
    features = np.asarray(heads.task_features(encode, params, x))
    assert features.shape == (2, 8, 3) and features.min() >= 0.0  # relu features
    # references in numpy: eager jnp would compile one small program per op
    logits = [features[t] @ np.asarray(head_w)[t] + np.asarray(head_b)[t] for t in range(2)]
    ce = [numpy_cross_entropy(logits[t], y[t]) for t in range(2)]
    # One jitted loss serves both tasks: the task is data (``with_task``), so it compiles once.
    task_loss = jax.jit(heads.task_loss(encode, head_w, head_b))
    for t in range(2):
        batch = heads.with_task(lambda step: (x[t], y[t]), t)(0)
        loss, metrics = task_loss(params, batch, None)
        np.testing.assert_allclose(loss, ce[t], rtol=1e-6)
        np.testing.assert_allclose(metrics["accuracy"], (logits[t].argmax(-1) == y[t]).mean())
    assert task_loss._cache_size() == 1
    joint, _ = jax.jit(heads.joint_loss(encode, head_w, head_b))(params, (x, y), None)
    np.testing.assert_allclose(joint, (ce[0] + ce[1]) / 2, rtol=1e-6)
    accuracies = heads.task_accuracies(encode, head_w, head_b)(params, x, y)
    np.testing.assert_allclose(accuracies, [(logits[t].argmax(-1) == y[t]).mean() for t in range(2)])


def test_linear_head_loss_trains_encoder_and_head_together():
    encode, params, *_ = _setup()
    head_def, head_params = nnx.split(nnx.Linear(3, 5, rngs=nnx.Rngs(2)), nnx.Param)
    x = jnp.ones((4, 4))
    y = jnp.array([0, 1, 2, 3])
    loss_fn = heads.linear_head_loss(encode, head_def)
    both = {"encoder": params, "head": head_params}
    head = nnx.merge(head_def, head_params)
    # one compiled program for the features, the loss and its gradient (eager jnp would compile one per op)
    features, (loss, grads) = jax.jit(lambda p: (encode(p["encoder"], x),
                                                 jax.value_and_grad(lambda q: loss_fn(q, (x, y), None)[0])(p)))(both)
    logits = np.asarray(features) @ np.asarray(head.kernel[...]) + np.asarray(head.bias[...])
    np.testing.assert_allclose(loss, numpy_cross_entropy(logits, np.asarray(y)), rtol=1e-6)
    assert set(grads) == {"encoder", "head"}
    # The head's gradient in closed form: ∂L/∂W = featuresᵀ (softmax(logits) − onehot(y)) / n.
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.asarray(features).T @ (probs - np.eye(5)[np.asarray(y)]) / len(y)
    np.testing.assert_allclose(grads["head"]["kernel"][...], expected, rtol=1e-5, atol=1e-6)
