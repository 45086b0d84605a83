"""Attention probabilities and the attention-bias (steering) hook."""
import numpy as np
import pytest

import metafit.models as mm
from models_tiny import bert_config, batch, build, forward, llama_config, save, torch

BIG = -1e9


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    reference = build("LlamaForCausalLM", llama_config())
    model, _ = mm.load(save(reference, tmp_path_factory.mktemp("llama")))
    return reference, model


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    reference = build("BertModel", bert_config())
    model, _ = mm.load(save(reference, tmp_path_factory.mktemp("bert")))
    return reference, model


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_attention_probabilities_match_torch(which, request):
    reference, model = request.getfixturevalue(which)
    ids, mask = batch()
    out = forward(model, ids, mask, method="forward", return_attentions=True)
    with torch.no_grad():
        want = reference(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask, dtype=torch.long),
                         output_attentions=True).attentions
    assert len(out.attentions) == len(want) == 2
    for got, ref in zip(out.attentions, want):
        assert got.shape == (3, 4, 7, 7)  # [batch, heads, queries, keys]
        real = mask == 1  # padded query rows are never read
        np.testing.assert_allclose(got[np.where(real)[0], :, np.where(real)[1]],
                                   ref.numpy()[np.where(real)[0], :, np.where(real)[1]], atol=1e-5)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_no_mask_equals_all_ones_mask(llama):
    _, model = llama
    ids, _ = batch()
    np.testing.assert_allclose(forward(model, ids), forward(model, ids, np.ones_like(ids)), atol=1e-5)


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_large_negative_bias_on_a_key_equals_masking_it(which, request):
    _, model = request.getfixturevalue(which)
    ids, _ = batch()
    key = 2
    mask = np.ones_like(ids)
    mask[:, key] = 0
    bias = np.zeros((1, 1, 7, 7), np.float32)
    bias[..., key] = BIG
    steered = forward(model, ids, np.ones_like(ids), attention_bias=bias)
    masked = forward(model, ids, mask)
    np.testing.assert_allclose(steered, masked, atol=1e-5)


def test_zero_bias_is_identity_and_bias_steers_probabilities(llama):
    _, model = llama
    ids, mask = batch()
    plain = forward(model, ids, mask, method="forward", return_attentions=True)
    zero = forward(model, ids, mask, method="forward", return_attentions=True,
                   attention_bias=np.zeros((3, 1, 7, 7), np.float32))
    np.testing.assert_allclose(zero.logits, plain.logits, atol=1e-5)
    # +2 on key 0 for head 1 of every query: only that head's probabilities change, toward key 0,
    # by exactly the closed form p0' = e^2 p0 / (1 + (e^2 - 1) p0).
    bias = np.zeros((1, 4, 7, 7), np.float32)
    bias[:, 1, :, 0] = 2.0
    steered = forward(model, ids, mask, method="forward", return_attentions=True, attention_bias=bias)
    p, q = plain.attentions[0][0], steered.attentions[0][0]  # layer 0, row 0 (no padding)
    np.testing.assert_allclose(q[[0, 2, 3]], p[[0, 2, 3]], atol=1e-5)
    expected = np.e**2 * p[1, :, 0] / (1 + (np.e**2 - 1) * p[1, :, 0])
    np.testing.assert_allclose(q[1, :, 0], expected, atol=1e-5)


def test_per_layer_bias(llama):
    _, model = llama
    ids, mask = batch()
    bias = np.random.RandomState(0).normal(size=(3, 4, 7, 7)).astype(np.float32)
    every = forward(model, ids, mask, attention_bias=bias)
    listed = forward(model, ids, mask, attention_bias=(bias, bias))
    np.testing.assert_allclose(listed, every, atol=1e-5)
    first_only = forward(model, ids, mask, method="forward", return_attentions=True,
                         attention_bias=(bias, np.zeros_like(bias)))
    assert not np.allclose(first_only.logits, every, atol=1e-3)
    with pytest.raises(ValueError, match="2 layers"):
        forward(model, ids, mask, attention_bias=(bias,))


@pytest.mark.parametrize("window", [None, 3])
def test_fused_attention_equals_einsum_path(window):
    """jax.nn.dot_product_attention (no bias, no probs) = the explicit einsum path, GQA, padding, windows."""
    import jax
    import jax.numpy as jnp

    from metafit.models import layers as L

    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 6, 4, 8))
    k, v = (jax.random.normal(kk, (2, 6, 2, 8)) for kk in keys[1:])
    padding = jnp.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # left padding: rows with no key
    slots = jnp.arange(6)
    allowed = L.attention_allowed(padding, slots, slots, causal=True, window=window)
    fused, probs = L.attend(q, k, v, allowed, scale=8**-0.5)
    assert probs is None
    explicit, _ = L.attend(q, k, v, allowed, scale=8**-0.5, attention_bias=jnp.zeros((1, 1, 6, 6)))
    np.testing.assert_allclose(fused, explicit, atol=1e-5, rtol=1e-5)
