"""Training methods for noisy labels, each a loss for :func:`metafit.train.fit` plus its epoch needs.

A method is a :class:`NoisyMethod`: pure functions (initial parameters, the per-step loss,
eval-time logits, the per-sample pass between epochs) and a predicate saying before
which epochs it needs a fresh clean-probability estimate. The training loop that drives
them -- one ``fit`` call over all epochs, with the per-epoch loss pass + GMM at epoch
boundaries -- is :func:`metafit.robust.runner.train_noisy`.

Every training batch carries, besides ``input_ids``, ``attention_mask`` and the noisy
``labels``, the per-sample state computed at the last epoch boundary:
``clean_prob`` [b] (1 before any estimate), ``stored_logits`` [b, C] (CleaR's q̂),
``phase`` [b] (1 once the method's warm-up is over) and ``epoch`` [b].

Methods (registered in :data:`NOISY_METHODS`):

* ``ce`` -- plain cross-entropy: full fine-tuning (``tuning: full``) or plain PEFT.
* ``clear`` -- CleaR (Kim et al., ACL 2024): warm-up with random routing, then per-layer
  per-sample routing ``g ~ Bernoulli(r p_i)`` and ``CE + consistency``.
* ``gce`` -- generalized cross-entropy (Zhang & Sabuncu, 2018).
* ``coteaching`` -- two networks teach each other with small-loss samples (Han et al., 2018).
* ``gmm_filter`` -- after warm-up, train only on samples with GMM clean probability > 0.5
  (the sample-selection half of DivideMix, without its semi-supervised part).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from metafit.registry import Registry
from metafit.robust.classifier import TextClassifier
from metafit.robust.losses import (
    consistency_loss,
    coteaching_keep_fraction,
    coteaching_losses,
    cross_entropy,
    generalized_cross_entropy,
)
from metafit.robust.routing import InferenceRouting, inference_gates, routing_gates

Params = Any
Batch = dict[str, jax.Array]


class NoisyMethod(NamedTuple):
    """A noisy-label training method (see the module docstring).

    Attributes:
      init: ``classifiers -> (params, trainable_mask)``; ``classifiers`` is a function
        ``key -> TextClassifier`` (co-teaching builds two networks).
      loss: ``(params, batch, key) -> (loss, metrics)`` for :func:`metafit.train.fit`.
      logits: ``(params, input_ids, attention_mask, key) -> [b, C]`` at evaluation.
      pass_logits: ``(params, input_ids, attention_mask, key) -> [b, C]`` of the per-sample
        loss pass over the training set (None: the method never needs one).
      needs_pass: ``epoch -> bool``: whether the clean-probability estimate must be
        refreshed before ``epoch`` starts.
      warmup_epochs: epochs before ``phase`` turns 1.
      loss_momentum: EMA momentum of the per-sample losses fed to the GMM.
    """

    init: Callable[[Callable[[jax.Array], TextClassifier], jax.Array], tuple[Params, Any]]
    loss: Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
    logits: Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array]
    pass_logits: Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array] | None
    needs_pass: Callable[[int], bool]
    warmup_epochs: int
    loss_momentum: float = 0.9


NOISY_METHODS: Registry[Callable[..., NoisyMethod]] = Registry("noisy-label-method")


def _single(classifiers: Callable[[jax.Array], TextClassifier], key: jax.Array) -> tuple[Params, Any]:
    classifier = classifiers(key)
    return classifier.params, classifier.trainable_mask


def _never(epoch: int) -> bool:
    return False


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(logits.argmax(-1) == labels)


# ------------------------------------------------------------------------------ CE


@dataclasses.dataclass(frozen=True)
class CEConfig:
    """Plain cross-entropy on the noisy labels (no options)."""


@NOISY_METHODS.register("ce", config=CEConfig)
def ce_method(classifier: TextClassifier, config: CEConfig = CEConfig()) -> NoisyMethod:
    """Plain training: ``mean_i CE(f(x_i), ỹ_i)`` with every PEFT gate at 1."""

    def loss(params, batch, key):
        logits = classifier.apply(params, batch["input_ids"], batch["attention_mask"])
        ce = cross_entropy(logits, batch["labels"]).mean()
        return ce, {"ce": ce, "train_accuracy": _accuracy(logits, batch["labels"])}

    def logits(params, input_ids, attention_mask, key):
        return classifier.apply(params, input_ids, attention_mask)

    return NoisyMethod(_single, loss, logits, None, _never, 0)


# ------------------------------------------------------------------------------ CleaR


@dataclasses.dataclass(frozen=True)
class ClearConfig:
    """CleaR's options. ``None`` fields take the official code's value for the PEFT family.

    Attributes:
      warmup_epochs: epochs of plain CE with random routing (clean probability 1).
      gate_rate: r; a sample with clean probability p is routed with probability r·p.
        Defaults: adapter 0.7, LoRA 0.85, prefix 0.85, BitFit 0.9.
      temperature: τ of the consistency term. Defaults: adapter 0.5, others 1.0.
      warmup_per_batch: share the warm-up gates across the batch (official LoRA/prefix code).
      consistency_weight: weight of the consistency term after warm-up (1 in the paper).
      loss_momentum: m of the per-sample loss EMA ``ℓ̄ <- m ℓ̄ + (1-m) ℓ``.
      loss_passes: stochastic forward passes averaged in the per-sample loss pass
        (official code: 1 for adapters, 2 for LoRA).
      inference: routing at evaluation: ``stochastic`` (per-sample Bernoulli(r); the official
        LoRA/prefix code draws one gate per layer for the whole test batch instead), ``expected``
        (g = r) or ``full`` (g = 1). The per-sample loss pass always routes stochastically.
    """

    warmup_epochs: int = 3
    gate_rate: float | None = None
    temperature: float | None = None
    warmup_per_batch: bool | None = None
    consistency_weight: float = 1.0
    loss_momentum: float = 0.9
    loss_passes: int | None = None
    inference: InferenceRouting = "stochastic"

    def __post_init__(self):
        if self.warmup_epochs < 0:
            raise ValueError(f"clear.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.gate_rate is not None and not 0.0 < self.gate_rate <= 1.0:
            raise ValueError(f"clear.gate_rate must be in (0, 1], got {self.gate_rate}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"clear.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.loss_momentum < 1.0:
            raise ValueError(f"clear.loss_momentum must be in [0, 1), got {self.loss_momentum}")


# Values read from the official code (yeachan-kr/clear, solvers/routing_*_solver.py).
CLEAR_FAMILY_DEFAULTS = {
    "adapter": dict(gate_rate=0.7, temperature=0.5, warmup_per_batch=False, loss_passes=1),
    "lora": dict(gate_rate=0.85, temperature=1.0, warmup_per_batch=True, loss_passes=2),
    "prefix": dict(gate_rate=0.85, temperature=1.0, warmup_per_batch=True, loss_passes=1),
    "bitfit": dict(gate_rate=0.9, temperature=1.0, warmup_per_batch=False, loss_passes=1),
}


def resolve_clear_config(config: ClearConfig, tuning: str) -> ClearConfig:
    """Fills CleaR's ``None`` fields with the official defaults for the PEFT family ``tuning``."""
    if tuning not in CLEAR_FAMILY_DEFAULTS:
        raise ValueError(f"CleaR routes PEFT modules; tuning '{tuning}' has none "
                         f"(valid: {', '.join(CLEAR_FAMILY_DEFAULTS)})")
    fills = {k: v for k, v in CLEAR_FAMILY_DEFAULTS[tuning].items() if getattr(config, k) is None}
    return dataclasses.replace(config, **fills)


