"""The data pipeline's stages and the stages' datasets: dedup, balancing, selection, KTO/DPO rows, bad input."""
import numpy as np
import pytest

from metafit.posttrain import stages
from metafit.posttrain.data import CATEGORIES, REFUSAL, Example, is_correct, is_safe, make_pool
from metafit.posttrain.pipeline import PipelineConfig, deduplicate, drop_rare_and_balance, select


def normalised(prompt):
    return "".join(ch for ch in prompt.lower() if ch.isalnum())


def test_dedup_removes_the_injected_near_duplicates():
    pool = make_pool(40, seed=3, duplicate_fraction=0.25)
    assert len(pool) == 50
    kept, stats = deduplicate(pool, max_distance=0)
    # distance 0 = same normalised text (simhash drops case, spacing and punctuation before hashing)
    assert stats["kept"] == len({normalised(ex.prompt) for ex in pool}) == len(kept)
    assert stats["removed"] >= 10


def test_dedup_errors_on_empty_and_all_duplicate_data():
    with pytest.raises(ValueError, match="empty"):
        deduplicate([])
    one = Example("math", "What is 2 plus 2? Reply with the number only.", "4", "4")
    copies = [one, Example("math", " what is 2  plus 2! Reply with the number only ", "4", "5")]
    with pytest.raises(ValueError, match="near-duplicates"):
        deduplicate(copies)


def test_rare_labels_are_dropped_and_the_rest_balanced():
    examples = make_pool(13, seed=0, duplicate_fraction=0.0)
    labels = ["a"] * 6 + ["b"] * 4 + ["c"] * 3
    kept, kept_labels, counts = drop_rare_and_balance(examples, labels, min_label_count=4, seed=0)
    assert counts == {"a": 6, "b": 4, "c": 3}
    assert sorted(kept_labels) == ["a"] * 4 + ["b"] * 4
    with pytest.raises(ValueError, match="balancing would leave nothing"):
        drop_rare_and_balance(examples, labels, min_label_count=7, seed=0)


def test_checkers_and_safety_filter():
    unsafe = Example("unsafe", "Tell me how to steal a car without keys.", REFUSAL, "")
    assert is_correct(unsafe, REFUSAL) and is_safe(unsafe.prompt, REFUSAL)
    assert not is_safe(unsafe.prompt, "Sure, here is how: first, steal a car.")
    assert not is_correct(unsafe, "Cars are fun.") and not is_safe(unsafe.prompt, "Cars are fun.")
    math = Example("math", "What is 3 plus 4? Reply with the number only.", "7", "7")
    assert is_correct(math, " 7 ") and not is_correct(math, "3 + 4 = 7") and is_safe(math.prompt, "7")


def _scores(**values):
    return {s: {"response": r, "correct": c, "safe": True, "perplexity": p} for s, (r, c, p) in values.items()}


def test_select_ranks_by_correctness_then_safety_then_perplexity():
    scored = _scores(original=("7", True, 3.0), teacher=("seven", False, 2.0), student=("8", False, 9.0))
    assert select(scored) == ("original", "student")
    tie = _scores(original=("7", True, 3.0), teacher=("7", True, 2.0), student=("7", True, 9.0))
    assert select(tie) == ("teacher", None)  # nothing worse: no undesirable example


def _records():
    records = []
    for i, ex in enumerate(make_pool(10, seed=1, duplicate_fraction=0.0)):
        worst = "student" if i % 2 else None
        records.append({"category": ex.category, "label": ex.category, "prompt": ex.prompt, "answer": ex.answer,
                        "best": "original", "worst": worst,
                        "scores": {"original": {"response": ex.answer}, "student": {"response": "no"}}})
    return records


def test_kto_rows_and_a_derangement_for_the_kl_pairs():
    records = _records()
    rows, desirable = stages.kto_rows(records)
    assert len(rows) == 15 and desirable.sum() == 10
    assert [r.response for r in rows[10:]] == ["no"] * 5
    pairs = stages.mismatched(rows, seed=0)
    responses = [r.response for r in rows]
    partners = [responses.index(p.response) if p.response != "no" else None for p in pairs]
    assert all(p.prompt == r.prompt for p, r in zip(pairs, rows))
    assert all(j != i for i, j in enumerate(partners) if j is not None and j < 10)
    assert sorted(p.response for p in pairs) == sorted(responses)  # a permutation of the responses


def test_preference_data_without_undesirable_examples_is_an_error():
    records = [dict(r, worst=None) for r in _records()]
    for method in ("kto", "dpo"):
        with pytest.raises(ValueError, match="undesirable"):
            stages.check_preference_data(method, records)
    stages.check_preference_data("sft", records)


def test_eval_sets_skip_training_prompts():
    records = _records()
    sets = stages.eval_sets(stages.EvalArgs(n_eval=6, seed=1), records)
    assert sorted(sets) == sorted(CATEGORIES.names())
    seen = {r["prompt"] for r in records}
    assert all(len(v) == 6 and not seen & {ex.prompt for ex in v} for v in sets.values())


def test_bad_pipeline_settings_are_errors():
    with pytest.raises(ValueError, match="n_pool"):
        PipelineConfig(n_pool=0)
    with pytest.raises(ValueError, match="category_names"):
        PipelineConfig(category_names=(("maths", "math"),))
    with pytest.raises(ValueError, match="beta"):
        stages.check_stage(stages.StageArgs(beta=0.0))
