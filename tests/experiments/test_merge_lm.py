"""merge_lm end to end on a tiny random Llama: experts, recipe merges, language ATM, resume."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from tiny_lm import shared_tiny_llama

# A constant learning rate: the experts' 8-step runs and the ATM rounds' 4-step runs then share one
# compiled step (a decaying schedule's length is part of the step).
OVERRIDES = ["train.steps=8", "train.log_every=4", "train.ckpt_every=4", "train.lr=3e-2", "train.schedule=constant",
             "train.warmup_steps=0", "args.n_train=32",
             "args.n_eval=4", "args.tasks=[upper,add]", "args.atm_rounds=2", "args.buckets=[96,128]",
             "args.max_new_tokens=4",
             "args.n_val=4", "args.merges=[{name: average, method: linear, parameters: {normalize: true}},"
             " {name: ta, method: task_arithmetic, parameters: {weight: 0.5}, scales: [0.5, 1.0]}]"]


@pytest.fixture(scope="module")
def tiny_model():
    return shared_tiny_llama()


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_merge_lm_experts_recipes_atm_and_resume(tiny_model, tmp_path, repo):
    from metafit.experiments import run_experiment
    from metafit.merge.recipe import load_recipe

    config = repo / "configs/merge/lm_smollm2.yaml"
    overrides = [f"args.model={tiny_model}", *OVERRIDES]
    run, results = run_experiment(config, overrides, workdir=tmp_path / "run")
    rows = results["methods"]
    for task in ("upper", "add"):  # each expert learned its own task's answers
        assert rows[f"expert {task}"][f"{task}_loss"] < rows["base"][f"{task}_loss"] - 0.5
    assert {"merge average", "merge ta", "ATM (2 rounds x 4 steps)"} <= set(rows)

    # The average merge is θ_base + mean_t (θ_t − θ_base) tensor by tensor, as the recipe says.
    base, up, add = (_weights(run.path / "models" / name) for name in ("base", "upper", "add"))
    merged = _weights(run.path / "merged" / "average")
    changed = [name for name in base if not np.array_equal(base[name], up[name])]
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed)  # LoRA on q, v only
    for name in base:
        np.testing.assert_allclose(merged[name], (up[name] + add[name]) / 2, atol=1e-6)
    # weight_change = mean over the LoRA-target tensors of ‖θ − θ_base‖ / ‖θ_base‖, recomputed in numpy.
    targets = [name for name in base if "q_proj" in name or "v_proj" in name]
    for row, weights in (("expert upper", up), ("merge average", merged)):
        expected = np.mean([np.linalg.norm(weights[n] - base[n]) / np.linalg.norm(base[n]) for n in targets])
        np.testing.assert_allclose(results["weight_change"][row], expected, rtol=1e-4)
    # the round curve ends at the ATM row
    assert len(results["atm_rounds"]) == 2 and results["atm_rounds"][-1] == rows["ATM (2 rounds x 4 steps)"]
    assert set(results["weight_change"]) == {"expert upper", "expert add", "merge average", "merge ta", "ATM"}
    # The task-arithmetic merge's scale was chosen on validation among [0.5, 1.0]; the recipe file holds the
    # chosen value and produced merged/ta exactly; the two candidates' validation scores are logged.
    recipe = load_recipe(run.path / "recipes" / "ta.yaml")
    chosen = rows["merge ta"]["scale"]
    assert chosen in (0.5, 1.0) and recipe.method == "task_arithmetic"
    assert recipe.parameters == {"weight": 0.5, "scale": chosen}
    ta = _weights(run.path / "merged" / "ta")
    for name in base:  # θ_base + scale · Σ_t w_t (θ_t − θ_base) with w_t = 0.5
        np.testing.assert_allclose(ta[name], base[name] + chosen * 0.5 * ((up[name] - base[name]) + (add[name] - base[name])),
                                   atol=1e-6)
    from metafit.merge.recipe import run_recipe

    run_recipe(run.path / "recipes" / "ta.yaml", tmp_path / "ta_again", progress=False)
    assert (tmp_path / "ta_again" / "model.safetensors").read_bytes() == \
        (run.path / "merged" / "ta" / "model.safetensors").read_bytes()
    tuning = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()
              if '"tune_ta"' in line]
    assert [t["scale"] for t in tuning] == [0.5, 1.0]
    best = max(tuning, key=lambda t: (t["mean_em"], -t["mean_loss"]))
    assert best["scale"] == chosen and rows["merge ta"]["val_mean_em"] == best["mean_em"]
    assert not (run.path / "merged" / "ta.candidate").exists()

    # transformers loads a merged folder and agrees with metafit's scores' model.
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(run.path / "merged" / "ta")
    np.testing.assert_allclose(hf.model.layers[0].self_attn.q_proj.weight.detach().numpy(),
                               ta["model.layers.0.self_attn.q_proj.weight"], atol=1e-7)
    assert torch.isfinite(hf(torch.tensor([[1, 2, 3]])).logits).all()

    # A rerun of the same folder trains nothing again (experts saved, ATM rounds checkpointed) and agrees.
    # The ATM rounds' scores are callback records read back from metrics.jsonl; with their lines gone
    # (a run folder of an older version) the restored rounds are scored again, to the same numbers.
    metrics = (run.path / "metrics.jsonl").read_text().count('"split": "train"')
    atm_before = _weights(run.path / "merged" / "atm")
    lines = (run.path / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert sum('"stage": "atm", "split": "score"' in line for line in lines) == 2
    (run.path / "metrics.jsonl").write_text("".join(l for l in lines if '"stage": "atm"' not in l))
    _, again = run_experiment(config, overrides, workdir=tmp_path / "run")
    assert (run.path / "metrics.jsonl").read_text().count('"split": "train"') == metrics
    for name, value in _weights(run.path / "merged" / "atm").items():
        np.testing.assert_array_equal(value, atm_before[name])
    assert again["methods"]["ATM (2 rounds x 4 steps)"] == rows["ATM (2 rounds x 4 steps)"]
    logged = (run.path / "metrics.jsonl").read_text()
    assert logged.count('"tune_ta"') == 2 and logged.count('"stage": "atm"') == 2  # not duplicated by the rerun


def test_merge_lm_rejects_bad_args_before_compute(tmp_path, repo):
    from metafit.experiments import run_experiment

    config = repo / "configs/merge/lm_smollm2.yaml"
    with pytest.raises(ValueError, match="divide train.steps"):
        run_experiment(config, ["args.model=/nonexistent", "train.steps=10", "args.atm_rounds=3"],
                       workdir=tmp_path / "a")
    with pytest.raises(ValueError, match="at least two tasks"):
        run_experiment(config, ["args.model=/nonexistent", "args.tasks=[upper]"], workdir=tmp_path / "b")
    with pytest.raises(ValueError, match=r"args.merges\[0\] \(x\): .*unknown parameter 'densty'.*did you mean"):
        run_experiment(config, ["args.model=/nonexistent", "args.merges=[{name: x, method: ties, parameters: {densty: 0.2}}]"],
                       workdir=tmp_path / "c")
    with pytest.raises(ValueError, match=r"args.merges\[0\] \(x\): .*tiess"):
        run_experiment(config, ["args.model=/nonexistent", "args.merges=[{name: x, method: tiess}]"],
                       workdir=tmp_path / "d")
    with pytest.raises(ValueError, match="not both"):
        run_experiment(config, ["args.model=/nonexistent",
                                "args.merges=[{name: x, method: ties, parameters: {scale: 1.0}, scales: [0.5]}]"],
                       workdir=tmp_path / "e")
