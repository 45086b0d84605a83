"""Per-sample gating: gate 0 = base model with zero adapter gradients, gate 1 = plain PEFT, inside jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metafit.peft as peft

from peft_tiny import (METHODS, adapter_loss_and_grads, all_methods_model, forward, host_normal, make_input, make_model,
                       perturb_adapters, target_of)

def adapted(name, seed=0):
    model = make_model(seed)
    peft.apply(model, METHODS[name], rngs=nnx.Rngs(1))
    return perturb_adapters(model)


def loss_and_grads(model, gates, x):
    return adapter_loss_and_grads(*peft.split(model), gates, x, target_of(x))


def test_gate_zero_is_base_with_zero_gradient_and_gate_one_is_plain():
    """On a model carrying all six methods: per-sample gates of 0 give the base model and exactly zero
    gradient to every adapter weight; gates of 1 give plain PEFT and every adapter weight learns."""
    x = make_input()
    base = forward(make_model(), x)
    model = all_methods_model()
    kinds = {type(m).__name__ for _, m in peft.core.peft_modules(model)}
    assert kinds == {"LoRALinear", "IA3Linear", "BottleneckAdapter", "BitFitBias", "KVPrefix"}
    plain = forward(model, x)
    assert not np.allclose(plain, base, atol=1e-3)  # the adapters do something
    n, batch = peft.count_gated_modules(model), x.shape[0]

    (_, out0), grads0 = loss_and_grads(model, jnp.zeros((n, batch)), x)
    np.testing.assert_allclose(out0, base, rtol=1e-5, atol=1e-5)  # jit vs jit: rounding only
    for path, grad in nnx.to_flat_state(grads0):
        assert np.all(np.asarray(grad[...]) == 0), path

    (_, out1), grads1 = loss_and_grads(model, jnp.ones((n, batch)), x)
    np.testing.assert_allclose(out1, plain, rtol=1e-5, atol=1e-5)
    for path, grad in nnx.to_flat_state(grads1):
        assert np.any(np.asarray(grad[...]) != 0), path


def test_per_sample_gates_route_each_sample():
    """Sample 0 gated off in every module -> its row is the base model's; samples 1, 2 on -> plain PEFT."""
    x = make_input(batch=3)
    base = forward(make_model(), x)
    model = all_methods_model()
    plain = forward(model, x)
    peft.set_gates(model, jnp.array([[0.0, 1.0, 1.0]]))  # [1, batch]: the same row for every module
    out = forward(model, x)
    np.testing.assert_allclose(out[0], base[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1:], plain[1:], rtol=1e-5, atol=1e-5)


def test_each_module_output_is_linear_in_its_gate():
    """y(g) = y(0) + g * (y(1) - y(0)) for every module-wrapping method (e.g. CleaR's expectation routing)."""
    model = all_methods_model()

    def wrappers(model):  # prefixes gate attention weights instead (test_prefix.py); layer 1 repeats layer 0
        return {peft.core.path_str(path): wrapper for path, wrapper in peft.core.peft_modules(model)
                if not isinstance(wrapper, peft.KVPrefix) and path[1] == 0}

    inputs = {}
    for i, (name, wrapper) in enumerate(wrappers(model).items()):
        base = wrapper.base_layer
        inputs[name] = host_normal(4 + i, (2, getattr(base, "in_features", None) or base.num_features), 1.0)
    assert len(inputs) == 7  # q (LoRA), k and v (IA3), o and down (adapter), up (DoRA), norm (BitFit)
    graphdef, state = nnx.split(model)

    @jax.jit
    def outputs_at(state, gate):  # every wrapper at one gate value: one program, not one per operation
        model = nnx.merge(graphdef, state)
        outputs = {}
        for name, wrapper in wrappers(model).items():
            peft.set_gates(model, {name: gate})
            outputs[name] = wrapper(inputs[name])
        return outputs

    outputs = {g: outputs_at(state, g) for g in (0.0, 0.25, 1.0)}
    assert outputs_at._cache_size() == 1
    for name in inputs:
        y0, y25, y1 = (outputs[g][name] for g in (0.0, 0.25, 1.0))
        np.testing.assert_allclose(y25, y0 + 0.25 * (y1 - y0), rtol=1e-5, atol=1e-5, err_msg=name)
        assert not np.allclose(y0, y1), name


def test_set_gates_in_jit_without_recompiling():
    x = make_input()
    model = all_methods_model()  # its per-sample-gated forward is compiled once for the test above
    graphdef, params, rest = peft.split(model)
    n = peft.count_gated_modules(model)

    @jax.jit
    def gated_forward(params, rest, gates, x):
        m = nnx.merge(graphdef, params, rest)
        peft.set_gates(m, gates)
        return m(x)

    key = jax.random.key(0)
    for i in range(3):
        gates = peft.bernoulli_gates(jax.random.fold_in(key, i), jnp.full((x.shape[0],), 0.5), n)
        out = gated_forward(params, rest, gates, x)
        peft.set_gates(model, gates)
        np.testing.assert_allclose(out, forward(model, x), rtol=1e-5, atol=1e-5)
    assert gated_forward._cache_size() == 1
    # the caller's model is not touched by set_gates inside jit: its gates are what we set eagerly
    assert peft.get_gates(model)[peft.gated_paths(model)[0]].shape == (x.shape[0],)


def test_gate_bookkeeping_and_errors():
    model = adapted("adapter")
    paths = peft.gated_paths(model)
    assert peft.count_gated_modules(model) == len(paths) == 4
    peft.set_gates(model, {paths[1]: jnp.array([0.0, 1.0])})
    gates = peft.get_gates(model)
    assert gates[paths[0]].shape == () and gates[paths[1]].shape == (2,)
    peft.reset_gates(model)
    assert all(g.shape == () and g == 1 for g in peft.get_gates(model).values())
    with pytest.raises(ValueError, match="leading size 3"):
        peft.set_gates(model, jnp.ones((3, 2)))
    with pytest.raises(KeyError, match="no gated PEFT module"):
        peft.set_gates(model, {"layers.0.nope": 1.0})
    assert all(isinstance(v, peft.Gate) for _, v in nnx.to_flat_state(nnx.state(model, peft.Gate)))


def test_bernoulli_gates():
    prob = jnp.array([0.0, 0.3, 1.0])
    g = peft.bernoulli_gates(jax.random.key(0), prob, 4000)
    assert g.shape == (4000, 3) and g.dtype == jnp.float32
    np.testing.assert_allclose(g.mean(0), prob, atol=0.03)
    assert peft.bernoulli_gates(jax.random.key(1), 0.85, 6).shape == (6,)