@NOISY_METHODS.register("clear", config=ClearConfig)
def clear_method(classifier: TextClassifier, config: ClearConfig = ClearConfig()) -> NoisyMethod:
    """CleaR: clean routing of PEFT modules.

    Loss at a step (phase 0 during warm-up, 1 after; p_i = 1 during warm-up):

        g_{i,l} ~ Bernoulli(r p_i),  z_i = f(x_i; g_i)
        L = mean_i CE(z_i, ỹ_i) + phase · λ · mean_i CE(softmax(q̂_i/τ), softmax(z_i/τ))
    """
    config = resolve_clear_config(config, classifier.tuning)
    groups, rate = classifier.num_groups, config.gate_rate

    def loss(params, batch, key):
        phase = batch["phase"][0]
        per_batch = jnp.logical_and(phase == 0, config.warmup_per_batch)
        gates = routing_gates(key, batch["clean_prob"], groups, rate, per_batch=per_batch)
        logits = classifier.apply(params, batch["input_ids"], batch["attention_mask"], gates)
        ce = cross_entropy(logits, batch["labels"]).mean()
        consistency = consistency_loss(logits, batch["stored_logits"], config.temperature).mean()
        total = ce + phase * config.consistency_weight * consistency
        return total, {"ce": ce, "consistency": phase * consistency, "gate_mean": gates.mean(),
                       "train_accuracy": _accuracy(logits, batch["labels"])}

    def logits(params, input_ids, attention_mask, key):
        gates = inference_gates(key, input_ids.shape[0], groups, rate, config.inference)
        return classifier.apply(params, input_ids, attention_mask, gates)

    def pass_logits(params, input_ids, attention_mask, key):
        # The official code scores samples with stochastic routing (Bernoulli(r)) and
        # averages the logits of its passes; they are also the stored predictions q̂.
        outs = [classifier.apply(params, input_ids, attention_mask,
                                 inference_gates(k, input_ids.shape[0], groups, rate, "stochastic"))
                for k in jax.random.split(key, config.loss_passes)]
        return sum(outs) / len(outs)

    return NoisyMethod(_single, loss, logits, pass_logits,
                       lambda epoch: epoch >= config.warmup_epochs, config.warmup_epochs, config.loss_momentum)


