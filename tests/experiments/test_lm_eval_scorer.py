"""InstructionScorer: one compiled response-token loss per architecture, equal to the trainer's loss."""
import jax
import numpy as np
from flax import nnx
from tiny_lm import shared_tiny_llama

from metafit import models
from metafit.data.instructions import encode_sft, make_instructions
from metafit.train.losses import next_token_loss
from metafit.train.lm_eval import InstructionScorer


def test_scorers_of_one_architecture_share_one_compiled_loss_equal_to_the_training_loss():
    model, tok = models.load(shared_tiny_llama())
    graphdef, params = nnx.split(model)
    sets = {"add": make_instructions(3, seed=1, tasks=["add"]), "upper": make_instructions(3, seed=1, tasks=["upper"])}
    first = InstructionScorer(graphdef, tok, sets, buckets=[64], max_new_tokens=2)
    second = InstructionScorer(graphdef, tok, sets, buckets=[64], max_new_tokens=2)  # e.g. validation, then test
    assert second.loss is first.loss  # a rerun or a second scorer compiles nothing new

    batch = jax.device_put(encode_sft(tok, sets["add"], [64]))
    # jitted, as metafit.train.fit runs it (eagerly, each of the forward's ~90 operations compiles on its own)
    expected = jax.jit(next_token_loss(graphdef))(params, batch, None)[0]
    np.testing.assert_allclose(float(first.loss(params, first.batches["add"])), float(expected), rtol=1e-6)
    compiled = first.loss._cache_size()  # other tests of this worker may have scored other shapes
    second.loss(params, second.batches["upper"])
    assert second.loss._cache_size() == compiled
