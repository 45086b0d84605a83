"""Model merging on pytrees: task vectors, TA/TIES/DARE/breadcrumbs/SLERP/model stock/Fisher,
streaming safetensors merges and YAML recipes, ATM, CKA, activation interpolation and routing.

Public API (see each module for the maths):
  task_arithmetic(base, finetuned, scale), ties(base, finetuned, density, scale),
  dare(base, finetuned, drop_rate, scale, *, key), slerp(a, b, t), cka(x, y),
  merge(method_name, base, finetuned, **params), MERGE_METHODS (registry "merge-method").

Modules imported on their own: ``atm`` (alternating tuning and merging), ``routing``
(activation interpolation, learned routing over experts' MLPs), ``heads`` (shared encoder with
frozen probe heads, the small-scale merging setting), ``experts`` (LoRA experts of a causal LM
merged by recipes and by ATM), ``recipe`` / ``stream`` (YAML recipes, streamed safetensors merges).
"""
from metafit.merge.methods import (
    MERGE_METHODS,
    MergeError,
    MergeMethod,
    apply_task_vector,
    breadcrumbs,
    check_compatible,
    dare,
    dare_ties,
    fisher_merge,
    general_task_arithmetic,
    linear,
    merge,
    model_stock,
    slerp,
    slerp_tensor,
    task_arithmetic,
    task_vector,
    ties,
)
from metafit.merge.similarity import cka, cka_debiased
from metafit.merge.fisher import diagonal_fisher
