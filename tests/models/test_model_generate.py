"""KV-cache generation: greedy parity with transformers, cache = recompute, sampling filters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metafit.models as mm
from metafit.models.generate import _STATIC, _generate, _settings
from metafit.models.remat import remat_policy
from models_tiny import build, gpt2_config, llama_config, save, torch

NEW = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, cls, config in (("llama", "LlamaForCausalLM", llama_config()), ("gpt2", "GPT2LMHeadModel", gpt2_config())):
        reference = build(cls, config)
        out[name] = reference, mm.load(save(reference, tmp_path_factory.mktemp(name)))[0]
    return out


@pytest.fixture(params=["llama", "gpt2"])
def pair(request, models):
    return models[request.param]


@pytest.fixture
def llama(models):
    return models["llama"]


def _prompts():
    rng = np.random.RandomState(3)
    ids = rng.randint(3, 97, (2, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return np.where(mask == 1, ids, 0), mask


def _hf_greedy(reference, ids, mask, stop):
    with torch.no_grad():
        out = reference.generate(
            torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=NEW, do_sample=False, eos_token_id=stop, pad_token_id=0,
        )
    return out.numpy()


def test_greedy_equals_transformers_generate(pair):
    """Llama decodes through the layer-scanned stack here (the other tests run it unrolled); GPT-2 has no scan."""
    reference, model = pair
    ids, mask = _prompts()
    want = _hf_greedy(reference, ids, mask, stop=None)
    got = np.asarray(mm.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, stop_tokens=(), pad_token_id=0,
                                 scan_layers=True))
    np.testing.assert_array_equal(got, want)


def test_stop_token_pads_the_rest_like_transformers(pair):
    reference, model = pair
    ids, mask = _prompts()
    free = _hf_greedy(reference, ids, mask, stop=None)
    stop = int(free[0, ids.shape[1] + 2])  # row 0 emits this third
    want = _hf_greedy(reference, ids, mask, stop=stop)
    got = np.asarray(mm.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, stop_tokens=(stop,), pad_token_id=0))
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[0, ids.shape[1] + 3:] == 0).all()


def test_kv_cache_equals_full_recompute_and_right_padding_is_left_aligned(llama):
    """Sampled tokens: the layer-scanned stack with its stacked KV cache = the unrolled stack recomputing everything."""
    _, model = llama
    ids, mask = _prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, stop_tokens=(), temperature=0.9, top_k=20, top_p=0.9,
                  key=jax.random.key(7), scan_layers=True)
    cached = np.asarray(mm.generate(model, ids, **kwargs))
    recomputed = np.asarray(mm.generate(model, ids, **{**kwargs, "use_cache": False, "scan_layers": False}))
    np.testing.assert_array_equal(cached, recomputed)
    # the same prompts right-padded: rows are left-aligned first, so the output is identical
    right_ids = np.stack([ids[0], np.concatenate([ids[1, 2:], [0, 0]])])
    right_mask = np.stack([mask[0], np.concatenate([mask[1, 2:], [0, 0]])])
    np.testing.assert_array_equal(np.asarray(mm.generate(model, right_ids, **{**kwargs, "attention_mask": right_mask})),
                                  cached)


def test_generation_compiles_once_per_shape(llama):
    _, model = llama
    ids, mask = _prompts()
    mm.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, stop_tokens=(), pad_token_id=0)
    before = _generate._cache_size()
    mm.generate(model, ids[::-1] + 1, attention_mask=mask, max_new_tokens=NEW, stop_tokens=(5,), pad_token_id=3)
    assert _generate._cache_size() == before  # new values, same shapes and settings: no recompilation
    # the layer mode is a static argument (part of the key), read when generate is called, not from the
    # remat_policy context of whichever call traced first; an explicit scan_layers wins over the context
    mode = lambda **kw: _settings(model, ids, max_new_tokens=NEW, **kw)[2]["scan_layers"]  # noqa: E731
    assert "scan_layers" in _STATIC and mode() is False and mode(scan_layers=True) is True
    with remat_policy("none", scan_layers=True):
        assert mode() is True and mode(scan_layers=False) is False


def test_sampling_with_top_k_1_is_greedy(llama):
    _, model = llama
    ids, mask = _prompts()
    greedy = mm.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, stop_tokens=())
    sampled = mm.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, stop_tokens=(), temperature=1.3,
                          top_k=1, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(sampled), np.asarray(greedy))


def test_filter_logits_closed_forms():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda out: np.isfinite(np.asarray(out))[0].tolist()  # noqa: E731
    assert kept(mm.filter_logits(logits, top_k=2)) == [False, True, False, True]
    # nucleus: smallest set of the sorted probabilities reaching top_p (0.5 + 0.3 >= 0.7)
    assert kept(mm.filter_logits(logits, top_p=0.7)) == [False, True, False, True]
    assert kept(mm.filter_logits(logits, top_p=0.81)) == [False, True, True, True]
    assert kept(mm.filter_logits(logits, top_p=0.0)) == [False, True, False, False]


def _nucleus_reference(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Kept tokens of one row by the definition: sort descending, keep while the mass before a token < top_p."""
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    kept = np.zeros(len(logits), bool)
    kept[order[(before < top_p) | (np.arange(len(logits)) == 0)]] = True
    return kept if top_p < 1.0 else np.ones(len(logits), bool)


def test_nucleus_inside_and_beyond_the_candidate_prefix_matches_the_definition():
    """Rows whose nucleus fits the top NUCLEUS_CANDIDATES and rows that need the whole sort, per-row top_p."""
    from metafit.models.generate import NUCLEUS_CANDIDATES, filter_logits

    vocab = 4 * NUCLEUS_CANDIDATES
    rng = np.random.default_rng(0)
    peaked = rng.normal(size=vocab) * 4.0  # a few tokens hold most of the mass
    flat = rng.normal(size=vocab) * 0.05   # the 0.9 nucleus spans most of the vocabulary
    logits = np.stack([peaked, flat, peaked, flat]).astype(np.float32)
    top_p = np.asarray([0.9, 0.9, 1.0, 0.37], np.float32)
    assert 10 < _nucleus_reference(flat, 0.9).sum() and _nucleus_reference(flat, 0.9).sum() > NUCLEUS_CANDIDATES
    assert _nucleus_reference(peaked, 0.9).sum() < NUCLEUS_CANDIDATES
    for fn in (filter_logits, jax.jit(lambda x, p: filter_logits(x, top_p=p))):
        out = fn(jnp.asarray(logits), top_p=jnp.asarray(top_p)) if fn is filter_logits else fn(logits, top_p)
        kept = np.isfinite(np.asarray(out))
        for row in range(4):
            np.testing.assert_array_equal(kept[row], _nucleus_reference(logits[row].astype(np.float64), top_p[row]))
    # all rows inside the prefix (the fast path alone) give the same as one row at a time
    both = filter_logits(jnp.asarray(logits[[0, 2]]), top_p=jnp.asarray([0.5, 0.8]))
    np.testing.assert_array_equal(np.isfinite(np.asarray(both))[1], _nucleus_reference(peaked, 0.8))


def test_sampling_needs_a_key(llama):
    _, model = llama
    with pytest.raises(ValueError, match="key"):
        mm.generate(model, np.ones((1, 3), np.int32), max_new_tokens=2, temperature=0.5)
