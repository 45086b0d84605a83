"""Tiny NNX modules (imported as ``peft_tiny``; pytest puts this folder on sys.path) with HF-style attribute names for the PEFT tests.

``TinyModel`` mirrors a decoder block (``layers.i.self_attn.{q,k,v,o}_proj``, ``layers.i.mlp.{up,down}_proj``,
a LayerNorm with bias) and its attention carries the ``kv_prefix`` hook of metafit.peft.prefix.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import metafit.peft as peft

DIM, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 16, 4, 2, 4, 32, 2


def reference_attention(q, k, v, allowed, bias):
    """Plain softmax attention with GQA by repetition (independent of metafit.models)."""
    repeat = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]) + bias
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


class TinyAttention(nnx.Module):
    def __init__(self, *, rngs):
        self.q_proj = nnx.Linear(DIM, HEADS * HEAD_DIM, rngs=rngs)
        self.k_proj = nnx.Linear(DIM, KV_HEADS * HEAD_DIM, rngs=rngs)
        self.v_proj = nnx.Linear(DIM, KV_HEADS * HEAD_DIM, rngs=rngs)
        self.o_proj = nnx.Linear(HEADS * HEAD_DIM, DIM, rngs=rngs)
        self.kv_heads, self.head_dim = KV_HEADS, HEAD_DIM
        self.kv_prefix = None

    def __call__(self, x):
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, HEADS, HEAD_DIM)
        k = self.k_proj(x).reshape(b, s, KV_HEADS, HEAD_DIM)
        v = self.v_proj(x).reshape(b, s, KV_HEADS, HEAD_DIM)
        allowed = jnp.tril(jnp.ones((s, s), bool))[None, None]
        bias = None
        if self.kv_prefix is not None:
            k, v, allowed, bias = self.kv_prefix(k, v, allowed, bias)
        out = reference_attention(q, k, v, allowed, 0.0 if bias is None else bias)
        return self.o_proj(out.reshape(b, s, -1))


class TinyMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.up_proj = nnx.Linear(DIM, FFN, rngs=rngs)
        self.down_proj = nnx.Linear(FFN, DIM, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.gelu(self.up_proj(x)))


class TinyBlock(nnx.Module):
    def __init__(self, *, rngs):
        self.norm = nnx.LayerNorm(DIM, rngs=rngs)
        self.self_attn = TinyAttention(rngs=rngs)
        self.mlp = TinyMLP(rngs=rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.norm(x))
        return x + self.mlp(x)


class TinyModel(nnx.Module):
    def __init__(self, *, rngs):
        self.layers = nnx.List([TinyBlock(rngs=rngs) for _ in range(LAYERS)])
        self.head = nnx.Linear(DIM, 3, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


# One config per method, targeting a few modules of TinyModel.
METHODS = {
    "lora": peft.LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj")),
    "dora": peft.LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj"), use_dora=True),
    "adapter": peft.AdapterConfig(bottleneck=4),
    "ia3": peft.IA3Config(),
    "bitfit": peft.BitFitConfig(),
    "prefix": peft.PrefixConfig(num_prefix=3),
}


def _numpy_normal(seed, shape, scale):
    return np.random.default_rng(seed).normal(0.0, scale, shape).astype(np.float32)


def host_normal(seed, shape, scale):
    # Host-side random numbers: eager jax.random would compile one XLA program per shape, and so
    # would casting float64 -> float32 on the device (cast in numpy, then transfer), or
    # jnp.asarray(numpy array) (an eager lax.stage since JAX 0.10): device_put only copies.
    return jax.device_put(_numpy_normal(seed, shape, scale))


def random_model(build, seed=0, scale=0.3):
    """``build(rngs)`` made abstractly, then filled with host N(0, scale^2) values (no XLA compiles)."""
    model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    leaves, treedef = jax.tree.flatten(nnx.state(model))
    values = [host_normal(seed * 1000 + i, x.shape, scale) for i, x in enumerate(leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, values))
    return model


@functools.lru_cache(maxsize=None)
def _built(seed):
    return random_model(lambda rngs: TinyModel(rngs=rngs), seed)


def make_model(seed=0):
    """A fresh copy of the tiny model with random N(0, 0.3^2) weights (norm scales and biases too)."""
    return nnx.clone(_built(seed))


def make_input(seed=1, batch=3, seq=5):
    return host_normal(seed, (batch, seq, DIM), 1.0)


def perturb_adapters(model, seed=2, scale=0.3):
    """Moves every adapter weight away from its (often identity) init, so tests are not vacuous."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    # added in numpy: an eager jnp add compiles one program per shape
    noisy = [jax.device_put(np.asarray(x) + _numpy_normal(seed * 1000 + i, x.shape, scale).astype(x.dtype))
             for i, x in enumerate(leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def all_methods_model():
    """Every PEFT method at once, on disjoint targets (so one compile covers them all), perturbed."""
    model = make_model()
    rngs = nnx.Rngs(1)
    peft.apply(model, peft.LoraConfig(rank=2, targets=("q_proj",)), rngs=rngs)
    peft.apply(model, peft.LoraConfig(rank=2, targets=("up_proj",), use_dora=True), rngs=rngs)
    peft.apply(model, peft.IA3Config(targets=("k_proj", "v_proj"), feedforward=("v_proj",)), rngs=rngs)
    peft.apply(model, peft.AdapterConfig(bottleneck=3), rngs=rngs)  # o_proj, down_proj
    peft.apply(model, peft.BitFitConfig(target_types=("LayerNorm",)), rngs=rngs)
    peft.apply(model, peft.PrefixConfig(num_prefix=2), rngs=rngs)
    return perturb_adapters(model)

def forward(model, x):
    """``model(x)`` through one cached jit per model structure (eager NNX compiles every op separately).

    As a numpy array: tests index and compare it, and on a JAX array each ``out[0]`` compiles a slice.
    """
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, x))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def target_of(x):
    """A fixed random regression target for ``TinyModel``'s output on ``x``."""
    return host_normal(9, (*x.shape[:-1], 3), 1.0)


@functools.partial(jax.jit, static_argnums=0)
def adapter_loss_and_grads(graphdef, params, rest, gates, x, target):
    """``sum((model(x) - target)^2)``, the output and the gradient for the adapter weights, gates set inside jit.

    The gating and the training tests share it, so the all-methods model's gradient compiles once.
    """
    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        peft.set_gates(m, gates)
        out = m(x)
        return jnp.sum((out - target) ** 2), out

    return jax.value_and_grad(loss, has_aux=True)(params)
