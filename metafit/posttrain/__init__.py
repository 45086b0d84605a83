"""Post-training of a small LM guided by a larger one: data pipeline, SFT, KTO, DPO, checkpoint merges.

``from metafit import posttrain`` gives the losses (:func:`kto_loss`, :func:`kto_kl_estimate`,
:func:`dpo_loss`, :func:`sequence_logprob`); the data pipeline is :mod:`metafit.posttrain.pipeline`
(synthetic data in :mod:`metafit.posttrain.data`), reference caching :mod:`metafit.posttrain.reference`,
the training stages and merges :mod:`metafit.posttrain.stages`. See ``docs/posttrain.md``.
"""
from metafit.posttrain.losses import (
    check_beta,
    dpo_loss,
    dpo_objective,
    kto_kl_estimate,
    kto_loss,
    kto_objective,
    model_sequence_logprob,
    sequence_logprob,
)

__all__ = ["kto_loss", "kto_kl_estimate", "dpo_loss", "sequence_logprob", "model_sequence_logprob",
           "kto_objective", "dpo_objective", "check_beta"]
