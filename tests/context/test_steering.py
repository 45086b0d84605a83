"""metafit.context on a tiny Llama: steering, user attention, the indicator row of an untied or padded head and
bad input, against direct computation. The chat-model tests are in test_context.py (two files, so that xdist's
per-file scheduling spreads them over its workers)."""
import jax.numpy as jnp
import numpy as np
import pytest

import metafit.models as mm
from metafit import context
from metafit.models.layers import positions_from_mask

from context_fixtures import forward

NEW = 5


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """models_tiny's tiny Llama (vocabulary 97, 64 positions, untied head), its folder written with numpy (no torch)."""
    from serve_tiny import tiny_folder

    return mm.load(tiny_folder(tmp_path_factory.mktemp("llama"), vocab_size=97, max_position_embeddings=64),
                   tokenizer=False)[0]


def _prompts():
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 97, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    user = (rng.rand(2, 9) < 0.5).astype(np.int32) * mask
    return np.where(mask == 1, ids, 0), mask, user


def _full(model, ids, mask, **kwargs):
    """Logits and every layer's attention map of one forward at the mask's positions.

    The steering, user-attention and indicator checks on the (2, 9) prompts all call this one
    signature: one compilation with ``attention_bias``, one without, per model.
    """
    positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
    return forward(model, ids, mask, method="forward", position_ids=positions, return_attentions=True, **kwargs)


# ----------------------------------------------------------------------------------- steering


def test_alpha_one_leaves_logits_and_attentions_unchanged(llama):
    ids, mask, user = _prompts()
    plain = _full(llama, ids, mask)
    steered = _full(llama, ids, mask, attention_bias=context.steering_bias(user, 1.0))
    np.testing.assert_array_equal(steered.logits, plain.logits)
    for a, b in zip(steered.attentions, plain.attentions, strict=True):
        np.testing.assert_array_equal(a, b)


def test_steering_scales_non_user_attention_by_alpha(llama):
    """Layer 0 sees the same inputs with and without the bias, so p' = p * a(y) / Z exactly."""
    ids, mask, user = _prompts()
    alpha = 0.3
    bias = context.steering_bias(user, alpha)
    assert bias.shape == (2, 1, 1, 9)
    np.testing.assert_allclose(np.asarray(bias)[:, 0, 0], np.where(user == 1, 0.0, np.log(alpha)), rtol=1e-6)
    p = _full(llama, ids, mask).attentions[0]
    q = _full(llama, ids, mask, attention_bias=bias).attentions[0]
    scaled = p * np.where(user == 1, 1.0, alpha)[:, None, None, :]
    real_queries = np.broadcast_to(mask[:, None, :, None] == 1, p.shape)  # padded queries see no key at all
    np.testing.assert_allclose(q[real_queries], (scaled / scaled.sum(-1, keepdims=True))[real_queries], atol=1e-6)


@pytest.mark.parametrize("use_cache", [True, False])
def test_steered_generate_equals_full_forward_with_bias(llama, use_cache):
    """Greedy tokens are the argmax of one full forward over the output with the bias on every slot."""
    ids, mask, user = _prompts()
    alpha = 0.2
    out = np.asarray(mm.generate(llama, ids, attention_mask=mask, max_new_tokens=NEW, stop_tokens=(),
                                 steer=(user, alpha), use_cache=use_cache))
    full_mask = np.concatenate([mask, np.ones((2, NEW), np.int32)], axis=1)
    slot_user = np.concatenate([user, np.zeros((2, NEW), np.int32)], axis=1)  # generated tokens are not user
    logits = forward(llama, out, full_mask, position_ids=np.asarray(positions_from_mask(jnp.asarray(full_mask))),
                     attention_bias=context.steering_bias(slot_user, alpha))
    np.testing.assert_array_equal(out[:, 9:], np.argmax(logits[:, 8:-1], axis=-1))
    # plain greedy decoding (the program of the next test) first departs from the steered tokens where
    # an unsteered forward over them would: the same fact, without compiling a second forward
    plain = np.asarray(mm.generate(llama, ids, attention_mask=mask, max_new_tokens=NEW, stop_tokens=()))
    assert (plain[:, 9:] != out[:, 9:]).any(), "alpha=0.2 should change some greedy token"


def test_generate_without_steer_is_unchanged_by_alpha_one(llama):
    ids, mask, user = _prompts()
    plain = np.asarray(mm.generate(llama, ids, attention_mask=mask, max_new_tokens=NEW, stop_tokens=()))
    steered = np.asarray(mm.generate(llama, ids, attention_mask=mask, max_new_tokens=NEW, stop_tokens=(),
                                     steer=(user, 1.0)))
    np.testing.assert_array_equal(steered, plain)


