"""One shared encoder, frozen per-task heads: the setting of task-vector merging, at small scale.

In the merging papers (task arithmetic, TIES, ATM) every task is solved by the same CLIP image
encoder followed by a fixed zero-shot head built from the class names; only the encoder is
fine-tuned and merged. Here the heads are linear probes fitted once on the pre-trained
encoder's features (:func:`fit_probe_heads`) and then frozen::

    logits_t(x) = encode(θ, x) @ W_t + b_t          W: [T, features, C], b: [T, C]

Tasks with fewer than ``C`` classes get bias −1e9 on the unused classes, so every head has the
same shape and the tasks batch with ``vmap``. The trainer losses below close over the frozen
heads and take the encoder parameters θ.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Encode = Callable[[Any, jax.Array], jax.Array]  # (params, x [b, d_in]) -> features [b, d]
UNUSED_CLASS_BIAS = -1e9


def relu_encoder(graphdef: nnx.GraphDef) -> Encode:
    """``(params, x) -> relu(module(x))`` for the NNX module ``graphdef`` (e.g. a :class:`metafit.models.mlp.MLP`)."""
    return lambda params, x: jax.nn.relu(nnx.merge(graphdef, params)(x))


def task_features(encode: Encode, params, x: np.ndarray) -> np.ndarray:
    """Host features ``[T, n, d]`` of every task's inputs ``x [T, n, d_in]`` (what the probes are fitted on)."""
    return np.asarray(_task_features(encode, params, jnp.asarray(x)))


@functools.partial(jax.jit, static_argnums=0)
def _task_features(encode: Encode, params, x):
    # jitted (eagerly, each op of the encoder compiled a program of its own) and keyed on the encoder,
    # so later calls with the same encoder and shapes reuse the program instead of a fresh jit per call
    return jax.vmap(encode, in_axes=(None, 0))(params, x)


def fit_probe_heads(features: np.ndarray, labels: np.ndarray, *, c: float,
                    num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A multinomial logistic-regression probe per task, as padded linear heads.

    The probe is scikit-learn's :class:`~sklearn.linear_model.LogisticRegression` (L2, inverse
    strength ``c``, lbfgs, 300 iterations; an unconverged probe is still a fixed head). Its
    class probabilities are ``softmax(features @ W_t + b_t)``: a binary probe's one logit ``z`` is
    stored as the pair ``[−z/2, z/2]``, whose softmax is ``[1 − σ(z), σ(z)]``.

    Args:
      features: ``[T, n, d]`` pre-trained features of each task's examples.
      labels: ``[T, n]`` integer labels in ``[0, num_classes)``.
      c: inverse L2 strength (small = weaker heads).
      num_classes: C, the padded number of outputs.

    Returns:
      ``(W float32 [T, d, C], b float32 [T, C])``; classes absent from a task's labels get bias −1e9.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    weights, biases = [], []
    for t in range(labels.shape[0]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe = LogisticRegression(C=c, max_iter=300).fit(features[t], labels[t])
        w = np.zeros((features.shape[-1], num_classes), np.float32)
        b = np.full(num_classes, UNUSED_CLASS_BIAS, np.float32)
        coef, icpt = probe.coef_, probe.intercept_
        if coef.shape[0] == 1:  # binary probes store one logit
            coef, icpt = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-icpt / 2, icpt / 2])
        w[:, probe.classes_] = coef.T
        b[probe.classes_] = icpt
        weights.append(w)
        biases.append(b)
    return np.stack(weights), np.stack(biases)


def linear_head_loss(encode: Encode, head_graphdef: nnx.GraphDef):
    """Cross-entropy of a trainable encoder with a trainable linear head (pre-training on a proxy task).

    The trainer's parameters are ``{"encoder": θ, "head": the head's nnx.Param state}``.
    """

    def loss_fn(params, batch, key):
        x, y = batch
        logits = nnx.merge(head_graphdef, params["head"])(encode(params["encoder"], x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), {}

    return loss_fn


def task_loss(encode: Encode, head_w: jax.Array, head_b: jax.Array):
    """Cross-entropy of one task through its frozen head, as a trainer loss over θ.

    The batch ``(x, y, task)`` names its task (an int32 scalar, see :func:`with_task`), so every
    task trains through this one loss function and one compiled step; a task index closed over
    (static) would compile a step per task.
    """

    def loss_fn(params, batch, key):
        x, y, task = batch
        logits = encode(params, x) @ head_w[task] + head_b[task]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": (logits.argmax(-1) == y).mean()}

    return loss_fn


def with_task(batches: Callable[[int], Any], task: int) -> Callable[[int], Any]:
    """``batch_at(step)`` of ``(x, y)`` batches as the ``(x, y, task)`` batches of :func:`task_loss`."""
    task_id = np.int32(task)
    return lambda step: (*batches(step), task_id)


def _all_task_logits(encode: Encode, params, x, head_w, head_b):
    return jax.vmap(lambda xt, w, b: encode(params, xt) @ w + b)(x, head_w, head_b)


def joint_loss(encode: Encode, head_w: jax.Array, head_b: jax.Array):
    """Mean over tasks of each task's loss, as a trainer loss (batches hold every task: ``x [T, b, d_in], y [T, b]``)."""

    def loss_fn(params, batch, key):
        x, y = batch
        logits = _all_task_logits(encode, params, x, head_w, head_b)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {}

    return loss_fn


def task_accuracies(encode: Encode, head_w: jax.Array, head_b: jax.Array) -> Callable[..., jax.Array]:
    """Jitted ``(params, x [T, n, d_in], y [T, n]) -> [T]``: each task's accuracy through its frozen head."""

    @jax.jit
    def accuracies(params, x, y):
        return (_all_task_logits(encode, params, x, head_w, head_b).argmax(-1) == y).mean(axis=1)

    return accuracies
