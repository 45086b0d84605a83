"""Noise-robust parameter-efficient fine-tuning: CleaR and noisy-label baselines.

Pieces (bottom-up):

* :mod:`~metafit.robust.losses` -- CE, CleaR's consistency term, GCE, co-teaching selection.
* :mod:`~metafit.robust.clean_prob` -- per-sample loss EMA and the 2-component GMM clean probability.
* :mod:`~metafit.robust.routing` -- per-layer per-sample Bernoulli gates ``g ~ Bernoulli(r p_i)``.
* :mod:`~metafit.robust.metrics` -- peak/last accuracy, memorisation, clean-probability AUROC.
* :mod:`~metafit.robust.classifier` -- encoder + gated PEFT + head as a pure function.
* :mod:`~metafit.robust.methods` -- the methods (``ce``, ``clear``, ``gce``, ``coteaching``,
  ``gmm_filter``) as losses for :func:`metafit.train.fit`.
* :mod:`~metafit.robust.runner` -- :func:`train_noisy`: all epochs in one ``fit`` call, the
  per-sample pass + GMM at epoch boundaries, exact resume.
* :mod:`~metafit.robust.backbones` -- the shipped MiniLM encoder or a tiny BERT trained here.

Example (tiny, CPU, seconds)::

    backbone = tiny_keyword_backbone(num_classes=4)
    classifiers = lambda key: build_text_classifier(backbone.make_encoder(), backbone.hidden_size, 4,
                                                    tuning="adapter", key=key)
    method = make_method("clear", classifiers(jax.random.key(0)))
    result = train_noisy(method, classifiers, task, TrainConfig(batch_size=16, lr=1e-3), epochs=6,
                         key=jax.random.key(0))
    result.summary   # peak/last test accuracy, memorisation, clean AUROC

References:
  Kim, Kim, Lee. "Learning from Noisy Labels with Clean Routing of Parameter-Efficient
  Fine-Tuning Modules" (CleaR), ACL 2024.
"""
from metafit.robust.backbones import Backbone, minilm_backbone, tiny_keyword_backbone
from metafit.robust.classifier import TextClassifier, build_text_classifier
from metafit.robust.clean_prob import CleanProbability, ema_losses, gmm_clean_probability
from metafit.robust.losses import (consistency_loss, coteaching_losses, cross_entropy, generalized_cross_entropy,
                                   small_loss_mask)
from metafit.robust.methods import (NOISY_METHODS, CEConfig, ClearConfig, CoteachingConfig, GCEConfig,
                                    GMMFilterConfig, NoisyMethod, make_method)
from metafit.robust.metrics import accuracy, clean_auroc, memorisation, peak_and_last
from metafit.robust.routing import inference_gates, routing_gates
from metafit.robust.runner import EncodedSplit, NoisyRunResult, NoisyTask, train_noisy

__all__ = [
    "Backbone", "minilm_backbone", "tiny_keyword_backbone", "TextClassifier", "build_text_classifier",
    "CleanProbability", "ema_losses", "gmm_clean_probability", "consistency_loss", "coteaching_losses",
    "cross_entropy", "generalized_cross_entropy", "small_loss_mask", "NOISY_METHODS", "CEConfig", "ClearConfig",
    "CoteachingConfig", "GCEConfig", "GMMFilterConfig", "NoisyMethod", "make_method", "accuracy", "clean_auroc",
    "memorisation", "peak_and_last", "inference_gates", "routing_gates", "EncodedSplit", "NoisyRunResult",
    "NoisyTask", "train_noisy",
]