# ------------------------------------------------------------------------------ GCE


@dataclasses.dataclass(frozen=True)
class GCEConfig:
    """Generalized cross-entropy; ``q`` in (0, 1] (0.7 in Zhang & Sabuncu)."""

    q: float = 0.7

    def __post_init__(self):
        if not 0.0 < self.q <= 1.0:
            raise ValueError(f"gce.q must be in (0, 1], got {self.q}")


@NOISY_METHODS.register("gce", config=GCEConfig)
def gce_method(classifier: TextClassifier, config: GCEConfig = GCEConfig()) -> NoisyMethod:
    """``mean_i (1 - p_θ(ỹ_i | x_i)^q) / q``."""

    def loss(params, batch, key):
        logits = classifier.apply(params, batch["input_ids"], batch["attention_mask"])
        value = generalized_cross_entropy(logits, batch["labels"], config.q).mean()
        return value, {"gce": value, "train_accuracy": _accuracy(logits, batch["labels"])}

    def logits(params, input_ids, attention_mask, key):
        return classifier.apply(params, input_ids, attention_mask)

    return NoisyMethod(_single, loss, logits, None, _never, 0)


# ------------------------------------------------------------------------------ co-teaching


@dataclasses.dataclass(frozen=True)
class CoteachingConfig:
    """Co-teaching's options.

    Attributes:
      forget_rate: final fraction of each batch dropped (Han et al. use the noise rate;
        None = the run's noise rate ``η``, set by the experiment).
      ramp_epochs: epochs over which the dropped fraction grows linearly from 0.
    """

    forget_rate: float | None = None
    ramp_epochs: float = 2.0


