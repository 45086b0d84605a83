"""Merging adapters changes only the model it is called on, never a model that shares its state.

``nnx.merge(graphdef, state)`` reuses the Variable objects of ``state``: two models merged from
one state (the experts of a merge, a served base and its adapter views) share every weight.
Folding an adapter into its base must therefore give the base layer new Variables rather than
write through the shared ones.
"""
import jax
import numpy as np
from flax import nnx

import metafit.peft as peft
from peft_tiny import all_methods_model, make_input
from test_lora import forward


def test_merge_all_leaves_models_sharing_the_state_unchanged():
    model, x = all_methods_model(), make_input()
    before = np.asarray(forward(model, x))
    graphdef, state = nnx.split(model)
    weights_before = [np.asarray(leaf) for leaf in jax.tree.leaves(state)]
    merged, sibling = nnx.merge(graphdef, state), nnx.merge(graphdef, state)

    peft.merge_all(merged)

    assert peft.count_gated_modules(merged) < peft.count_gated_modules(sibling)  # LoRA, DoRA, IA3, BitFit folded in
    np.testing.assert_allclose(forward(merged, x), before, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(forward(sibling, x), before)  # a shared kernel written twice would move it
    np.testing.assert_array_equal(forward(model, x), before)
    for old, new in zip(weights_before, jax.tree.leaves(state)):
        np.testing.assert_array_equal(old, np.asarray(new))
