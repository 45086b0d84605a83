"""The unseen instruction families (never in pretraining) and the DELIFT study's option to use them."""
from collections import Counter

import pytest

from metafit.data import instructions, pretraining, unseen_instructions as unseen
from metafit.data.unseen_instructions import UNSEEN_TASKS, make_unseen
from metafit.experiments.select import DeliftArgs
from metafit.pretrain import small_lm
from metafit.select import study

TABLES = {"opposite": unseen.OPPOSITES, "capital": unseen.CAPITALS, "sound": unseen.SOUNDS,
          "colour": unseen.COLOURS}


def _expected_answer(pair):
    """The answer recomputed from the prompt alone: a table look-up or the word rule."""
    if pair.task in TABLES:
        keys = [k for k in TABLES[pair.task] if f" {k}" in f" {pair.prompt}".replace("'", " ")]
        assert len(keys) == 1, pair.prompt
        return TABLES[pair.task][keys[0]]
    word = pair.prompt.split("'")[1]
    assert word in instructions._WORDS
    return {"bracket": f"[{word}]", "twice": f"{word} {word}"}[pair.task]


def test_examples_are_a_pure_function_of_seed_and_index():
    mix = (5.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    whole = make_unseen(40, seed=3, mix=mix)
    assert make_unseen(10, seed=3, mix=mix, offset=25) == whole[25:35]
    assert make_unseen(40, seed=3, mix=mix) == whole
    assert make_unseen(40, seed=4, mix=mix) != whole
    cycled = make_unseen(12, seed=0)
    assert [p.task for p in cycled] == list(UNSEEN_TASKS.names()) * 2


def test_answers_are_exact_and_every_phrasing_and_key_occurs():
    pairs = make_unseen(600, seed=1)
    for pair in pairs:
        assert pair.response == _expected_answer(pair)
    for task, table in TABLES.items():
        answers = {p.response for p in pairs if p.task == task}
        assert answers == set(table.values())
    assert len({p.prompt.split(" ")[0] for p in pairs if p.task == "opposite"}) == 2  # both phrasings


def test_mix_sets_family_frequencies_and_is_checked():
    names = ("opposite", "twice")
    counts = Counter(p.task for p in make_unseen(600, seed=0, tasks=names, mix=(3.0, 1.0)))
    assert counts["opposite"] / 600 == pytest.approx(0.75, abs=0.05)
    with pytest.raises(ValueError, match="2 non-negative weights"):
        make_unseen(5, seed=0, tasks=names, mix=(1.0,))
    with pytest.raises(KeyError, match="reverse"):
        make_unseen(5, seed=0, tasks=("reverse",))


def test_unseen_families_never_reach_pretraining():
    assert not set(UNSEEN_TASKS.names()) & set(instructions.INSTRUCTION_TASKS.names())
    assert "metafit.data.unseen_instructions" not in small_lm._SOURCE_MODULES  # not in the cache key
    corpus_prompts = {turn["content"] for chat in pretraining.instruction_chats(300, seed=0) for turn in chat}
    unseen_prompts = {p.prompt for p in make_unseen(300, seed=0)}
    assert corpus_prompts and not corpus_prompts & unseen_prompts


def test_study_builds_uneven_pool_and_balanced_evaluation():
    names = ("opposite", "capital", "bracket")
    sets = study.use_case_sets("task", n_pool=60, n_side=6, n_eval=9, seed=0, families="unseen", tasks=names,
                               mix=(4.0, 1.0, 1.0), side_tasks=("capital", "bracket"))
    assert sets.pool == make_unseen(60, seed=0, tasks=names, mix=(4.0, 1.0, 1.0))
    assert Counter(p.task for p in sets.pool).most_common(1)[0][0] == "opposite"
    assert [p.task for p in sets.side] == ["capital", "bracket"] * 3
    assert {p.task for p in sets.eval} == {"capital", "bracket"}
    sets = study.use_case_sets("instruction", n_pool=6, n_side=0, n_eval=9, seed=0, families="unseen", tasks=names)
    assert Counter(p.task for p in sets.eval) == {name: 3 for name in names}
    # The default stays the pretraining families, as before the option existed.
    old = study.use_case_sets("instruction", n_pool=8, n_side=0, n_eval=4, seed=2)
    assert old.pool == instructions.make_instructions(8, seed=2)


def test_delift_args_reject_families_the_set_does_not_have():
    with pytest.raises(ValueError, match=r"\['reverse', 'sort'\] are not in the 'unseen' set"):
        DeliftArgs(families="unseen")  # the default side_tasks are pretraining families
    with pytest.raises(ValueError, match="needs families 'unseen'"):
        DeliftArgs(mix=(1.0, 2.0))
    with pytest.raises(ValueError, match="families must be one of"):
        DeliftArgs(families="mystery")
    with pytest.raises(ValueError, match="mix has 2 weights for 6 families"):
        DeliftArgs(families="unseen", side_tasks=("sound",), mix=(1.0, 2.0))
    assert DeliftArgs(families="unseen", side_tasks=("sound",), mix=(1.0,) * 6).mix == (1.0,) * 6