@NOISY_METHODS.register("coteaching", config=CoteachingConfig)
def coteaching_method(classifier: TextClassifier, config: CoteachingConfig = CoteachingConfig()) -> NoisyMethod:
    """Two networks (own PEFT modules and heads, shared frozen backbone) cross-select small-loss samples.

    Parameters are ``((trainable_a, trainable_b), frozen)``; network A is the one evaluated.
    """
    if config.forget_rate is None:
        raise ValueError("coteaching.forget_rate is None: set it (usually to the noise rate)")

    def init(classifiers, key):
        key_a, key_b = jax.random.split(key)
        net_a, net_b = classifiers(key_a), classifiers(key_b)
        params = ((net_a.trainable, net_b.trainable), net_a.frozen)
        mask = ((net_a.trainable_mask[0], net_b.trainable_mask[0]), net_a.trainable_mask[1])
        return params, mask

    def loss(params, batch, key):
        (trainable_a, trainable_b), frozen = params
        logits_a = classifier.apply((trainable_a, frozen), batch["input_ids"], batch["attention_mask"])
        logits_b = classifier.apply((trainable_b, frozen), batch["input_ids"], batch["attention_mask"])
        keep = coteaching_keep_fraction(batch["epoch"][0], config.forget_rate, config.ramp_epochs)
        loss_a, loss_b, metrics = coteaching_losses(logits_a, logits_b, batch["labels"], keep)
        return loss_a + loss_b, {"loss_a": loss_a, "loss_b": loss_b, "keep_fraction": keep,
                                 "train_accuracy": _accuracy(logits_a, batch["labels"]), **metrics}

    def logits(params, input_ids, attention_mask, key):
        (trainable_a, _), frozen = params
        return classifier.apply((trainable_a, frozen), input_ids, attention_mask)

    return NoisyMethod(init, loss, logits, None, _never, 0)


# ------------------------------------------------------------------------------ GMM filter


@dataclasses.dataclass(frozen=True)
class GMMFilterConfig:
    """Train only on samples the loss-GMM calls clean.

    Attributes:
      warmup_epochs: epochs of plain CE before filtering starts.
      threshold: keep samples with clean probability above it (DivideMix: 0.5).
      loss_momentum: EMA momentum of the per-sample losses.
    """

    warmup_epochs: int = 2
    threshold: float = 0.5
    loss_momentum: float = 0.9


@NOISY_METHODS.register("gmm_filter", config=GMMFilterConfig)
def gmm_filter_method(classifier: TextClassifier, config: GMMFilterConfig = GMMFilterConfig()) -> NoisyMethod:
    """``Σ_i w_i CE_i / Σ_i w_i`` with ``w_i = [p_i > threshold]`` after warm-up (w = 1 before)."""

    def loss(params, batch, key):
        logits = classifier.apply(params, batch["input_ids"], batch["attention_mask"])
        weights = (batch["clean_prob"] > config.threshold).astype(jnp.float32)
        ce = cross_entropy(logits, batch["labels"])
        value = jnp.sum(weights * ce) / jnp.maximum(jnp.sum(weights), 1.0)
        return value, {"ce": ce.mean(), "kept": weights.mean(),
                       "train_accuracy": _accuracy(logits, batch["labels"])}

    def logits(params, input_ids, attention_mask, key):
        return classifier.apply(params, input_ids, attention_mask)

    return NoisyMethod(_single, loss, logits, logits, lambda epoch: epoch >= config.warmup_epochs,
                       config.warmup_epochs, config.loss_momentum)


def method_config(name: str, rate: float, configs: dict[str, Any]) -> Any:
    """The config of method ``name`` at noise rate ``rate``: ``configs[name]`` or the method's default,
    with co-teaching's unset ``forget_rate`` taken from the noise rate (as Han et al. do)."""
    config = configs.get(name)
    if config is None:
        config = NOISY_METHODS.meta(name)["config"]()
    if name == "coteaching" and config.forget_rate is None:
        config = dataclasses.replace(config, forget_rate=rate)
    return config


def make_method(name: str, classifier: TextClassifier, config: Any = None) -> NoisyMethod:
    """The method registered as ``name`` for ``classifier`` (``config`` None = its defaults)."""
    factory = NOISY_METHODS.get(name)
    if config is None:
        config = NOISY_METHODS.meta(name)["config"]()
    return factory(classifier, config)