def test_right_padded_steer_mask_moves_with_the_prompt(llama):
    ids, mask, user = _prompts()
    right = lambda a: np.stack([np.roll(a[0], 0), np.roll(a[1], -3)])  # noqa: E731  (row 1 right-padded)
    left = np.asarray(mm.generate(llama, ids, attention_mask=mask, max_new_tokens=NEW, stop_tokens=(),
                                  steer=(user, 0.2)))
    moved = np.asarray(mm.generate(llama, right(ids), attention_mask=right(mask), max_new_tokens=NEW,
                                   stop_tokens=(), steer=(right(user), 0.2)))
    np.testing.assert_array_equal(moved, left)


# ----------------------------------------------------------------------------------- user attention


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_user_attention_equals_last_row_of_the_full_map(llama, alpha):
    ids, mask, user = _prompts()
    mass = np.asarray(context.user_attention(llama, ids, user, attention_mask=mask, alpha=alpha))
    bias = context.steering_bias(user, alpha)
    maps = _full(llama, ids, mask, attention_bias=bias).attentions
    want = np.stack([(a[:, :, -1, :] * user[:, None, :]).sum(-1).mean(0) for a in maps])
    assert mass.shape == (2, 4)
    np.testing.assert_allclose(mass, want, atol=1e-5)


class _Tok:  # the smallest tokenizer add_indicator needs, with ``size`` tokens
    def __init__(self, size):
        self.vocab = {f"t{i}": i for i in range(size)}

    def get_vocab(self):
        return dict(self.vocab)

    def add_tokens(self, tokens, special_tokens=False):
        self.vocab.update({t: len(self.vocab) for t in tokens})

    def convert_tokens_to_ids(self, token):
        return self.vocab[token]


def test_add_indicator_grows_an_untied_head(llama):
    grown, _, ind = context.add_indicator(llama, _Tok(97))
    head = np.asarray(grown.lm_head.kernel[...])
    assert head.shape == (32, 98)
    np.testing.assert_allclose(head[:, ind], np.asarray(llama.lm_head.kernel[...]).mean(1), atol=1e-6)
    ids, mask, _ = _prompts()
    np.testing.assert_allclose(_full(grown, ids, mask).logits[..., :97], _full(llama, ids, mask).logits, atol=1e-6)


def test_add_indicator_takes_the_first_spare_row_of_a_padded_vocabulary(llama):
    """97 model rows, a 90-token tokenizer: [IND] gets id 90 and row 90 (the tokenizer rows' mean), no growth;
    the other rows, the spare rows after it and every other parameter are unchanged."""
    model_vocab = llama.config.vocab_size
    model, _, ind = context.add_indicator(llama, _Tok(90))
    assert ind == 90 and model.config.vocab_size == model_vocab
    embedding, before = np.asarray(model.model.embed_tokens.embedding[...]), np.asarray(llama.model.embed_tokens.embedding[...])
    head, head_before = np.asarray(model.lm_head.kernel[...]), np.asarray(llama.lm_head.kernel[...])
    np.testing.assert_allclose(embedding[ind], before[:ind].mean(0), atol=1e-6)
    np.testing.assert_allclose(head[:, ind], head_before[:, :ind].mean(1), atol=1e-6)
    others = np.arange(model_vocab) != ind
    np.testing.assert_array_equal(embedding[others], before[others])
    np.testing.assert_array_equal(head[:, others], head_before[:, others])
    np.testing.assert_array_equal(np.asarray(model.model.norm.weight[...]), np.asarray(llama.model.norm.weight[...]))
    with pytest.raises(ValueError, match="disagree on the vocabulary size"):
        context.add_indicator(llama, _Tok(model_vocab + 1))


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_refused(llama, alpha):
    ids, mask, user = _prompts()
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\]"):
        context.steering_bias(user, alpha)
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\]"):
        mm.generate(llama, ids, attention_mask=mask, max_new_tokens=2, steer=(user, alpha))


def test_user_mask_of_the_wrong_shape_is_refused(llama):
    ids, mask, user = _prompts()
    with pytest.raises(ValueError, match="user_mask shape"):
        mm.generate(llama, ids, attention_mask=mask, max_new_tokens=2, steer=(user[:, :-1], 0.9))
    with pytest.raises(ValueError, match="user_mask shape"):
        context.user_attention(llama, ids, user[:1], attention_mask=mask)


def test_model_without_the_attention_hook_is_refused(llama):
    mlp = mm.mlp.MLP if hasattr(mm, "mlp") and hasattr(mm.mlp, "MLP") else object
    with pytest.raises(TypeError, match="no attention hook"):
        context.user_attention(object(), np.ones((1, 3), np.int32), np.ones((1, 3)))
    with pytest.raises(TypeError, match="no attention hook"):
        mm.generate(mlp, np.ones((1, 3), np.int32), max_new_tokens=2, steer=(np.ones((1, 3)), 0.9))


