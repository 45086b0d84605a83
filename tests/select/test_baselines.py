"""Selection baselines, metrics and the JSONL pair files, against hand-computed values."""
import json

import jax
import numpy as np
import pytest

from metafit.data.instructions import Instruction
from metafit.select import baselines, metrics, study
from tiny_select import tiny  # noqa: F401  (a module-scoped fixture)


def test_metrics_against_hand_computed_values():
    # LCS("a b c", "a b d") = 2 of 3 tokens each side: P = R = F1 = 2/3.
    assert metrics.rouge_l(["a b c", "x"], ["a b d", "x"]) == pytest.approx((2 / 3 + 1) / 2)
    assert metrics.exact_match_rate([" 12", "ab"], ["12", "ba"]) == 0.5


def test_scores_uncertainty_random_and_gradient_subsets():
    assert baselines.top_scores([0.1, 0.9, 0.5, 0.9], 3).tolist() == [1, 3, 2]
    assert baselines.self_uncertainty_subset([2.0, 0.5, 1.0], 2).tolist() == [1, 2]
    picked = baselines.random_subset(10, 4, key=jax.random.key(0))
    assert len(set(picked.tolist())) == 4 and picked.max() < 10
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    assert baselines.gradient_subset(pool, 2, np.array([[1.0, 0.1]])).tolist() == [0, 2]
    with pytest.raises(ValueError, match="budget must be in"):
        baselines.top_scores([1.0, 2.0], 3)


def test_kmeans_takes_shares_per_cluster_from_both_ends():
    rng = np.random.default_rng(0)
    a = np.array([1.0, 0.0]) + 0.05 * rng.standard_normal((6, 2))
    b = np.array([0.0, 1.0]) + 0.05 * rng.standard_normal((4, 2))
    x = np.concatenate([a, b])
    picked = baselines.kmeans_subset(x, 5, clusters=2)
    assert len(set(picked.tolist())) == 5
    assert sum(i < 6 for i in picked) == 3 and sum(i >= 6 for i in picked) == 2  # shares 3 and 2 of 5


def test_embedding_kernel_is_scaled_cosine():
    e = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    k = baselines.embedding_kernel(e)
    cos = np.array([[1, 0, 0.5 ** 0.5], [0, 1, 0.5 ** 0.5], [0.5 ** 0.5, 0.5 ** 0.5, 1]])
    off = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(k[off], (cos[off] - 0) / (0.5 ** 0.5), rtol=1e-6)


def test_pair_files(tmp_path):
    pairs = [Instruction("add", "Add 1 and 2.", "3"), Instruction("user", "Say hi.", "hi")]
    study.write_pairs(tmp_path / "p.jsonl", pairs)
    assert study.read_pairs(tmp_path / "p.jsonl") == pairs
    study.write_pairs(tmp_path / "a.jsonl", pairs, answers=["3", "hello"])  # held-out answers: still readable
    assert study.read_pairs(tmp_path / "a.jsonl") == pairs
    assert [json.loads(line)["answer"] for line in (tmp_path / "a.jsonl").read_text().splitlines()] == ["3", "hello"]
    with pytest.raises(ValueError, match="1 answers for 2 pairs"):
        study.write_pairs(tmp_path / "b.jsonl", pairs, answers=["3"])
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object"):
        study.read_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="use_case must be"):
        study.use_case_sets("other", n_pool=4, n_side=2, n_eval=2, seed=0)
    sets = study.use_case_sets("task", n_pool=12, n_side=4, n_eval=4, seed=0)
    assert {p.task for p in sets.side} == {"reverse", "sort"} == {p.task for p in sets.eval}


def test_exact_match_by_family():
    pairs = [Instruction("add", "a", "3"), Instruction("say", "b", "hi"), Instruction("add", "c", "5"),
             Instruction("add", "d", "7"), Instruction("say", "e", "yo")]
    answers = ["3", "hi", " 5 ", "8", "no"]
    by_family = study.exact_match_by_family(pairs, answers)
    assert by_family == {"add_em": pytest.approx(2 / 3), "say_em": 0.5}
    # the overall rate is the pair-weighted mean of the families' rates
    assert (3 * by_family["add_em"] + 2 * by_family["say_em"]) / 5 == pytest.approx(
        metrics.exact_match_rate(answers, [p.response for p in pairs]))
    assert study.exact_match_by_family(pairs[:1], answers[:1]) == {}  # one family: the overall rate says it


def test_gradient_features_are_per_example_and_compile_once_for_any_weights(tiny):
    from flax import nnx

    from metafit import peft
    from metafit.data.instructions import make_instructions

    model, tokenizer = tiny
    data = make_instructions(6, seed=0)
    features = lambda m, pairs: baselines.gradient_features(  # noqa: E731
        m, tokenizer, pairs, lora=peft.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj")), dim=8,
        key=jax.random.key(0), buckets=(128, 256), batch_size=4)
    compiled = baselines._sketch._cache_size()
    together = features(model, data)
    assert together.shape == (6, 8)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-5)
    # the same pairs in other batches (other neighbours and padding rows): gradients are per example
    np.testing.assert_allclose(features(model, data[2:]), together[2:], atol=1e-5)
    other = nnx.clone(model)
    nnx.update(other, jax.tree.map(lambda a: a * 1.5, nnx.state(other)))
    assert not np.allclose(features(other, data), together, atol=1e-3)
    # weights and projection are arguments of one program, not constants folded into one per call
    # (SmolLM2 with LoRA on every linear layer: 3 GB of constants and a crashed grid job)
    assert baselines._sketch._cache_size() - compiled == 1
