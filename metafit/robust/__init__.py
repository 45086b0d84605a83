"""Noise-robust parameter-efficient fine-tuning: CleaR and noisy-label baselines.

Pieces (bottom-up):

* :mod:`~metafit.robust.losses` -- CE, CleaR's consistency term, GCE, co-teaching selection.
* :mod:`~metafit.robust.clean_prob` -- per-sample loss EMA and the 2-component GMM clean probability.
* :mod:`~metafit.robust.routing` -- per-layer per-sample Bernoulli gates ``g ~ Bernoulli(r p_i)``.
* :mod:`~metafit.robust.metrics` -- peak/last accuracy, memorisation, clean-probability AUROC,
  mean ± std over seeds.
* :mod:`~metafit.robust.tasks` -- tokenised stratified splits and their noisy-label tasks.
* :mod:`~metafit.robust.classifier` -- encoder + gated PEFT + head as a pure function.
* :mod:`~metafit.robust.methods` -- the methods (``ce``, ``clear``, ``gce``, ``coteaching``,
  ``gmm_filter``) as losses for :func:`metafit.train.fit`.
* :mod:`~metafit.robust.runner` -- :func:`train_noisy`: all epochs in one ``fit`` call, the
  per-sample pass + GMM in an epoch-boundary trainer callback whose state is checkpointed, exact resume.
* :mod:`~metafit.robust.backbones` -- the shipped MiniLM encoder or a tiny BERT trained here.

Example (tiny, CPU, seconds)::

    backbone = tiny_keyword_backbone(num_classes=4)
    splits = encoded_splits("keywords", backbone.tokenizer, max_len=32, num_examples=600, num_classes=4)
    task = noisy_task(splits, "symmetric", 0.4, seed=0)
    classifiers = text_classifiers(backbone, 4, tuning="adapter")
    method = make_method("clear", classifiers(jax.random.key(0)))
    result = train_noisy(method, classifiers, task, TrainConfig(batch_size=16, lr=1e-3), epochs=6,
                         key=jax.random.key(0))
    result.summary   # peak/last test accuracy, memorisation, clean AUROC

References:
  Kim, Kim, Lee. "Learning from Noisy Labels with Clean Routing of Parameter-Efficient
  Fine-Tuning Modules" (CleaR), ACL 2024.
"""
from metafit.robust.backbones import BACKBONES, Backbone, make_backbone, minilm_backbone, tiny_keyword_backbone
from metafit.robust.classifier import TextClassifier, build_text_classifier, text_classifiers
from metafit.robust.clean_prob import CleanProbability, ema_losses, gmm_clean_probability
from metafit.robust.losses import (consistency_loss, coteaching_losses, cross_entropy, generalized_cross_entropy,
                                   small_loss_mask)
from metafit.robust.methods import (NOISY_METHODS, CEConfig, ClearConfig, CoteachingConfig, GCEConfig,
                                    GMMFilterConfig, NoisyMethod, make_method, method_config)
from metafit.robust.metrics import accuracy, clean_auroc, mean_std, memorisation, peak_and_last, summarise_seeds
from metafit.robust.routing import inference_gates, routing_gates
from metafit.robust.runner import EPOCH_HOOK, EpochState, NoisyRunResult, train_noisy
from metafit.robust.tasks import EncodedSplit, EncodedSplits, NoisyTask, encoded_splits, noise_key, noisy_task

__all__ = [
    "BACKBONES", "Backbone", "make_backbone", "minilm_backbone", "tiny_keyword_backbone", "TextClassifier",
    "build_text_classifier", "text_classifiers",
    "CleanProbability", "ema_losses", "gmm_clean_probability", "consistency_loss", "coteaching_losses",
    "cross_entropy", "generalized_cross_entropy", "small_loss_mask", "NOISY_METHODS", "CEConfig", "ClearConfig",
    "CoteachingConfig", "GCEConfig", "GMMFilterConfig", "NoisyMethod", "make_method", "method_config", "accuracy", "clean_auroc",
    "mean_std", "memorisation", "peak_and_last", "summarise_seeds", "inference_gates", "routing_gates",
    "EPOCH_HOOK", "EpochState", "NoisyRunResult", "train_noisy", "EncodedSplit", "EncodedSplits", "NoisyTask",
    "encoded_splits", "noise_key", "noisy_task",
]
