"""KTO, DPO and per-sequence log-probabilities against closed forms, brute force and finite differences."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metafit import posttrain
from metafit.models import LlamaConfig, LlamaForCausalLM

sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))


def numeric_grad(f, x, eps=1e-2):
    """Central differences in float64 on a float32 function (the losses are smooth; eps balances error)."""
    f = jax.jit(f)  # one compilation instead of one per operation
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for i in range(x.size):
        step = np.zeros_like(x)
        step.flat[i] = eps
        out.flat[i] = (float(f(jnp.asarray(x + step, jnp.float32))) - float(f(jnp.asarray(x - step, jnp.float32)))) / (2 * eps)
    return out


def test_dpo_is_the_logistic_loss_of_the_reward_margin():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (jnp.asarray(rng.normal(size=6) * 5, jnp.float32) for _ in range(4))
    beta = 0.3
    margin = np.asarray((pc - rc) - (pr - rr))
    expected = np.mean(np.log1p(np.exp(-beta * margin)))
    np.testing.assert_allclose(posttrain.dpo_loss(pc, pr, rc, rr, beta=beta), expected, rtol=1e-5)


def test_dpo_with_policy_equal_to_reference_is_log_2():
    logp = jnp.asarray([-3.0, -10.0, -0.5])
    other = jnp.asarray([-7.0, -1.0, -2.5])
    np.testing.assert_allclose(posttrain.dpo_loss(logp, other, logp, other, beta=0.1), math.log(2), rtol=1e-6)


def test_dpo_gradient_at_a_known_point():
    """d/d pol_chosen = -beta sigma(-beta m) / b, d/d pol_rejected = +beta sigma(-beta m) / b."""
    beta = 0.5
    pc, pr = jnp.asarray([-2.0, -4.0]), jnp.asarray([-3.0, -1.0])
    rc, rr = jnp.asarray([-2.5, -3.0]), jnp.asarray([-2.0, -2.0])
    margin = np.asarray((pc - rc) - (pr - rr))
    closed = -beta * sigmoid(-beta * margin) / 2
    grad_c, grad_r = jax.jit(jax.grad(lambda a, b: posttrain.dpo_loss(a, b, rc, rr, beta=beta), argnums=(0, 1)))(pc, pr)
    np.testing.assert_allclose(grad_c, closed, rtol=1e-5)
    np.testing.assert_allclose(grad_r, -closed, rtol=1e-5)
    np.testing.assert_allclose(grad_c, numeric_grad(lambda a: posttrain.dpo_loss(a, pr, rc, rr, beta=beta), pc),
                               rtol=1e-3, atol=1e-5)


def test_kto_per_example_losses_at_zero_reward_match_the_formula():
    """r = 0: lambda_D (1 - sigma(-beta z0)) for desirable, lambda_U (1 - sigma(beta z0)) for undesirable."""
    logp = jnp.asarray([-4.0, -2.0, -9.0])
    desirable = jnp.asarray([1.0, 0.0, 1.0])
    for kl, lam_d, lam_u in ((0.0, 1.0, 1.0), (2.0, 1.5, 0.7)):
        per = posttrain.kto_loss(logp, logp, desirable, beta=0.1, desirable_weight=lam_d,
                                 undesirable_weight=lam_u, kl=kl, reduce=False)
        expected = [lam_d * (1 - sigmoid(-0.1 * kl)), lam_u * (1 - sigmoid(0.1 * kl)), lam_d * (1 - sigmoid(-0.1 * kl))]
        np.testing.assert_allclose(per, expected, rtol=1e-6)
    assert float(posttrain.kto_loss(logp, logp, desirable, beta=0.1)) == pytest.approx(0.5)


def test_kto_gradient_at_a_known_point():
    """d/d policy: -lambda_D beta s(1-s) / b for desirable (s = sigma(beta(r - z0))), +lambda_U beta s'(1-s') / b else."""
    beta, lam_d, lam_u, kl = 0.4, 1.3, 0.8, 0.5
    policy = jnp.asarray([-2.0, -5.0, -1.0, -3.0])
    ref = jnp.asarray([-3.0, -4.0, -1.5, -2.0])
    desirable = jnp.asarray([1.0, 0.0, 0.0, 1.0])
    r = np.asarray(policy - ref)
    s_d, s_u = sigmoid(beta * (r - kl)), sigmoid(beta * (kl - r))
    d = np.asarray(desirable)
    closed = (d * -lam_d * beta * s_d * (1 - s_d) + (1 - d) * lam_u * beta * s_u * (1 - s_u)) / 4
    loss = lambda p: posttrain.kto_loss(p, ref, desirable, beta=beta, desirable_weight=lam_d,
                                        undesirable_weight=lam_u, kl=kl)
    grad = jax.jit(jax.grad(loss))(policy)
    np.testing.assert_allclose(grad, closed, rtol=1e-5)
    np.testing.assert_allclose(grad, numeric_grad(loss, policy), rtol=1e-3, atol=1e-6)


def test_kto_reference_point_is_detached_and_clipped_at_zero():
    policy, ref, desirable = jnp.asarray([-1.0, -2.0]), jnp.asarray([-1.5, -1.0]), jnp.asarray([1.0, 0.0])
    loss = lambda kl: posttrain.kto_loss(policy, ref, desirable, kl=kl)
    assert float(jax.grad(loss)(jnp.float32(0.7))) == 0.0
    assert float(loss(jnp.float32(-3.0))) == float(loss(jnp.float32(0.0)))


def test_kto_kl_estimate_is_the_mean_mismatched_reward():
    pol, ref = jnp.asarray([-3.0, -6.0, -2.0]), jnp.asarray([-4.0, -5.0, -4.0])
    assert float(posttrain.kto_kl_estimate(pol, ref)) == pytest.approx((1 - 1 + 2) / 3)


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_beta_is_an_error_before_compute(beta):
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        posttrain.kto_loss(x, x, x, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        posttrain.dpo_loss(x, x, x, x, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        posttrain.dpo_objective(None, beta=beta)


def test_bad_kto_weight_is_an_error():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="undesirable_weight"):
        posttrain.kto_loss(x, x, x, undesirable_weight=0.0)


def test_sequence_logprob_equals_a_brute_force_sum():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    expected = []
    for b in range(2):
        total = 0.0
        for t in range(4):  # position t predicts token t + 1; the last column is ignored
            if mask[b, t]:
                z = logits[b, t].astype(np.float64)
                total += z[ids[b, t + 1]] - np.log(np.exp(z).sum())
        expected.append(total)
    np.testing.assert_allclose(posttrain.sequence_logprob(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask)),
                               expected, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_lm():
    config = LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    # abstract init + numpy weights: eager NNX initialisation is slow on a loaded 2-core machine
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    return graphdef, jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.3).astype(x.dtype), abstract)


def _rows(rng, n, length=6):
    ids = rng.integers(1, 23, size=(n, length)).astype(np.int32)
    mask = np.ones_like(ids)
    loss_mask = np.zeros((n, length), np.float32)
    loss_mask[:, 2:5] = 1.0
    return ids, mask, loss_mask


def test_cached_reference_equals_the_reference_forward_in_the_step(tiny_lm, tmp_path):
    """Both objectives give the same loss and gradient from cached reference values as from the model."""
    from metafit.posttrain.reference import cached_reference_logprobs

    graphdef, params = tiny_lm
    reference = jax.tree.map(lambda x: x * np.float32(0.9), params)  # another model of the same architecture (numpy)
    rng = np.random.default_rng(0)
    own, kl = (dict(zip(("input_ids", "attention_mask", "loss_mask"), _rows(rng, 4))) for _ in range(2))
    cached = cached_reference_logprobs(tmp_path / "ref.npz", graphdef, reference, {"": own, "kl_": kl}, chunk=3)
    again = cached_reference_logprobs(tmp_path / "ref.npz", graphdef, reference, {"": own, "kl_": kl}, chunk=3)
    np.testing.assert_array_equal(cached[""], again[""])
    batch = {**own, **{f"kl_{k}": v for k, v in kl.items()}, "desirable": np.array([1, 0, 1, 0], np.float32),
             "ref_logp": cached[""], "kl_ref_logp": cached["kl_"]}
    dpo_batch = {**{f"chosen_{k}": v for k, v in own.items()}, **{f"rejected_{k}": v for k, v in kl.items()},
                 "chosen_ref_logp": cached[""], "rejected_ref_logp": cached["kl_"]}

    # One program for every comparison (XLA shares the policy's forward/backward between the two
    # paths, so it compiles about as fast as one of them): the cached path, and the reference
    # passed as an argument (one compilation serves every reference model, the policy included).
    kto_cached = jax.value_and_grad(lambda p, b: posttrain.kto_objective(graphdef, beta=0.5)(p, b, None)[0])
    kto = jax.value_and_grad(lambda p, r, b: posttrain.kto_objective(graphdef, beta=0.5, reference_params=r)(
        p, b, None)[0])
    dpo_cached = lambda p, b: posttrain.dpo_objective(graphdef)(p, b, None)[0]
    dpo = lambda p, r, b: posttrain.dpo_objective(graphdef, reference_params=r)(p, b, None)[0]
    both = jax.jit(lambda p, r, b, d: ((kto_cached(p, b), kto(p, r, b)), (dpo_cached(p, d), dpo(p, r, d))))

    (with_cache, in_step), (dpo_with_cache, dpo_in_step) = both(params, reference, batch, dpo_batch)
    np.testing.assert_allclose(with_cache[0], in_step[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(with_cache[1]), jax.tree.leaves(in_step[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(dpo_with_cache, dpo_in_step, rtol=1e-5)
    _, (_, dpo_at_policy) = both(params, params, batch, dpo_batch)
    np.testing.assert_allclose(dpo_at_policy, math.log(2), rtol=1e-5)  # policy = reference


def test_vocabulary_mismatch_is_an_error():
    from metafit.posttrain.reference import check_same_vocabulary

    from types import SimpleNamespace

    model = lambda vocab: SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))  # only the config is read
    check_same_vocabulary(model(23), model(23))
    with pytest.raises(ValueError, match="vocabulary"):
        check_same_vocabulary(model(23), model(29))
    tokenizer = lambda vocab: SimpleNamespace(get_vocab=lambda: vocab)
    with pytest.raises(ValueError, match="tokenizer"):
        check_same_vocabulary(model(23), model(23), tokenizer({"a": 0}), tokenizer({"a": 1}))
