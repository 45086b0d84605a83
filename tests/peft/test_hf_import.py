"""HF PEFT import: adapters saved by the `peft` PyTorch library load here with the same logits.

Each parity test saves a trained-looking adapter with peft (weights moved off their init), loads it
with ``metafit.peft.load_hf_peft``, compares logits with peft's own, and exports it back with
``export_hf_peft``: the exported tensors equal peft's file (the loader is the exporter's inverse).
"""
import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import metafit.peft as peft
from metafit.peft.core import PeftModule, iter_modules, path_str

from peft_tiny import forward, make_model, random_model
from test_hf_export import IDS, tiny_hf_folder

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # tiny reference forwards; more threads only spin-wait (see models_tiny.py)
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft", reason="pip install --no-deps peft==0.21.2 accelerate==1.15.0")

TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _base(root, kind):
    from metafit.models import load

    folder = tiny_hf_folder(root, kind)
    return folder, load(folder, tokenizer=False)[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """``base(kind) -> (HF folder, fresh metafit copy)`` for kind in llama / gpt2, built once per module."""
    root = tmp_path_factory.mktemp("bases")

    def get(kind):
        folder, model = _base(root, kind)
        return folder, nnx.clone(model)

    return get


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """``saved(name) -> (adapter folder, peft's logits)``: adapters saved by peft, each built once."""
    root = tmp_path_factory.mktemp("adapters")
    configs = {
        "dora": ("llama", lambda: hf_peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
            use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}), True),
        "gpt2-lora-bin": ("gpt2", lambda: hf_peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True), False),
        "ia3": ("llama", lambda: hf_peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), True),
        "beft": ("llama", lambda: hf_peft.BeftConfig(target_modules=["q_proj", "o_proj", "up_proj"]), True),
        "prefix": ("llama", lambda: hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), True),
    }
    cache = {}

    def get(name):
        if name not in cache:
            kind, config, safe = configs[name]
            cache[name] = save_with_peft(base(kind)[0], kind, config(), root / name, safe=safe)
        return cache[name]

    return get


def hf_class(kind):
    return transformers.LlamaForCausalLM if kind == "llama" else transformers.GPT2LMHeadModel


def save_with_peft(base_folder, kind, config, out, *, safe=True):
    """Saves a peft adapter; returns ``(folder, peft's logits)`` after checking the adapter changes the logits."""
    model = hf_class(kind).from_pretrained(base_folder).eval()
    with torch.no_grad():
        base_logits = model(torch.tensor(IDS)).logits.numpy()
    model = hf_peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: every adapter weight away from its identity init
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out, safe_serialization=safe)
    with torch.no_grad():
        adapted = model.eval()(torch.tensor(IDS)).logits.numpy()
    assert np.abs(adapted - base_logits).max() > 100 * TOL  # parity below is not vacuous
    return out, adapted


def peft_logits(base_folder, kind, adapter):
    model = hf_peft.PeftModel.from_pretrained(hf_class(kind).from_pretrained(base_folder), adapter).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def logits(model):
    return np.asarray(forward(model, jnp.asarray(IDS)))


