"""LoRA SFT end to end on a tiny random Llama: trains, exact-match pipeline runs, adapter exported, base untouched."""
import json

import numpy as np
import pytest

from metafit.data.instructions import encode_sft, make_instructions
from tiny_lm import shared_tiny_llama


@pytest.fixture(scope="module")
def tiny_model():
    return shared_tiny_llama()


def test_instructions_are_deterministic_and_masks_cover_responses_only(tiny_model):
    from transformers import AutoTokenizer

    a, b = make_instructions(12, seed=3), make_instructions(12, seed=3)
    assert a == b and {ex.task for ex in a} == {"add", "reverse", "upper", "count", "successor", "sort"}
    assert make_instructions(2, seed=3, offset=10) == a[10:12]
    add = next(ex for ex in a if ex.task == "add")
    x, y = [int(t) for t in add.prompt.split(".")[0].replace("Add ", "").split(" and ")]
    assert add.response == str(x + y)

    tok = AutoTokenizer.from_pretrained(tiny_model)
    enc = encode_sft(tok, a[:4], buckets=(16, 128))
    assert enc["input_ids"].shape == (4, 128)
    for row in range(4):
        targets = enc["input_ids"][row, 1:][enc["loss_mask"][row, :-1] == 1]
        assert tok.decode(targets) == a[row].response + tok.eos_token
    with pytest.raises(ValueError, match="more than the largest bucket"):
        encode_sft(tok, a[:1], buckets=(8,))


# One set of shape and optimiser settings for both runs below (one bucket, the same LoRA targets, steps and
# schedule), so the second run reuses the first one's compiled train step, evaluation and generation.
SFT_OVERRIDES = ["train.steps=16", "train.eval_every=8", "train.ckpt_every=8", "train.batch_size=8",
                 "args.n_eval=8", "train.lr=3e-2", "args.buckets=[128]",
                 "args.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]


def sft_run(repo, tiny_model, workdir, *overrides):
    from conftest import run_cli  # in process: `metafit run` has its subprocess test in tests/test_cli.py

    sets = [arg for o in [f"args.model={tiny_model}", *SFT_OVERRIDES, *overrides] for arg in ("--set", o)]
    return run_cli("run", str(repo / "configs/finetune/lora_smollm2.yaml"), "--workdir", str(workdir), *sets)


def test_lora_sft_experiment_on_tiny_llama(tiny_model, tmp_path, repo):
    out = sft_run(repo, tiny_model, tmp_path / "run", "args.n_train=64")
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())["methods"]
    assert results["lora_sft"]["eval_loss"] < results["base"]["eval_loss"] - 0.5  # random model learns the format
    assert results["lora_sft"]["exact_match"] * 8 == round(results["lora_sft"]["exact_match"] * 8)  # k of n_eval = 8
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and "model.layers.1.mlp.down_proj" in config["target_modules"]
    from safetensors.numpy import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and np.abs(v).max() > 0 for k, v in tensors.items())


def test_lora_sft_on_your_own_jsonl(tiny_model, tmp_path, repo):
    """``args.data=my.jsonl``: chat and prompt/response rows train; a bad file fails before the run folder exists."""
    data = tmp_path / "my.jsonl"
    rows = [{"prompt": ex.prompt, "response": ex.response} for ex in make_instructions(20, seed=1, tasks=["upper"])]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = sft_run(repo, tiny_model, tmp_path / "run", f"args.data={data}", "args.export_adapter=false")
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())["methods"]
    assert results["lora_sft"]["eval_loss"] < results["base"]["eval_loss"]
    assert results["lora_sft"]["exact_match"] * 8 == round(results["lora_sft"]["exact_match"] * 8)  # k of n_eval = 8
    assert not (tmp_path / "run" / "adapter").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + '{"prompt": "x"\n')
    out = sft_run(repo, tiny_model, tmp_path / "bad_run", f"args.data={bad}")
    assert out.returncode != 0 and "line 2 is not valid JSON" in out.stderr
    assert not (tmp_path / "bad_run").exists()


def test_exact_match_scores_greedy_answers_that_transformers_also_generates(tiny_model):
    """Greedy answers equal transformers' greedy ``generate`` on the same checkpoint, and exact match is
    the share of examples whose response equals that answer (2 of 4 here by construction)."""
    import torch
    from transformers import AutoModelForCausalLM

    from metafit import models
    from metafit.data.instructions import Instruction, chat_prompt
    from metafit.train.lm_eval import exact_match, greedy_answers

    model, tok = models.load(tiny_model)
    prompts = [ex.prompt for ex in make_instructions(4, seed=5)]
    answers = greedy_answers(model, tok, prompts, max_new_tokens=6, bucket=32)
    assert all(answers), answers  # a random model rambles until max_new_tokens: non-empty answers to compare

    reference = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for prompt, answer in zip(prompts, answers):
        ids = tok(chat_prompt(tok, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = reference.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == answer

    examples = [Instruction(task="t", prompt=p, response=a if i % 2 == 0 else a + "x")
                for i, (p, a) in enumerate(zip(prompts, answers))]
    assert exact_match(model, tok, examples, max_new_tokens=6, bucket=32) == 0.5
