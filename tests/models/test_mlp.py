"""metafit's one MLP: the forward pass by hand, its body/head split, flattening, and stable names."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.models.mlp import MLP
from metafit.tree import path_name


def test_forward_is_relu_layers_then_a_linear_head_by_hand():
    model = MLP(3, (5, 4), 2, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    h = x
    for layer in (model.dense0, model.dense1):
        h = np.maximum(h @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]), 0.0)
    expected = h @ np.asarray(model.head.kernel[...]) + np.asarray(model.head.bias[...])
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.features(x), h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.head(model.features(x)), model(x), rtol=1e-6)


def test_no_hidden_layer_is_one_linear_map_and_inputs_flatten_after_the_batch_axis():
    model = MLP(6, (), 2, rngs=nnx.Rngs(1))
    x = jnp.arange(24.0).reshape(4, 2, 3)
    np.testing.assert_allclose(model(x), model.head(x.reshape(4, 6)), rtol=1e-6)
    tanh = MLP(6, (3,), 2, activation=jnp.tanh, rngs=nnx.Rngs(1))
    assert np.all(np.abs(np.asarray(tanh.features(x))) <= 1.0)


def test_parameter_names_are_stable_strings_in_layer_order():
    _, state = nnx.split(MLP(2, (3, 3), 1, rngs=nnx.Rngs(0)), nnx.Param)
    names = [path_name(path) for path, _ in nnx.to_flat_state(state)]
    assert names == ["dense0.bias", "dense0.kernel", "dense1.bias", "dense1.kernel", "head.bias", "head.kernel"]
    # the same seed gives the same weights: layers draw their keys in order
    again = MLP(2, (3, 3), 1, rngs=nnx.Rngs(0))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(nnx.state(again))))
