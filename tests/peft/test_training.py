"""Only adapter weights train and hold optimiser state; base weights stay bit-identical."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import metafit.peft as peft

from peft_tiny import adapter_loss_and_grads, all_methods_model, make_input, make_model, target_of


def frozen_numpy(model):
    return {k: np.array(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam)))}


def test_base_bit_identical_and_optimizer_state_only_for_adapters():
    model, x = all_methods_model(), make_input()
    before = frozen_numpy(model)
    graphdef, params, rest = peft.split(model)
    adapters_before = jax.tree.map(np.array, params)
    tx = optax.adamw(3e-2)
    opt_state = jax.jit(tx.init)(params)  # one program, not a zeros_like per parameter shape
    gates = jnp.ones((peft.count_gated_modules(model), x.shape[0]))  # = ungated; the gating tests' compiled gradient

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    losses = []
    for _ in range(4):
        (value, _), grads = adapter_loss_and_grads(graphdef, params, rest, gates, x, target_of(x))
        params, opt_state = update(params, opt_state, grads)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    nnx.update(model, params)

    after = frozen_numpy(model)
    assert before.keys() == after.keys()
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), adapters_before, params)
    assert all(jax.tree.leaves(changed))  # every kind of adapter weight moved

    # optimiser state: exactly two moments per adapter scalar (+ adam's count)
    full = nnx.state(make_model(), nnx.Param)
    assert peft.tree_bytes(opt_state) == peft.optimizer_state_bytes(tx, params)
    assert peft.tree_bytes(opt_state) <= 2 * peft.tree_bytes(params) + 16
    assert peft.optimizer_state_bytes(tx, params) < peft.optimizer_state_bytes(tx, full)


def test_with_metafit_trainer_and_trainable_mask():
    """metafit.train.fit over all Params with the PEFT mask: base bit-identical, LoRA trained."""
    from metafit.train import TrainConfig, fit

    model, x = make_model(), make_input()
    peft.apply(model, peft.LoraConfig(rank=2), rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mask = peft.trainable_mask(params)
    assert sum(jax.tree.leaves(mask)) == 2 * 2 * 2  # A, B on q and v of two layers
    target = jnp.ones((x.shape[0], x.shape[1], 3))

    def loss_fn(params, batch, key):
        out = nnx.merge(graphdef, params, rest)(batch["x"])
        return jnp.mean((out - batch["y"]) ** 2), {}

    data = lambda step: {"x": np.asarray(x), "y": np.asarray(target)}  # noqa: E731
    result = fit(loss_fn, params, data, TrainConfig(steps=3, lr=1e-2, batch_size=3, log_every=1),
                 key=jax.random.key(0), trainable=mask, progress=False)
    flat_after = dict(nnx.to_flat_state(result.params))
    for path, var in nnx.to_flat_state(params):
        moved = not np.array_equal(np.asarray(var[...]), np.asarray(flat_after[path][...]))
        assert moved == isinstance(var, nnx.LoRAParam), path
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_memory_report_counts_match_hand_computation():
    report = peft.memory_report(make_model, peft.LoraConfig(rank=2))
    # q_proj 16->16 and v_proj 16->8 in 2 layers: 2 * [(16 + 16) * 2 + (16 + 8) * 2]
    assert report["adapter_params"] == 2 * ((16 + 16) * 2 + (16 + 8) * 2)
    assert report["peft_opt_state_bytes"] == 2 * 4 * report["adapter_params"] + 4  # mu, nu + int32 count