def snapshot(model):
    return [p for p, _ in iter_modules(model)], [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def assert_unchanged(model, before):
    paths, leaves = snapshot(model)
    assert paths == before[0] and not any(isinstance(m, PeftModule) for _, m in iter_modules(model))
    assert all(np.array_equal(a, b) for a, b in zip(leaves, before[1], strict=True))


def abstractly(apply, model, config):
    """``apply(model, config)`` on a copy, with shapes only (no random init, nothing compiled)."""
    return nnx.eval_shape(lambda: apply(nnx.clone(model), config, rngs=nnx.Rngs(0)))


def assert_export_is_inverse(model, adapter, out):
    """export_hf_peft(load_hf_peft(x)) writes the tensors of x."""
    exported = load_file(peft.export_hf_peft(model, out) / "adapter_model.safetensors")
    original = load_file(adapter / "adapter_model.safetensors") if (adapter / "adapter_model.safetensors").exists() \
        else {k: v.numpy() for k, v in torch.load(adapter / "adapter_model.bin").items()}
    assert sorted(exported) == sorted(original)
    for key in original:
        np.testing.assert_allclose(exported[key], original[key], rtol=1e-6, atol=1e-6, err_msg=key)


# ----------------------------------------------------------------------------- parity with peft


def test_dora_rslora_patterns_saved_by_peft_match_logits(base, saved, tmp_path):
    """DoRA + rsLoRA + rank_pattern/alpha_pattern + dropout (off in eval): peft's logits to 1e-4."""
    adapter, theirs = saved("dora")
    _, model = base("llama")
    peft.load_hf_peft(model, adapter).eval()
    wrappers = {path_str(p): m for p, m in iter_modules(model) if isinstance(m, peft.LoRALinear)}
    assert len(wrappers) == 6 and wrappers["model.layers.0.mlp.down_proj"].rank == 2
    assert wrappers["model.layers.1.self_attn.v_proj"].alpha == 3 and wrappers["model.layers.0.self_attn.q_proj"].use_dora
    np.testing.assert_allclose(logits(model), theirs, rtol=TOL, atol=TOL)
    assert_export_is_inverse(model, adapter, tmp_path / "back")


def test_gpt2_conv1d_lora_pickle_needs_opt_in(base, saved, tmp_path):
    """GPT-2 Conv1D (fan_in_fan_out) saved as adapter_model.bin: refused, then loaded with allow_pickle."""
    adapter, theirs = saved("gpt2-lora-bin")
    _, model = base("gpt2")
    before = snapshot(model)
    with pytest.raises(ValueError, match="allow_pickle"):
        peft.load_hf_peft(model, adapter)
    assert_unchanged(model, before)
    peft.load_hf_peft(model, adapter, allow_pickle=True)
    np.testing.assert_allclose(logits(model), theirs, rtol=TOL, atol=TOL)
    assert_export_is_inverse(model, adapter, tmp_path / "back")


def test_ia3_saved_by_peft_matches_logits(base, saved, tmp_path):
    adapter, theirs = saved("ia3")
    _, model = base("llama")
    peft.load_hf_peft(model, adapter)
    feedforward = {path_str(p): m.feedforward for p, m in iter_modules(model) if isinstance(m, peft.IA3Linear)}
    assert feedforward["model.layers.1.mlp.down_proj"] and not feedforward["model.layers.1.self_attn.k_proj"]
    np.testing.assert_allclose(logits(model), theirs, rtol=TOL, atol=TOL)
    assert_export_is_inverse(model, adapter, tmp_path / "back")


def test_bitfit_as_peft_beft_both_ways(base, saved, tmp_path):
    """peft's BEFT (BitFit on Linear layers, incl. bias-less Llama projections) in and out."""
    adapter, theirs = saved("beft")
    folder, model = base("llama")
    peft.load_hf_peft(model, adapter)
    ours = logits(model)
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)
    assert_export_is_inverse(model, adapter, tmp_path / "back")
    np.testing.assert_allclose(peft_logits(folder, "llama", tmp_path / "back"), ours, rtol=TOL, atol=TOL)


def test_prefix_tuning_both_ways(base, saved, tmp_path):
    """peft's PREFIX_TUNING: keys rotated by -P on load (+P on export) make RoPE positions agree exactly."""
    adapter, theirs = saved("prefix")
    folder, model = base("llama")
    peft.load_hf_peft(model, adapter)
    ours = logits(model)
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=TOL)
    assert_export_is_inverse(model, adapter, tmp_path / "back")
    np.testing.assert_allclose(peft_logits(folder, "llama", tmp_path / "back"), ours, rtol=TOL, atol=TOL)


# ----------------------------------------------------------------------------- bad input


def other_llama(model, **changes):
    """A metafit Llama like ``model`` but with ``changes`` to its config (random weights, no compiles)."""
    config = dataclasses.replace(model.config, **changes)
    return random_model(lambda rngs: type(model)(config, rngs=rngs))


@pytest.mark.parametrize("changes,message", [
    ({"intermediate_size": 32}, r"model.layers.0.mlp.down_proj: lora_A.weight has shape \(2, 24\), but this "
                                r"model's Linear \[in=32, out=16\] needs \(2, 32\)"),
    ({"num_hidden_layers": 1}, r"no Linear-like module 'model.layers.1.self_attn.q_proj'"),
    ({"num_hidden_layers": 3}, r"selects 3 module\(s\) of this model that the adapter holds no weights for: "
                               r"model.layers.2.mlp.down_proj"),
], ids=["shapes", "fewer-layers", "more-layers"])
def test_adapter_for_another_base_model_names_module_and_shapes(base, saved, changes, message):
    adapter, _ = saved("dora")
    model = other_llama(base("llama")[1], **changes)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as err:
        peft.load_hf_peft(model, adapter)
    assert "unchanged" in str(err.value)
    assert_unchanged(model, before)


def test_prefix_for_another_base_model(base, saved):
    adapter, _ = saved("prefix")
    model = other_llama(base("llama")[1], num_hidden_layers=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"num_layers=2 in the adapter, but this model has 3"):
        peft.load_hf_peft(model, adapter)
    assert_unchanged(model, before)


