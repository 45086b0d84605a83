"""Context awareness after instruction tuning (Wang, Bai, Peng, Hsieh 2024, arXiv 2411.02688).

Diagnostics, steering and indicator-conditioned SFT for metafit's causal LMs::

    from metafit import context, models
    enc = context.encode_conversation(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
    bias = context.steering_bias(user_mask, alpha=0.9)      # [b, 1, 1, keys]
    logits = model.forward(ids, attention_mask=mask, attention_bias=bias).logits
    mass = context.user_attention(model, ids, user_mask)     # [layers, heads] at the last position
    layer, head = context.retrieval_head(model, tokenizer, probes)
    s = context.dependency_score(model, tokenizer, conversation)   # s_M per assistant turn
    ids = models.generate(model, ids, steer=(user_mask, 0.9), max_new_tokens=32)

Modules: :mod:`.conversation` (user-token masks from chat templates), :mod:`.steering`
(steering bias, user attention, retrieval head), :mod:`.dependency` (s_M and relabelling),
:mod:`.indicator` (the ``[IND]`` token and its trainable row), :mod:`.evaluate` (batched
answering, NIH grids and heatmaps, cached arms and diagnosis). Data: :mod:`metafit.data.context_tasks`.
"""
from .conversation import EncodedConversation, encode_conversation, left_pad, render
from .dependency import dependency_score, mark_dependent, sink_token_ids, turn_scores, with_indicator
from .evaluate import answer, evaluate_items, nih_heatmap, nih_recall_grid, run_arm, run_diagnosis, score
from .indicator import (INDICATOR, add_indicator, indicator_loss, indicator_params, indicator_trainable,
                        with_indicator_row)
from .sft import conversation_of, flag_items, sft_arrays, train_sft, with_indicators
from .steering import middle_layers, prompt_attention, require_attention_hook, retrieval_head, steering_bias, user_attention

__all__ = [
    "EncodedConversation", "encode_conversation", "left_pad", "render",
    "dependency_score", "mark_dependent", "sink_token_ids", "turn_scores", "with_indicator",
    "answer", "evaluate_items", "nih_heatmap", "nih_recall_grid", "run_arm", "run_diagnosis", "score",
    "INDICATOR", "add_indicator", "indicator_loss", "indicator_params", "indicator_trainable", "with_indicator_row",
    "middle_layers", "prompt_attention", "require_attention_hook", "retrieval_head", "steering_bias",
    "user_attention", "conversation_of", "flag_items", "sft_arrays", "train_sft", "with_indicators",
]
