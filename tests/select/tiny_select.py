"""A tiny Llama fixture and a character tokenizer shared by the selection tests.

Imported by them, not a ``conftest.py``: a second module named ``conftest`` would shadow
tests/conftest.py for the other folders' ``from conftest import ...``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metafit.models import LlamaConfig, LlamaForCausalLM


class CharTokenizer:
    """One token per character: enough to test the kernel's arithmetic (and SFT encoding: no chat template)."""

    eos_token = "#"
    pad_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def batch_decode(self, rows, skip_special_tokens=False):  # greedy answers decode the generated ids
        return ["".join(chr(int(t)) for t in row if int(t) != self.pad_token_id) for row in rows]


@pytest.fixture(scope="module")
def tiny():
    """A 1-layer Llama with the model's own init (N(0, 0.02) weights, norms at 1), drawn in numpy on
    an abstract model: eager initialisation would compile one program per parameter shape."""
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        value = np.ones(leaf.shape) if "norm" in jax.tree_util.keystr(path) else rng.normal(size=leaf.shape) * 0.02
        return jnp.asarray(value, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract)), CharTokenizer()


class CharEncoderTokenizer:
    """The encoder side (sentence embeddings): batched, padded to ``max_length``, with an attention mask."""

    def __call__(self, texts, padding="max_length", truncation=True, max_length=64, return_tensors="np"):
        ids = np.zeros((len(texts), max_length), np.int32)
        mask = np.zeros_like(ids)
        for i, text in enumerate(texts):
            row = [1 + ord(c) % 63 for c in text][:max_length]  # 0 is padding
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return {"input_ids": ids, "attention_mask": mask}


def tiny_encoder():
    """A 1-layer BERT (hidden 16) standing in for MiniLM."""
    from metafit.models.bert import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, add_pooling_layer=False)
    return BertModel(config, rngs=nnx.Rngs(0)), CharEncoderTokenizer()
