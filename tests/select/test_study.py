"""The DELIFT study end to end on tiny models: arms select, train, answer and are scored, files written."""
import json

from metafit import peft
from metafit.select import metrics, study
from metafit.train import TrainConfig
from tiny_select import tiny, tiny_encoder  # noqa: F401  (a module-scoped fixture)


ARMS = ("initial", "random", "delift", "full")  # no training, a plain subset, FLCG on the kernels, all


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_arms_continual_writes_each_arms_subset_and_answers_and_scores_them(tiny, tmp_path):
    model, tokenizer = tiny
    encoder, encoder_tokenizer = tiny_encoder()
    sets = study.use_case_sets("continual", n_pool=6, n_side=2, n_eval=4, seed=0)
    results = study.run_arms(model, tokenizer, encoder, encoder_tokenizer, sets, "continual", arms=ARMS,
                             budget_fraction=0.5, lora=peft.LoraConfig(rank=2), seed=0, folder=tmp_path,
                             train_config=TrainConfig(steps=1, batch_size=4, log_every=1), block=8,
                             buckets=(128,), max_new_tokens=2, less_dim=8)
    assert list(results) == list(ARMS)
    budget = 3  # 50 % of 6
    for arm, scores in results.items():
        chosen = {"initial": 0, "full": 6}.get(arm, budget)
        assert scores["selected"] == chosen and len(_lines(tmp_path / f"selected_{arm}.jsonl")) == chosen
        assert scores["train_size"] == 2 + chosen  # the existing set is in every arm's training data
        answered = _lines(tmp_path / f"answers_{arm}.jsonl")
        assert [(a["instruction"], a["response"], a["task"]) for a in answered] == [
            (p.prompt, p.response, p.task) for p in sets.eval]
        answers, references = [a["answer"] for a in answered], [p.response for p in sets.eval]
        assert scores["exact_match"] == metrics.exact_match_rate(answers, references)
        assert scores["rouge_l"] == metrics.rouge_l(answers, references)
        per_family = {k: v for k, v in scores.items() if k.endswith("_em")}
        assert len(per_family) == len({p.task for p in sets.eval}) > 1
        assert per_family == study.exact_match_by_family(sets.eval, answers)
    # both kernels' tiles are kept for a rerun to resume (pool x pool, pool x existing set)
    assert sorted(p.name for p in (tmp_path / "utility").iterdir()) == ["pool", "side"]
