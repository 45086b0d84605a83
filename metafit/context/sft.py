r"""Indicator-conditioned SFT (Wang et al. 2024, Method 2) through :func:`metafit.train.fit`.

1. Score every training conversation (one user turn, one assistant turn) with :math:`s_M` on the
   base model (:func:`flag_items`); turns with :math:`s_M > \beta` depend on the context.
2. Append ``[IND]`` to the user turn of the flagged items (:func:`with_indicators`).
3. Fine-tune on the response tokens (:func:`train_sft`): the model carries the indicator token
   (:func:`metafit.context.add_indicator`) and its embedding row trains whatever else is frozen.
4. At evaluation append ``[IND]`` to queries that need the context.

Vanilla SFT is the same call on the items without indicators, same model, data order and
budget. The reported fraction flagged is ``mean(flags)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from metafit import peft
from metafit.data.context_tasks import ContextItem
from metafit.data.batching import epoch_batches
from metafit.data.instructions import Instruction, encode_sft
from metafit.train import TrainConfig, fit
from metafit.train.losses import next_token_loss

from .dependency import dependency_score, with_indicator
from .indicator import indicator_loss, indicator_params, indicator_trainable, with_indicator_row


def conversation_of(item: ContextItem) -> list[dict[str, str]]:
    """The item as a two-turn chat."""
    return [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": item.answer}]


def flag_items(model, tokenizer, items: Sequence[ContextItem], *, beta: float = 0.6, layer: int | None = None,
               fraction: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, flags)``: :math:`s_M` of each item's answer and whether it exceeds the threshold.

    The threshold is ``beta``, or, when ``fraction`` is given, the ``1 - fraction`` quantile of the
    scores (so that share is flagged: a threshold calibrated to a model whose scores sit in a narrow
    band, as one-word answers give).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (s_M is a share of attention), got {beta}")
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    scores = np.asarray([dependency_score(model, tokenizer, conversation_of(it), layer=layer)[0] for it in items])
    threshold = beta if fraction is None else float(np.quantile(scores, 1.0 - fraction))
    return scores, scores > threshold


def with_indicators(items: Sequence[ContextItem], flags: Sequence[bool], indicator: str) -> list[ContextItem]:
    """Items whose flagged prompts end with the indicator."""
    return [dataclasses.replace(it, prompt=with_indicator(it.prompt, indicator)) if flag else it
            for it, flag in zip(items, flags)]


def sft_arrays(tokenizer, items: Sequence[ContextItem], buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """Chat-formatted SFT arrays (loss on the answer and end-of-turn tokens), see :func:`encode_sft`."""
    return encode_sft(tokenizer, [Instruction(it.task, it.prompt, it.answer) for it in items], buckets)


def train_sft(model, arrays: dict[str, np.ndarray], config: TrainConfig, *, token_id: int, seed: int,
              lora: peft.LoraConfig | None = None, workdir=None, log=None, progress: bool = False):
    """Fine-tunes ``model`` (which has the indicator token ``token_id``) in place; returns the fit result.

    With ``lora`` only the adapters and the indicator row train; without, every parameter does.
    The row is written back into the model's embedding at the end.
    """
    if lora is not None:
        peft.apply(model, lora, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    params = indicator_params(model, token_id)
    trainable = indicator_trainable(params, peft.trainable_mask(state) if lora is not None else True)
    result = fit(indicator_loss(next_token_loss(graphdef), token_id), params,
                 epoch_batches(arrays, config.batch_size, seed), config, key=jax.random.key(seed),
                 workdir=workdir, trainable=trainable, log=log, progress=progress)
    nnx.update(model, with_indicator_row(result.params, token_id))
    return result


__all__ = ["conversation_of", "flag_items", "with_indicators", "sft_arrays", "train_sft"]
