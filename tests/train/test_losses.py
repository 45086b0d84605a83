"""Shared losses against hand-computed references."""
import numpy as np
from flax import nnx

from metafit.models.mlp import MLP
from metafit.train.losses import classification_loss


def test_classification_loss_is_mean_cross_entropy_with_accuracy():
    model = MLP(4, (8,), 3, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 4)).astype(np.float32), rng.integers(0, 3, 10).astype(np.int32)
    loss, metrics = classification_loss(graphdef)(params, (x, y), None)
    logits = np.asarray(model(x), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(loss, -log_probs[np.arange(10), y].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(logits.argmax(-1) == y))
