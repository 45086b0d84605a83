"""HF PEFT export: the `peft` PyTorch library loads metafit's adapters and gives the same logits."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metafit.peft as peft

from peft_tiny import forward, perturb_adapters

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # tiny reference forwards; more threads only spin-wait (see models_tiny.py)
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft", reason="pip install --no-deps peft==0.21.2 accelerate==1.15.0")

IDS = np.array([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]])


def tiny_hf_folder(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=4, n_positions=32)
        model = transformers.GPT2LMHeadModel(config)
    folder = tmp_path / f"base-{kind}"
    model.save_pretrained(folder)
    return folder


def torch_logits_with_adapter(base_folder, adapter_folder, kind):
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.GPT2LMHeadModel
    base = cls.from_pretrained(base_folder)
    model = hf_peft.PeftModel.from_pretrained(base, adapter_folder).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("kind,config", [
    ("llama", peft.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))),
    ("llama", peft.LoraConfig(rank=2, alpha=4.0, targets=("k_proj", "o_proj"), use_dora=True, use_rslora=True)),
    ("llama", peft.IA3Config()),
    ("gpt2", peft.LoraConfig(rank=2, alpha=2.0, targets=("c_attn", "mlp.c_proj"))),
], ids=["llama-lora", "llama-dora-rslora", "llama-ia3", "gpt2-lora-conv1d"])
def test_export_loads_in_hf_peft_with_matching_logits(tmp_path, kind, config):
    from metafit.models import load

    base_folder = tiny_hf_folder(tmp_path, kind)
    model, _ = load(base_folder, tokenizer=False)
    peft.apply(model, config, rngs=nnx.Rngs(0))
    perturb_adapters(model, scale=0.5)
    ours = np.asarray(forward(model, jnp.asarray(IDS)))

    out = peft.export_hf_peft(model, tmp_path / "adapter", base_model_name_or_path=str(base_folder))
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_folder)
    theirs = torch_logits_with_adapter(base_folder, out, kind)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    if kind == "gpt2":
        assert adapter_config["fan_in_fan_out"] is True


def test_export_key_names_and_layouts(tmp_path):
    from safetensors.numpy import load_file

    from metafit.models import load

    model, _ = load(tiny_hf_folder(tmp_path, "llama"), tokenizer=False)
    peft.apply(model, peft.LoraConfig(rank=3, targets=("layers.0.self_attn.q_proj",)), rngs=nnx.Rngs(0))
    out = peft.export_hf_peft(model, tmp_path / "a", base_model_name_or_path="x")
    tensors = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert set(tensors) == {f"{key}.lora_A.weight", f"{key}.lora_B.weight"}
    assert tensors[f"{key}.lora_A.weight"].shape == (3, 16) and tensors[f"{key}.lora_B.weight"].shape == (16, 3)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["target_modules"] == [key[len("base_model.model."):]]


def test_export_refuses_gates_and_unsupported_methods(tmp_path):
    from peft_tiny import make_model

    model = make_model()
    peft.apply(model, peft.LoraConfig(rank=2), rngs=nnx.Rngs(0))
    peft.set_gates(model, 0.5)
    with pytest.raises(ValueError, match="reset_gates"):
        peft.export_hf_peft(model, tmp_path / "g")
    peft.reset_gates(model)
    peft.apply(model, peft.AdapterConfig(bottleneck=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="BottleneckAdapter"):
        peft.export_hf_peft(model, tmp_path / "h")


def test_merged_lora_saves_as_a_plain_hf_model(tmp_path):
    """merge_lora then metafit.models.save: transformers loads the merged weights with our logits."""
    from metafit.models import load, save

    base_folder = tiny_hf_folder(tmp_path, "llama")
    model, _ = load(base_folder, tokenizer=False)
    peft.apply(model, peft.LoraConfig(rank=2, targets=("q_proj", "up_proj"), init="random"), rngs=nnx.Rngs(0))
    perturb_adapters(model)
    ours = np.asarray(forward(peft.merge_lora(model), jnp.asarray(IDS)))
    save(model, tmp_path / "merged")
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        np.testing.assert_allclose(ours, merged(torch.tensor(IDS)).logits.numpy(), rtol=1e-4, atol=1e-4)
