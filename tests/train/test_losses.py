"""Shared losses against hand-computed references: the one causal-LM loss, its trainer wrapper, classification."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit.models.mlp import MLP
from metafit.train.losses import causal_lm_loss, classification_loss, lm_batch_loss, next_token_loss


def _reference(logits, ids, mask):
    """Σ m_t · (log Σ_v exp z_tv − z_t,x_{t+1}) / Σ m_t, in float64."""
    logits = np.asarray(logits, np.float64)[:, :-1]
    log_norm = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, np.asarray(ids)[:, 1:, None], -1)[..., 0]
    m = np.asarray(mask, np.float64)[:, :-1]
    return ((log_norm - target) * m).sum() / m.sum(), m.sum()


def test_causal_lm_loss_matches_hand_computed_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 6, 11)).astype(np.float32) * 3
    ids = rng.integers(0, 11, (3, 6)).astype(np.int32)
    mask = (rng.random((3, 6)) > 0.3).astype(np.float32)
    mask[:, -1] = 1.0  # the last column predicts nothing and is ignored
    lm_loss = jax.jit(causal_lm_loss)  # one program per shape, not one per primitive (op-by-op dispatch)
    loss, count = lm_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    ref, ref_count = _reference(logits, ids, mask)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert float(count) == ref_count
    # Uniform logits: the loss is log V whatever the targets; an all-zero mask gives 0, not NaN.
    uniform = lm_loss(jnp.zeros((2, 4, 7)), jnp.asarray(ids[:2, :4] % 7), jnp.ones((2, 4)))[0]
    np.testing.assert_allclose(float(uniform), np.log(7), rtol=1e-6)
    assert float(lm_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.zeros((3, 6)))[0]) == 0.0
    batch = {"input_ids": jnp.asarray(ids), "loss_mask": jnp.asarray(mask)}
    assert float(jax.jit(lm_batch_loss)(jnp.asarray(logits), batch)) == float(loss)


class _Bigram(nnx.Module):
    """logits_t = table[x_t]; ignores the attention mask."""

    def __init__(self, vocab, *, rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (vocab, vocab)))

    def __call__(self, ids, attention_mask=None):
        return self.table[ids]


def test_next_token_loss_is_the_trainer_form_of_causal_lm_loss():
    model = _Bigram(5, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    ids = jnp.array([[1, 2, 3, 4], [0, 0, 1, 1]])
    mask = jnp.array([[0, 1, 1, 0], [1, 1, 1, 0]], jnp.float32)
    loss, metrics = jax.jit(next_token_loss(graphdef))(params, {"input_ids": ids, "loss_mask": mask}, None)
    expected, count = jax.jit(lambda p: causal_lm_loss(nnx.merge(graphdef, p)(ids), ids, mask))(params)
    assert float(loss) == float(expected) and float(metrics["response_tokens"]) == float(count) == 5.0
    padded = {"input_ids": ids, "loss_mask": mask, "attention_mask": jnp.ones_like(ids)}
    assert float(jax.jit(next_token_loss(graphdef))(params, padded, None)[0]) == float(expected)


def test_classification_loss_is_mean_cross_entropy_with_accuracy():
    model = MLP(4, (8,), 3, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 4)).astype(np.float32), rng.integers(0, 3, 10).astype(np.int32)
    loss, metrics = jax.jit(classification_loss(graphdef))(params, (x, y), None)
    logits = np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(x))(params), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(loss, -log_probs[np.arange(10), y].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(logits.argmax(-1) == y))


def test_equal_graphdefs_share_one_loss_function():
    """``fit`` caches its compiled step by the loss object: equal models must give the same one."""
    first, second = (nnx.split(MLP(4, (8,), 3, rngs=nnx.Rngs(seed)))[0] for seed in (0, 1))
    other = nnx.split(MLP(4, (9,), 3, rngs=nnx.Rngs(0)))[0]
    assert next_token_loss(first) is next_token_loss(second) is not next_token_loss(other)
    assert classification_loss(first) is classification_loss(second) is not classification_loss(other)


def _tiny_lm(tied: bool):
    from metafit.models import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))


def test_chunked_next_token_loss_equals_full_logits_loss_and_gradient():
    """next_token_loss's chunked path (7 positions per chunk, 23 positions: a ragged last chunk) = the
    loss of the full logits, in value and in the gradient of every parameter (tied and untied heads)."""
    ids = jax.random.randint(jax.random.key(1), (3, 9), 0, 37)
    mask = jnp.ones((3, 9)).at[0, :4].set(0.0)
    batch = {"input_ids": ids, "loss_mask": mask}
    for tied in (True, False):
        graphdef, params = nnx.split(_tiny_lm(tied))

        def full(p):
            return causal_lm_loss(nnx.merge(graphdef, p)(ids), ids, mask)[0]

        chunked = lambda p: next_token_loss(graphdef, chunk_tokens=7)(p, batch, None)[0]  # noqa: E731
        # one compiled program for both (op-by-op dispatch compiles every primitive: 17 s vs 10 s of CPU)
        both = jax.jit(lambda p: (jax.value_and_grad(full)(p), jax.value_and_grad(chunked)(p)))
        (want, want_grad), (got, got_grad) = both(params)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
        for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
