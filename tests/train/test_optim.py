"""Optimisers by optax name with their own arguments; settings an optimiser would ignore are errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metafit.config import ConfigError, from_dict
from metafit.train import TrainConfig, make_optimizer
from metafit.train.optim import optimizer_kwargs, optimizer_names, validate_train_config


def one_update(tx, grads, params):
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


@pytest.mark.parametrize("cfg, reference", [
    (TrainConfig(optimizer="lion", lr=0.1, optimizer_args={"b1": 0.5}, weight_decay=0.01),
     optax.lion(0.1, b1=0.5, weight_decay=0.01)),
    (TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)),
    (TrainConfig(optimizer="adamw", lr=0.1), optax.adamw(0.1, weight_decay=0.0)),  # 0, not optax's 1e-4
    (TrainConfig(optimizer="adam", lr=0.1, optimizer_args={"eps": "1e-3"}), optax.adam(0.1, eps=1e-3)),
])
def test_any_optax_optimizer_by_name_equals_optax(cfg, reference):
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.5, 0.1, -0.3])}
    np.testing.assert_allclose(one_update(make_optimizer(cfg), grads, params)["w"],
                               one_update(reference, grads, params)["w"], rtol=1e-6)


@pytest.mark.parametrize("cfg, message", [
    (TrainConfig(optimizer="adamz"), "unknown optimizer 'adamz'; did you mean 'adam"),
    (TrainConfig(optimizer="adam", weight_decay=0.1), "train.weight_decay=0.1 would be ignored: adam"),
    (TrainConfig(optimizer="sgd", weight_decay=0.1), "train.weight_decay=0.1 would be ignored: sgd"),
    (TrainConfig(optimizer="adam", momentum=0.9), "train.momentum=0.9 would be ignored: adam"),
    (TrainConfig(optimizer="adam", optimizer_args={"beta1": 0.9}), "optimizer_args.beta1: adam takes no argument"),
    (TrainConfig(optimizer="adamw", weight_decay=0.1, optimizer_args={"weight_decay": 0.2}), "both set"),
    (TrainConfig(optimizer="lbfgs"), "not supported"),
    (TrainConfig(optimizer="rprop", schedule="cosine"), "optax.rprop takes a constant learning rate only"),
    (TrainConfig(optimizer="sm3", warmup_steps=2), "set train.schedule=constant and train.warmup_steps=0"),
])
def test_bad_optimizer_settings_name_the_key(cfg, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_train_config(cfg)


def test_names_and_yaml_round_trip():
    assert {"adamw", "sgd", "lion", "adafactor"} <= set(optimizer_names())
    assert not any(n.startswith("scale_by") for n in optimizer_names())
    cfg = from_dict(TrainConfig, {"optimizer": "adamw", "optimizer_args": {"b2": 0.95}}, "train")
    assert optimizer_kwargs(cfg) == {"b2": 0.95, "weight_decay": 0.0}
    assert hash(cfg) == hash(TrainConfig(optimizer="adamw", optimizer_args={"b2": 0.95}))
    with pytest.raises(ConfigError, match="train.optimizer_args: expected a mapping"):
        from_dict(TrainConfig, {"optimizer_args": [1]}, "train")


def test_rprop_trains_through_fit_as_optax_rprop_does():
    # rprop's state starts each parameter's step size at the learning rate: it takes a scalar, not a
    # schedule, and the trainer must not trace a placeholder into it
    from metafit.train import fit

    target = jnp.array([0.3, -1.0, 2.0])

    def loss(params, batch, key):
        return jnp.sum((params["w"] - target) ** 2) + 0.0 * batch["x"].sum(), {}

    params = {"w": jnp.zeros(3)}
    cfg = TrainConfig(optimizer="rprop", lr=0.05, steps=6, batch_size=1, log_every=3, schedule="constant")
    out = fit(loss, params, lambda step: {"x": np.zeros((1, 1), np.float32)}, cfg, key=jax.random.key(0), progress=False)
    tx, expected = optax.rprop(0.05), params
    state = tx.init(expected)
    for _ in range(6):
        grads = jax.grad(lambda p: jnp.sum((p["w"] - target) ** 2))(expected)
        updates, state = tx.update(grads, state, expected)
        expected = optax.apply_updates(expected, updates)
    np.testing.assert_allclose(out.params["w"], expected["w"], rtol=1e-6)
    assert float(jnp.abs(out.params["w"]).max()) > 0.05  # it moved more than one first step
