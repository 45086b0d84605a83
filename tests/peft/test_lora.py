"""LoRA/DoRA/IA3/BitFit/adapters against closed forms: identity at init, formulas, merging."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metafit.peft as peft
from metafit.registry import UnknownNameError

from peft_tiny import forward, METHODS, make_input, make_model, perturb_adapters


@pytest.mark.parametrize("name", ["lora", "dora", "adapter", "ia3", "bitfit"])
def test_identity_at_init(name):
    """LoRA with B = 0, DoRA (m = ||W||), adapters (W_up = 0), IA3 (l = 1), BitFit (0 offset) = base model."""
    model, x = make_model(), make_input()
    base = forward(model, x)
    peft.apply(model, METHODS[name], rngs=nnx.Rngs(1))
    assert peft.count_gated_modules(model) > 0
    np.testing.assert_allclose(forward(model, x), base, rtol=1e-6, atol=1e-6)
    if name != "dora":  # DoRA's m/||W|| is 1 only up to rounding
        np.testing.assert_array_equal(forward(model, x), base)


def test_lora_matches_formula():
    """y = x W + b + (alpha / r) x A B."""
    model = make_model()
    peft.apply(model, peft.LoraConfig(rank=3, alpha=6.0, targets=("layers.0.self_attn.q_proj",), init="random"),
               rngs=nnx.Rngs(1))
    wrapper = model.layers[0].self_attn.q_proj
    x = np.asarray(make_input())
    kernel, bias, a, b = (np.asarray(v[...]) for v in (wrapper.base_layer.kernel, wrapper.base_layer.bias,
                                                         wrapper.lora_A, wrapper.lora_B))
    expected = x @ kernel + bias + 2.0 * (x @ a) @ b  # in numpy: no XLA program per operation
    np.testing.assert_allclose(forward(wrapper, x), expected, rtol=1e-5, atol=1e-5)
    assert wrapper.lora_A.shape == (16, 3) and wrapper.lora_B.shape == (3, 16)


def test_rslora_scaling():
    model = make_model()
    peft.apply(model, peft.LoraConfig(rank=4, alpha=8.0, use_rslora=True), rngs=nnx.Rngs(1))
    assert model.layers[0].self_attn.q_proj.scaling == pytest.approx(4.0)


def test_dora_matches_formula():
    """y = x (m * (W + s A B) / ||W + s A B||_col) + b."""
    model = make_model()
    peft.apply(model, peft.LoraConfig(rank=2, targets=("layers.1.mlp.down_proj",), use_dora=True, init="random"),
               rngs=nnx.Rngs(1))
    perturb_adapters(model)
    wrapper = model.layers[1].mlp.down_proj
    x = np.random.default_rng(3).normal(size=(4, 32)).astype(np.float32)
    base, a, b, m = (np.asarray(v[...]) for v in (wrapper.base_layer.kernel, wrapper.lora_A, wrapper.lora_B,
                                                  wrapper.lora_magnitude_vector))
    adapted = base + wrapper.scaling * a @ b  # in numpy: no XLA program per operation
    kernel = m * adapted / np.linalg.norm(adapted, axis=0)
    np.testing.assert_allclose(forward(wrapper, x), x @ kernel + np.asarray(wrapper.base_layer.bias[...]),
                               rtol=1e-5, atol=1e-5)


# LoRA and DoRA as in METHODS (perturbed off init below): their forwards are compiled once for
# test_identity_at_init and reused here
@pytest.mark.parametrize("config", [
    METHODS["lora"],
    peft.LoraConfig(rank=4, init="random", use_rslora=True, targets=("*_proj",)),
    METHODS["dora"],
], ids=["lora", "rslora-all", "dora"])
def test_merge_lora_equals_unmerged(config):
    model, x = make_model(), make_input()
    peft.apply(model, config, rngs=nnx.Rngs(1))
    perturb_adapters(model)
    before = forward(model, x)
    peft.merge_lora(model)
    assert peft.count_gated_modules(model) == 0
    assert type(model.layers[0].self_attn.q_proj) is nnx.Linear
    np.testing.assert_allclose(forward(model, x), before, rtol=1e-5, atol=1e-5)


def test_merge_uses_scalar_gate_and_refuses_per_sample():
    model, x = make_model(), make_input()
    peft.apply(model, METHODS["lora"], rngs=nnx.Rngs(1))
    perturb_adapters(model)
    peft.set_gates(model, 0.5)
    half = forward(model, x)
    peft.set_gates(model, jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="per-sample"):
        peft.merge_lora(model)
    peft.set_gates(model, 0.5)
    np.testing.assert_allclose(forward(peft.merge_lora(model), x), half, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ia3", "bitfit", "lora"])
def test_merge_all_equals_unmerged(name):
    model, x = make_model(), make_input()
    peft.apply(model, METHODS[name], rngs=nnx.Rngs(1))
    perturb_adapters(model)
    before = forward(model, x)
    peft.merge_all(model)
    assert peft.count_gated_modules(model) == 0
    np.testing.assert_allclose(forward(model, x), before, rtol=1e-5, atol=1e-5)


def test_remove_peft_restores_base_exactly():
    model, x = make_model(), make_input()
    base = forward(model, x)
    for name in ("lora", "prefix", "bitfit"):
        peft.apply(model, METHODS[name], rngs=nnx.Rngs(1))
    perturb_adapters(model)
    assert not np.allclose(forward(model, x), base)
    peft.remove_peft(model)
    np.testing.assert_array_equal(forward(model, x), base)
    assert len(nnx.state(model, nnx.LoRAParam)) == 0


def test_target_selection_by_glob_regex_type_and_exclude():
    def paths(config):  # on shapes only: selection needs no weights, and nothing is compiled
        return peft.gated_paths(nnx.eval_shape(lambda: peft.apply(make_model(), config, rngs=nnx.Rngs(0))))

    assert paths(peft.LoraConfig(targets=("q_proj",))) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]
    assert paths(peft.LoraConfig(targets=("layers.1.*",), exclude=("*mlp*",))) == [
        f"layers.1.self_attn.{p}_proj" for p in "koqv"]
    assert paths(peft.LoraConfig(targets=(r"re:layers\.0\.(mlp\.up|self_attn\.k)_proj",))) == [
        "layers.0.mlp.up_proj", "layers.0.self_attn.k_proj"]
    assert len(paths(peft.LoraConfig(targets=()))) == 2 * 6 + 1          # every Linear incl. head
    assert paths(peft.BitFitConfig(target_types=("LayerNorm",))) == ["layers.0.norm", "layers.1.norm"]
    houlsby = paths(peft.AdapterConfig())
    assert houlsby == ["layers.0.mlp.down_proj", "layers.0.self_attn.o_proj",
                       "layers.1.mlp.down_proj", "layers.1.self_attn.o_proj"]
    assert paths(peft.AdapterConfig(style="pfeiffer")) == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="no module matched"):
        paths(peft.LoraConfig(targets=("nope",)))


def test_stacked_methods_and_wrapper_not_rewrapped():
    model, x = make_model(), make_input()
    peft.apply(model, peft.IA3Config(targets=("q_proj",)), rngs=nnx.Rngs(0))
    peft.apply(model, peft.LoraConfig(targets=("q_proj",), init="random"), rngs=nnx.Rngs(1))
    wrapper = model.layers[0].self_attn.q_proj
    assert isinstance(wrapper, peft.IA3Linear) and isinstance(wrapper.base_layer, peft.LoRALinear)
    assert peft.gated_paths(model).count("layers.0.self_attn.q_proj") == 2
    perturb_adapters(model)
    before = forward(model, x)
    np.testing.assert_allclose(forward(peft.merge_all(model), x), before, rtol=1e-5, atol=1e-5)


def test_peft_config_umbrella_and_registry():
    model, x = make_model(), make_input()
    peft.apply(model, peft.PeftConfig(method="dora", lora=peft.LoraConfig(rank=2)), rngs=nnx.Rngs(0))
    assert model.layers[0].self_attn.q_proj.use_dora
    assert set(peft.PEFT_METHODS.names()) == {"lora", "dora", "adapter", "prefix", "bitfit", "ia3"}
    with pytest.raises(UnknownNameError, match="did you mean 'lora'"):
        peft.apply(make_model(), peft.PeftConfig(method="lorra"), rngs=nnx.Rngs(0))


def test_peft_config_from_yaml_dict():
    from metafit.config import from_dict

    cfg = from_dict(peft.PeftConfig, {"method": "lora", "lora": {"rank": 4, "targets": ["q_proj", "k_proj"]}})
    assert cfg.lora.rank == 4 and cfg.lora.targets == ("q_proj", "k_proj")


def forward_traced_now(model, x):
    """``model(x)`` in a jit traced by this call (one program, where eager NNX compiles every operation)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


