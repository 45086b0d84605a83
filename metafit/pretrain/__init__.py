"""Pretraining here, on offline data: tokenizers and the small CPU-scale LM (:mod:`metafit.pretrain.small_lm`)."""
