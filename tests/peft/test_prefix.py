"""Prefix tuning's hook against a closed form, and gating of the prefix mass."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metafit.peft as peft

from peft_tiny import forward, make_input, make_model, reference_attention


def numpy_prefix_attention(q, k, v, pk, pv, gate):
    """softmax over [prefix, own keys] with the prefix weights multiplied by gate (one sample, causal)."""
    b, s, h, d = q.shape
    repeat = h // k.shape[2]
    keys = np.concatenate([np.broadcast_to(pk, (b,) + pk.shape), k], 1).repeat(repeat, 2)
    values = np.concatenate([np.broadcast_to(pv, (b,) + pv.shape), v], 1).repeat(repeat, 2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, keys) / np.sqrt(d)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    p = pk.shape[0]
    weights[..., :p] *= np.asarray(gate).reshape(-1, 1, 1, 1)
    causal = np.tril(np.ones((s, s), bool))
    weights[..., p:] *= causal
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, values)


@functools.partial(jax.jit, static_argnums=0)
def prefixed_attention(graphdef, state, q, k, v, allowed):
    """Attention over the prefix hook's keys: one program per gate shape (eagerly, one per operation)."""
    k2, v2, allowed2, bias2 = nnx.merge(graphdef, state)(k, v, allowed, None)
    return reference_attention(q, k2, v2, allowed2, bias2), k2, allowed2, bias2


@pytest.mark.parametrize("gate", [1.0, 0.3, 0.0, [1.0, 0.0], [0.2, 0.7]])
def test_kv_prefix_matches_closed_form(gate):
    rng = np.random.default_rng(0)
    b, s, h, kv, d, p = 2, 4, 4, 2, 8, 3
    q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in [(b, s, h, d), (b, s, kv, d), (b, s, kv, d)])
    prefix = peft.KVPrefix(p, kv, d, init_scale=1.0, rngs=nnx.Rngs(5))
    prefix.gate.set_value(jnp.asarray(gate, jnp.float32))
    allowed = np.tril(np.ones((s, s), bool))[None, None]
    out, k2, allowed2, bias2 = prefixed_attention(*nnx.split(prefix), q, k, v, allowed)
    assert k2.shape == (b, p + s, kv, d) and allowed2.shape[-1] == bias2.shape[-1] == p + s
    expected = numpy_prefix_attention(q, k, v, np.asarray(prefix.prefix_k[...]), np.asarray(prefix.prefix_v[...]),
                                      gate)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_kv_prefix_heads_first_layout_and_existing_bias():
    b, s, kv, d, p = 2, 3, 2, 4, 2
    k = np.random.default_rng(1).normal(size=(b, s, kv, d)).astype(np.float32)
    prefix = peft.KVPrefix(p, kv, d, rngs=nnx.Rngs(0))
    bias = np.full((b, 1, s, s), 0.5, np.float32)

    @jax.jit  # both layouts in one program (eagerly, one per operation)
    def both_layouts(state, k, bias):
        hook = nnx.merge(nnx.graphdef(prefix), state)
        k_t = k.transpose(0, 2, 1, 3)
        return hook(k, k, None, bias), hook(k_t, k_t, None, bias, seq_axis=2, head_axis=1)

    (k_bshd, _, _, bias_bshd), (k_bhsd, _, allowed, bias_bhsd) = jax.tree.map(
        np.asarray, both_layouts(nnx.state(prefix), k, bias))
    np.testing.assert_array_equal(k_bhsd, k_bshd.transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(bias_bhsd, bias_bshd)
    np.testing.assert_array_equal(bias_bshd[..., p:], bias)
    np.testing.assert_array_equal(bias_bshd[..., :p], 0.0)  # log 1
    assert allowed.dtype == jnp.bool_ and bool(allowed.all())


def test_prefix_apply_requires_the_hook():
    from peft_tiny import TinyMLP

    mlp = nnx.eval_shape(lambda: TinyMLP(rngs=nnx.Rngs(0)))  # shapes only: the error comes before any weight
    with pytest.raises(ValueError, match="kv_prefix"):
        peft.apply(mlp, peft.PrefixConfig(), rngs=nnx.Rngs(0))


def test_prefix_on_tiny_model_changes_output_and_sizes_from_attention():
    model, x = make_model(), make_input()
    base = forward(model, x)
    peft.apply(model, peft.PrefixConfig(num_prefix=5), rngs=nnx.Rngs(1))
    assert peft.gated_paths(model) == ["layers.0.self_attn.kv_prefix", "layers.1.self_attn.kv_prefix"]
    assert model.layers[0].self_attn.kv_prefix.prefix_k.shape == (5, 2, 4)
    assert not np.allclose(forward(model, x), base)
