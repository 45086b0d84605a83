"""The matmul list of benchmarks/lora_roofline.py against closed-form FLOP counts of a Llama step."""
import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


roofline = _load("lora_roofline")
CFG = dict(layers=3, seq=16, hidden=24, mlp=40, heads=3, kv_heads=1, head_dim=8, vocab=50)
BATCH, RANK = 2, 4
TOKENS = BATCH * CFG["seq"]


def total_flops(products):
    return sum(roofline.flops(p) * n for p, n in products.items())


def test_scoring_matches_models_forward_count():
    from metafit.models import LlamaConfig

    forward = _load("models_forward")
    cfg = LlamaConfig(vocab_size=CFG["vocab"], hidden_size=CFG["hidden"], intermediate_size=CFG["mlp"],
                      num_hidden_layers=CFG["layers"], num_attention_heads=CFG["heads"],
                      num_key_value_heads=CFG["kv_heads"], head_dim=CFG["head_dim"])
    products = roofline.step_products(CFG, TOKENS, [], RANK, forward_only=True)
    assert total_flops(products) == forward.forward_flops_per_token(cfg, CFG["seq"]) * TOKENS


@pytest.mark.parametrize("targets", [[], ["q_proj", "v_proj"], roofline.ALL_LINEAR.split(",")])
def test_training_step_closed_form(targets):
    h, f, d, L, T = CFG["hidden"], CFG["mlp"], CFG["head_dim"], CFG["layers"], TOKENS
    shapes = {"q_proj": (h, 3 * d), "k_proj": (h, d), "v_proj": (h, d), "o_proj": (3 * d, h),
              "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}
    layer_params = sum(i * o for i, o in shapes.values())
    first_layer_qkv = sum(i * o for name, (i, o) in shapes.items() if name in ("q_proj", "k_proj", "v_proj"))
    # frozen base: forward 2·T·P and input gradients 2·T·P, except layer 0's q/k/v (the embedding is frozen)
    base = 4 * T * layer_params * L - 2 * T * first_layer_qkv
    head = 4 * T * h * CFG["vocab"]                               # tied LM head, forward and dL/dh
    attention = 3 * 4 * BATCH * CFG["heads"] * CFG["seq"] ** 2 * d * L   # forward 4·B·H·S²·d, backward twice that
    # each adapter: x A [i] and (x A) B [o] forward; dB [o], d(x A) [o], dA [i] backward; dx through A [i]
    # unless layer 0's q/k/v
    adapters = sum(2 * T * RANK * (2 * i + 3 * o) * L + 2 * T * RANK * i * (L - (name in ("q_proj", "k_proj", "v_proj")))
                   for name, (i, o) in shapes.items() if name in targets)
    products = roofline.step_products(CFG, TOKENS, targets, RANK)
    assert total_flops(products) == base + head + attention + adapters
