"""A text classifier for noisy-label experiments: encoder + (gated) PEFT + linear head, functional.

    logits = W · meanpool(encoder(input_ids, attention_mask; PEFT gates g)) + b

The encoder is any metafit NNX encoder (BERT / MiniLM) called as
``encoder(input_ids, attention_mask=mask)``; PEFT modules come from :mod:`metafit.peft`
(``tuning="full"`` trains every parameter and adds no PEFT module). Mean pooling over real
tokens is what all-MiniLM-L6-v2 was trained with, so its sentence embedding is the
natural input of the head.

The classifier is split once (``graphdef, trainable, frozen``) and applied as a pure
function of ``(trainable, frozen)``, so it goes straight into :func:`metafit.train.fit`.
Routing gates are given per sample and per *routing group* ``[b, G]``; every PEFT module
reads the gate of its group (the transformer layer it sits in: the first integer in its
module path; modules outside the layers, e.g. BitFit on the embedding LayerNorm, form one
extra group).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Tuning = Literal["full", "lora", "adapter", "prefix", "bitfit"]
TUNINGS: tuple[str, ...] = get_args(Tuning)


def bert_peft_config():
    """PEFT defaults for BERT encoders: LoRA (r=8, α=16) on ``query`` and ``value`` as in the
    CleaR / LoRA papers (metafit.peft's own LoRA default names Llama's ``q_proj``/``v_proj``);
    Houlsby adapters (bottleneck 16), prefixes and BitFit keep metafit.peft's defaults."""
    from metafit.peft.config import LoraConfig, PeftConfig

    return PeftConfig(lora=LoraConfig(rank=8, alpha=16.0, targets=("query", "value")))


class ClassificationHead(nnx.Module):
    """Masked mean pooling followed by a linear layer to class logits."""

    def __init__(self, hidden: int, num_classes: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, hidden_states: jax.Array, attention_mask: jax.Array) -> jax.Array:
        from metafit.models.bert import mean_pool

        return self.linear(mean_pool(hidden_states, attention_mask, normalize=False))


class TextClassifierModule(nnx.Module):
    """``encoder`` + ``head``; the module that is split into trainable / frozen state."""

    def __init__(self, encoder: nnx.Module, head: ClassificationHead):
        self.encoder = encoder
        self.head = head

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        out = self.encoder(input_ids, attention_mask=attention_mask)
        hidden = out if isinstance(out, jax.Array) else out.last_hidden_state
        return self.head(hidden, attention_mask)


@dataclasses.dataclass(frozen=True)
class TextClassifier:
    """A split classifier; ``apply`` is pure and jittable.

    Attributes:
      graphdef: the NNX graph definition.
      trainable: state of the trained variables (PEFT weights + head, or everything).
      frozen: state of everything else (incl. the PEFT gates).
      num_groups: routing groups G (0 when there is no PEFT module).
      module_groups: ``[num_peft_modules]`` group of each PEFT module, in gate order.
      tuning: ``full`` or the PEFT method name.
    """

    graphdef: Any
    trainable: Any
    frozen: Any
    num_groups: int
    module_groups: tuple[int, ...]
    tuning: str

    @property
    def params(self) -> tuple[Any, Any]:
        """``(trainable, frozen)``: what :func:`metafit.train.fit` optimises."""
        return self.trainable, self.frozen

    @property
    def trainable_mask(self) -> tuple[Any, Any]:
        """``fit``'s ``trainable=`` argument for :attr:`params`."""
        return jax.tree.map(lambda _: True, self.trainable), jax.tree.map(lambda _: False, self.frozen)

    def apply(self, params: tuple[Any, Any], input_ids: jax.Array, attention_mask: jax.Array,
              gates: jax.Array | None = None) -> jax.Array:
        """Logits ``[b, C]``; ``gates [b, G]`` route each sample through the PEFT modules (None = all on)."""
        # copy: the gates are set below, never on Variables that belong to the caller (or another trace)
        model = nnx.merge(self.graphdef, *params, copy=True)
        if gates is not None and self.module_groups:
            import metafit.peft as peft

            # module m reads its layer's gate column: [num_gated, b] in metafit.peft's gate order
            peft.set_gates(model, gates[:, jnp.asarray(self.module_groups)].T)
        return model(input_ids, attention_mask)

    def count(self) -> dict[str, int]:
        """Number of trainable and frozen scalars."""
        size = lambda tree: int(sum(np.size(x) for x in jax.tree.leaves(tree)))
        return {"trainable": size(self.trainable), "frozen": size(self.frozen)}


def routing_group_of(path: tuple[Any, ...]) -> int | None:
    """The transformer layer a module path sits in (its first integer key), or None."""
    for key in path:
        if isinstance(key, int) or (isinstance(key, str) and re.fullmatch(r"\d+", key)):
            return int(key)
    return None


def build_text_classifier(encoder: nnx.Module, hidden_size: int, num_classes: int, *, tuning: Tuning,
                          peft_config: Any = None, key: jax.Array) -> TextClassifier:
    """Adds a head and (unless ``tuning="full"``) PEFT modules to ``encoder``; splits the result.

    Args:
      encoder: an NNX encoder; it is modified in place by PEFT wrapping (pass a fresh one).
      hidden_size: width of the encoder's last hidden state.
      num_classes: C.
      tuning: ``full`` (all parameters trained) or a PEFT method (``lora``, ``adapter``,
        ``prefix``, ``bitfit``).
      peft_config: a :class:`metafit.peft.PeftConfig` (its ``method`` is overridden by
        ``tuning``); None uses :func:`bert_peft_config`.
      key: initialises the head and the PEFT weights.
    """
    head_key, peft_key = jax.random.split(key)
    model = TextClassifierModule(encoder, ClassificationHead(hidden_size, num_classes,
                                                             rngs=nnx.Rngs(params=head_key)))
    if tuning == "full":
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
        return TextClassifier(graphdef, trainable, frozen, 0, (), tuning)

    import metafit.peft as peft
    from metafit.peft.core import peft_modules

    config = peft_config if peft_config is not None else bert_peft_config()
    config = dataclasses.replace(config, method=tuning)
    peft.apply(model.encoder, config, rngs=nnx.Rngs(params=peft_key, dropout=peft_key))
    layer_of = [routing_group_of(path) for path, _ in peft_modules(model)]  # gate order
    if not layer_of:
        raise ValueError(f"PEFT method '{tuning}' added no module to the encoder; check its targets")
    layers = sorted({g for g in layer_of if g is not None})
    index = {layer: i for i, layer in enumerate(layers)}
    outside = len(layers)  # one extra group for modules outside the transformer layers
    groups = tuple(index[g] if g is not None else outside for g in layer_of)
    trainable_filter = nnx.Any(peft.trainable_filter(), nnx.All(nnx.Param, nnx.PathContains("head")))
    graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
    return TextClassifier(graphdef, trainable, frozen, max(groups) + 1, groups, tuning)


def text_classifiers(backbone: Any, num_classes: int, *, tuning: Tuning, peft_config: Any = None):
    """``key -> TextClassifier`` on fresh copies of ``backbone``'s encoder (a :class:`~metafit.robust.Backbone`):
    what :func:`metafit.robust.train_noisy` and the methods' ``init`` call (co-teaching calls it twice)."""

    def classifiers(key: jax.Array) -> TextClassifier:
        return build_text_classifier(backbone.make_encoder(), backbone.hidden_size, num_classes, tuning=tuning,
                                     peft_config=peft_config, key=key)

    return classifiers