@pytest.mark.parametrize("edit,message", [
    ({"lora_alpah": 3}, r"unknown LORA field 'lora_alpah'.* did you mean 'lora_alpha'"),
    ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\] cannot be honoured"),
    ({"layers_to_transform": [0]}, r"layers_to_transform=\[0\] cannot be honoured"),
    ({"bias": "all"}, r"bias='all' cannot be honoured"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa'.*path_initial_model_for_weight_conversion"),
    ({"peft_type": "ADALORA"}, r"peft_type 'ADALORA' is not one metafit reads"),
])
def test_peft_fields_metafit_cannot_honour_are_errors(base, saved, tmp_path, edit, message):
    adapter, _ = saved("dora")
    shutil.copytree(adapter, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    _, model = base("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        peft.load_hf_peft(model, tmp_path / "a")
    assert_unchanged(model, before)


def test_missing_files(base, saved, tmp_path):
    _, model = base("llama")
    with pytest.raises(FileNotFoundError, match="no adapter folder"):
        peft.load_hf_peft(model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        peft.load_hf_peft(model, tmp_path / "empty")
    adapter, _ = saved("dora")
    (tmp_path / "config-only").mkdir()
    shutil.copy(adapter / "adapter_config.json", tmp_path / "config-only")
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        peft.load_hf_peft(model, tmp_path / "config-only")
    assert not any(isinstance(m, PeftModule) for _, m in iter_modules(model))


# ----------------------------------------------------------------------------- from_hf


def test_lora_config_from_hf_accepts_peft_fields_and_objects(tmp_path):
    fields = dict(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], use_dora=True,
                  use_rslora=True, exclude_modules=["lm_head"])
    expected = peft.LoraConfig(rank=4, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"), exclude=("lm_head",),
                               use_dora=True, use_rslora=True)
    assert peft.LoraConfig.from_hf(**fields) == expected
    assert peft.LoraConfig.from_hf(hf_peft.LoraConfig(**fields)) == expected  # a peft object (to_dict)
    hf_peft.LoraConfig(**fields).save_pretrained(tmp_path)                     # a folder
    assert peft.LoraConfig.from_hf(tmp_path) == expected
    assert peft.LoraConfig.from_hf(target_modules="q_proj|v_proj") == peft.LoraConfig(
        rank=8, alpha=8.0, targets=("re:q_proj|v_proj",))  # peft's defaults r=8, lora_alpha=8; a regex
    assert peft.IA3Config.from_hf(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]) == \
        peft.IA3Config(targets=("down_proj", "k_proj"), feedforward=("re:.*down_proj",))
    assert peft.BitFitConfig.from_hf(target_modules=["q_proj"]) == peft.BitFitConfig(
        targets=("q_proj",), target_types=("Linear",), add_missing_bias=True)
    assert peft.PrefixConfig.from_hf(num_virtual_tokens=5, task_type="CAUSAL_LM").num_prefix == 5


@pytest.mark.parametrize("target_modules", [["q_proj", "down_proj"], "all-linear", r".*layers\.1\..*_proj"])
def test_from_hf_selects_the_modules_peft_selects(base, target_modules):
    folder, model = base("llama")
    theirs = hf_peft.get_peft_model(hf_class("llama").from_pretrained(folder),
                                    hf_peft.LoraConfig(r=2, target_modules=target_modules))
    theirs = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    config = peft.LoraConfig.from_hf(r=2, target_modules=target_modules)
    model = abstractly(peft.apply, model, config)
    assert {path_str(p) for p, m in iter_modules(model) if isinstance(m, peft.LoRALinear)} == theirs


@pytest.mark.parametrize("fields,message", [
    ({"lora_alpah": 3}, r"unknown LORA field 'lora_alpah'.*did you mean 'lora_alpha'"),
    ({"modules_to_save": ["score"]}, r"modules_to_save=\['score'\] cannot be honoured"),
    ({"layers_to_transform": [0, 1]}, r"layers_to_transform=\[0, 1\] cannot be honoured"),
    ({"bias": "lora_only"}, r"bias='lora_only' cannot be honoured"),
    ({"rank_pattern": {"q_proj": 2}}, r"rank_pattern/alpha_pattern cannot be honoured by one metafit LoraConfig"),
    ({"init_lora_weights": "olora"}, r"init_lora_weights='olora' cannot be honoured"),
    ({"eva_config": {"rho": 2.0}}, r"eva_config=.* cannot be honoured"),
    ({"r": "8"}, r"peft field r='8': expected int"),
    ({"peft_type": "IA3"}, r"peft_type is IA3, not LORA: use metafit.peft.IA3Config.from_hf"),
])
def test_lora_config_from_hf_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        peft.LoraConfig.from_hf({"target_modules": ["q_proj"], **fields})
    with pytest.raises(ValueError, match="target_modules is missing"):
        peft.LoraConfig.from_hf(r=4)


# ----------------------------------------------------------------------------- what has no peft format


def test_export_says_what_has_no_peft_format(base, tmp_path):
    for model, config, message in [
        (make_model(), peft.AdapterConfig(bottleneck=2), "BottleneckAdapter has no peft format: peft has no bottleneck"),
        (make_model(), peft.BitFitConfig(target_types=("LayerNorm",)), "BitFit on LayerNorm has no peft format"),
        (base("gpt2")[1], peft.PrefixConfig(num_prefix=2), "GPT2LMHeadModel has no rotary position embedding"),
    ]:
        with pytest.raises(ValueError, match=message):
            peft.export_hf_peft(abstractly(peft.apply, model, config), tmp_path / "adapter")
        assert not (tmp_path / "adapter").exists()
