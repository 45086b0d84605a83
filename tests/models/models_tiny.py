"""Tiny random HF checkpoints (transformers + torch) for the metafit.models parity tests.

Imported as ``models_tiny`` (pytest puts this folder on sys.path). Weights use a larger init
(``initializer_range=0.2``) than HF's default so logits are O(1) and a wrong layer shows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
# One intra-op thread: the reference forwards here are tiny, and torch's default (one thread per
# core) spin-waits on a busy machine (xdist workers, other processes): SmolLM2's 40-token forward
# took 4.5 s of CPU with 2 threads and 0.5 s with 1, for the same numbers.
torch.set_num_threads(1)

VOCAB = 97
INIT = 0.2


def llama_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=INIT, bos_token_id=1,
        eos_token_id=2, pad_token_id=0,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def qwen2_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, initializer_range=INIT, tie_word_embeddings=True,
        eos_token_id=2, pad_token_id=0,
    )
    kwargs.update(overrides)
    return transformers.Qwen2Config(**kwargs)


def gpt2_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=INIT,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    kwargs.update(overrides)
    return transformers.GPT2Config(**kwargs)


def bert_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, initializer_range=INIT, pad_token_id=0,
    )
    kwargs.update(overrides)
    return transformers.BertConfig(**kwargs)


def build(cls_name: str, config, seed: int = 0):
    """A random transformers model in eval mode with eager attention (exact masking maths)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(config)
    # HF zero-inits biases and sets norms to 1; randomise them so they are tested too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def host_random(build, seed: int = 0, scale: float = 0.3):
    """``build()`` (an NNX module) made abstractly, then filled with host N(0, scale^2) values.

    Eager ``jax.random`` initialisation compiles one XLA program per initializer and shape
    (about 1 s of CPU each on a busy machine); numpy compiles nothing.
    """
    model = nnx.eval_shape(build)
    leaves, treedef = jax.tree.flatten(nnx.state(model))
    rng = np.random.default_rng(seed)
    for x in leaves:
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"host_random fills floating arrays only; the model holds a {x.dtype} variable")
    values = [jnp.asarray(rng.normal(0.0, scale, x.shape).astype(x.dtype)) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, values))
    return model


def save(model, path) -> str:
    model.save_pretrained(str(path))
    return str(path)


def torch_out(model, ids, mask=None, **kwargs) -> np.ndarray:
    """Logits, or last hidden states for a base encoder, as numpy."""
    with torch.no_grad():
        out = model(
            torch.as_tensor(np.asarray(ids), dtype=torch.long),
            attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.long),
            **kwargs,
        )
    value = getattr(out, "logits", None)
    if value is None:
        value = out.last_hidden_state
    return value.float().numpy()


def batch(seq: int = 7, seed: int = 0, pad_id: int = 0):
    """Three rows: full, right-padded, left-padded (pad positions hold ``pad_id``)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (3, seq))
    mask = np.ones((3, seq), np.int32)
    mask[1, seq - 2:] = 0
    mask[2, :3] = 0
    ids = np.where(mask == 1, ids, pad_id)
    return ids.astype(np.int32), mask


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "static"))
def _jitted(graphdef, state, ids, mask, arrays, *, method, static):
    model = nnx.merge(graphdef, state)
    return getattr(model, method)(ids, mask, **arrays, **dict(static))


def forward(model, ids, mask=None, *, method="__call__", **kwargs):
    """``model(ids, mask, **kwargs)`` under one jit (op-by-op dispatch is slower on tiny models).

    Array keyword arguments are traced; everything else (bools, ints) is static.
    """
    is_array = lambda v: isinstance(v, (np.ndarray, jax.Array))  # noqa: E731
    arrays = {k: jax.tree.map(jnp.asarray, v) for k, v in kwargs.items()
              if is_array(v) or (isinstance(v, tuple) and all(is_array(x) for x in v))}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
    graphdef, state = nnx.split(model)
    out = _jitted(graphdef, state, jnp.asarray(ids), None if mask is None else jnp.asarray(mask), arrays,
                  method=method, static=static)
    return jax.tree.map(np.asarray, out)