def test_lora_dropout_train_vs_eval():
    model, x = make_model(), make_input()
    peft.apply(model, peft.LoraConfig(rank=2, dropout=0.5, init="random"), rngs=nnx.Rngs(params=1, dropout=2))
    model.eval()
    a, b = forward(model, x), forward(model, x)
    np.testing.assert_array_equal(a, b)
    model.train()
    np.testing.assert_array_equal(forward(model, x), a)  # dropout applies in training steps only
    # what metafit.train.fit enters while it traces the loss; the flag is read at trace time, so these
    # forwards are traced inside the context (forward's jit cache holds the traces made outside it)
    with peft.dropout_enabled():
        assert not np.allclose(forward_traced_now(model, x), a)
        model.eval()
        np.testing.assert_allclose(forward_traced_now(model, x), a, rtol=1e-5, atol=1e-6)  # eval() still wins


def test_lora_init_compiles_one_program_per_shape_and_draws_the_documented_ranges():
    """A and B of ``init="random"`` come from one compiled program per (in, out, rank), not one per operation;
    A ~ U(-1/sqrt(in), 1/sqrt(in)) (torch's kaiming_uniform_(a=sqrt(5))), B ~ U(-1/sqrt(r), 1/sqrt(r))."""
    from metafit.peft.lora import _lora_init

    model, before = make_model(), _lora_init._cache_size()
    peft.apply(model, peft.LoraConfig(rank=5, targets=("q_proj", "k_proj", "up_proj"), init="random"),
               rngs=nnx.Rngs(1))
    assert _lora_init._cache_size() - before == 3  # [16, 16], [16, 8], [16, 32], each in both layers
    for proj in (model.layers[0].mlp.up_proj, model.layers[1].self_attn.k_proj):
        a, b = np.asarray(proj.lora_A[...]), np.asarray(proj.lora_B[...])
        assert 0.8 / 16**0.5 < np.abs(a).max() <= 1 / 16**0.5 and 0.8 / 5**0.5 < np.abs(b).max() <= 1 / 5**0.5
    with pytest.raises(ValueError, match="unknown LoRA init 'kaiming'"):
        peft.apply(make_model(), peft.LoraConfig(init="kaiming"), rngs=nnx.Rngs(1))


def test_merge_and_dora_init_compile_one_program_per_kernel_shape(caplog):
    """DoRA's initial magnitude and merge_lora run one jitted program per kernel shape and nothing else
    (as eager operations they compiled 3-6 single-operation programs per shape)."""
    warm_up = make_model()  # compiles what a first call compiles once (key splitting, scalar gates)
    peft.merge_lora(peft.apply(warm_up, peft.LoraConfig(rank=1, use_dora=True), rngs=nnx.Rngs(1)))
    model = make_model()
    config = peft.LoraConfig(rank=7, targets=("q_proj", "v_proj", "down_proj"), use_dora=True)  # a rank no other test uses
    caplog.clear()  # only what the lines below compile (with JAX_LOG_COMPILES set, the warm-up logs too)
    with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
        peft.apply(model, config, rngs=nnx.Rngs(1))
        peft.merge_lora(model)
    compiled = sorted(m.split()[4] for m in caplog.messages if m.startswith("Finished XLA compilation of"))
    # q [16, 16], v [16, 8], down [32, 16]: each shape's initial A, B, its initial m and its merged kernel
    assert compiled == ["jit(_dora_magnitude)"] * 3 + ["jit(_lora_init)"] * 3 + ["jit(_merged_kernel)"] * 3, compiled
