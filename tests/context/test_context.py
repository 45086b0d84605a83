"""metafit.context on a tiny chat model: the retrieval head, user masks, s_M, the indicator token under LoRA, NIH
data and bucketed answers, against direct computation. The tiny-Llama tests (steering, user attention) are in
test_steering.py."""
import jax
import numpy as np
import pytest
from flax import nnx

import metafit.models as mm
from metafit import context, peft
from metafit.data import context_tasks
from metafit.train import TrainConfig, fit

from context_fixtures import forward


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A tiny random Llama with tied embeddings, a character-level tokenizer with a chat template and a
    vocabulary exactly the tokenizer's (so [IND] grows it), written with numpy (no torch model, no BPE training)."""
    from serve_tiny import CHARS, SPECIALS, tiny_folder

    folder = tiny_folder(tmp_path_factory.mktemp("chat"), vocab_size=len(SPECIALS) + len(CHARS),
                         max_position_embeddings=256, tie_word_embeddings=True)
    return mm.load(folder)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Anna keeps a tiger in the kitchen.\nWhat does Anna keep?"},
    {"role": "assistant", "content": "tiger"},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "the cat sat on the mat."},
]


# ----------------------------------------------------------------------------------- retrieval head


def test_retrieval_head_is_the_middle_layer_argmax(chat):
    model, tokenizer = chat
    # two questions of one length in tokens (55 characters): one compiled forward serves both direct maps
    probes = ["Anna keeps a tiger in the kitchen. What does Anna keep?", "The cat sat on the mat by the door. Where does it sit ?"]
    mass = context.prompt_attention(model, tokenizer, probes)
    maps = []
    for p in probes:  # direct: full forward of each probe alone, last row
        enc = context.encode_conversation(tokenizer, [{"role": "user", "content": p}], generation_prompt=True)
        att = forward(model, enc.ids[None], method="forward", return_attentions=True).attentions
        maps.append(np.stack([(a[0, :, -1, :] * enc.user_mask).sum(-1) for a in att]))
    np.testing.assert_allclose(mass, np.mean(maps, axis=0), atol=1e-5)
    layer, head = context.retrieval_head(model, tokenizer, probes, layers=[1])
    assert (layer, head) == (1, int(np.argmax(mass[1])))


# ----------------------------------------------------------------------------------- masks and s_M


def test_user_mask_covers_exactly_the_user_contents(chat):
    _, tokenizer = chat
    enc = context.encode_conversation(tokenizer, CONVERSATION)
    user_text = tokenizer.decode(enc.ids[enc.user_mask == 1])
    assert user_text == CONVERSATION[1]["content"] + CONVERSATION[3]["content"]
    for (role, start, end), message in zip(enc.turns, CONVERSATION):
        assert role == message["role"] and tokenizer.decode(enc.ids[start:end]) == message["content"]
    assert "<|user|>" in tokenizer.decode(enc.ids) and "user" not in user_text


def test_dependency_score_equals_the_formula(chat):
    model, tokenizer = chat
    enc = context.encode_conversation(tokenizer, CONVERSATION)
    att = forward(model, enc.ids[None], method="forward", return_attentions=True).attentions[1][0]  # [h, s, s]
    assert tokenizer.bos_token_id in enc.ids and tokenizer.convert_tokens_to_ids("\n") in enc.ids  # both sink kinds occur
    sinks = {tokenizer.bos_token_id, tokenizer.eos_token_id} | {i for i in set(enc.ids.tolist()) if tokenizer.decode([i]).strip() == ""
                                        and "\n" in tokenizer.decode([i])}
    want = []
    for role, start, end in enc.turns:
        if role != "assistant":
            continue
        per_token = []
        for y in range(start, end):
            best = 0.0
            for h in range(att.shape[0]):
                kept = sum(att[h, y, x] for x in range(len(enc.ids)) if enc.ids[x] not in sinks)
                user = sum(att[h, y, x] for x in range(len(enc.ids)) if enc.user_mask[x] and enc.ids[x] not in sinks)
                best = max(best, user / kept)
            per_token.append(best)
        want.append(np.mean(per_token))
    got = context.dependency_score(model, tokenizer, CONVERSATION, layer=1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert len(got) == 2 and all(0.0 <= s <= 1.0 for s in got)


def test_turn_scores_closed_form():
    """Uniform attention over 5 keys, one a sink, two user keys: every head gives 2/4."""
    probs = np.full((2, 5, 5), 0.2)
    user, sinks = np.array([1, 1, 0, 0, 0]), np.array([0, 0, 1, 0, 0])
    assert context.turn_scores(probs, user, sinks, (("user", 0, 2), ("assistant", 3, 5))) == pytest.approx([0.5])


def test_mark_dependent_appends_the_indicator_to_flagged_turns():
    marked, flags = context.mark_dependent(CONVERSATION, [0.7, 0.2], beta=0.6)
    assert flags == [True, False]
    assert marked[1]["content"].endswith(" [IND]") and marked[3]["content"] == "hello world"
    assert CONVERSATION[1]["content"].endswith("keep?")  # the input is not modified


# ----------------------------------------------------------------------------------- indicator token


def test_add_indicator_keeps_old_logits_and_trains_its_row_under_lora(chat):
    model, tokenizer = chat
    grown, tok, ind = context.add_indicator(model, tokenizer)
    assert ind == model.config.vocab_size and len(tok) == ind + 1 and "[IND]" not in tokenizer.get_vocab()
    ids = np.asarray(tokenizer("hello world", add_special_tokens=False)["input_ids"], np.int32)[None]
    np.testing.assert_allclose(forward(grown, ids)[..., :ind], forward(model, ids), atol=1e-6)
    embedding = np.asarray(grown.model.embed_tokens.embedding[...])
    np.testing.assert_allclose(embedding[ind], embedding[:ind].mean(0), atol=1e-6)

    peft.apply(grown, peft.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(grown)
    params = context.indicator_params(grown, ind)
    text = context.with_indicator("Anna keeps a tiger. What does Anna keep?")
    batch = tok([text + " tiger"], add_special_tokens=False, return_tensors="np")
    data = {"input_ids": batch["input_ids"].astype(np.int32), "loss_mask": np.ones(batch["input_ids"].shape, np.float32)}
    assert ind in data["input_ids"]
    from metafit.train.losses import next_token_loss
    loss = context.indicator_loss(next_token_loss(graphdef), ind)
    result = fit(loss, params, lambda step: data, TrainConfig(steps=3, lr=0.1, log_every=3), key=jax.random.key(0),
                 trainable=context.indicator_trainable(params, peft.trainable_mask(state)), progress=False)
    new_state = context.with_indicator_row(result.params, ind)
    after = np.asarray(jax.tree_util.tree_leaves(new_state["model"]["embed_tokens"])[0])
    assert np.abs(after[ind] - embedding[ind]).max() > 1e-3  # the indicator row trained
    np.testing.assert_array_equal(after[:ind], embedding[:ind])  # the frozen rows did not


# ----------------------------------------------------------------------------------- data and answering


def test_nih_grid_places_the_needle_and_fits_the_length(chat):
    _, tokenizer = chat
    filler = [f"Sentence number {i} talks about the weather today." for i in range(200)]
    # one token per character: 400 tokens hold a needle, a question and 5 filler sentences
    tests = context_tasks.nih_grid(tokenizer, [400, 600], [0.0, 0.5, 1.0], seed=0, filler=filler)
    assert [(t.length, t.depth) for t in tests] == [(400, 0.0), (400, 0.5), (400, 1.0), (600, 0.0), (600, 0.5), (600, 1.0)]
    for t in tests:
        n = len(tokenizer(t.prompt, add_special_tokens=False)["input_ids"])
        assert 0.6 * t.length <= n <= t.length
        haystack = t.prompt.split("\n\n")[0]
        needle = f"is {t.answer}."
        assert needle in haystack
        position = haystack.index("The secret code") / len(haystack)
        assert abs(position - t.depth) < 0.35
    assert tests[0].prompt.startswith("The secret code") and tests[2].prompt.split("\n\n")[0].endswith(f"{tests[2].answer}.")


def test_qa_and_scores():
    items = context_tasks.extractive_qa(5, seed=1)
    for it in items:
        assert f"keeps a {it.answer} in" in it.prompt
    assert context_tasks.token_f1("the red tiger", "tiger") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert context_tasks.contains("It is 4817.", "4817") and not context_tasks.contains("4871", "4817")
    mix = context_tasks.skewed_sft_mix(40, seed=0, context_fraction=0.25)
    assert sum(it.task == "qa" for it in mix) == 10 and len(mix) == 40


def test_bucketed_answers_equal_plain_batched_generation(chat):
    model, tokenizer = chat
    prompts = ["Anna keeps a tiger in the kitchen. What does Anna keep?", "hello"]
    got = context.answer(model, tokenizer, prompts, max_new_tokens=4, batch_size=2, bucket=16, alpha=0.5)
    encoded = [context.encode_conversation(tokenizer, [{"role": "user", "content": p}], generation_prompt=True)
               for p in prompts]
    ids, mask = context.left_pad([e.ids for e in encoded][::-1])  # another order and padding than answer()'s
    user, _ = context.left_pad([e.user_mask for e in encoded][::-1])
    out = np.asarray(mm.generate(model, ids, attention_mask=mask, max_new_tokens=4, steer=(user, 0.5)))
    want = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)[::-1]
    assert got == [w.strip() for w in want]


# ----------------------------------------------------------------------------------- bad input


def test_template_without_chat_template_and_short_needles_are_refused(chat):
    _, tokenizer = chat
    import copy
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        context.encode_conversation(plain, CONVERSATION)
    assert len(context.encode_conversation(plain, CONVERSATION, template=False).ids) > 0
    with pytest.raises(ValueError, match="leaves no room for the needle"):
        context_tasks.nih_grid(tokenizer, [10], [0.5], seed=0, filler=["a b c d."] * 10)
    with pytest.raises(ValueError, match="depths must lie"):
        context_tasks.nih_grid(tokenizer, [100], [1.5], seed=0, filler=["a b c d."] * 10)


def test_flag_items_by_beta_or_by_fraction(chat):
    model, tokenizer = chat
    items = context_tasks.extractive_qa(2, seed=0) + context_tasks.context_free(2, seed=0)
    scores, flags = context.flag_items(model, tokenizer, items, beta=0.5)
    want = [context.dependency_score(model, tokenizer, context.conversation_of(it))[0] for it in items]
    np.testing.assert_allclose(scores, want)
    np.testing.assert_array_equal(flags, np.asarray(want) > 0.5)
    _, top = context.flag_items(model, tokenizer, items, fraction=0.25)
    assert top.sum() == 1 and top[int(np.argmax(want))]
    marked = context.with_indicators(items, top, "[IND]")
    assert [m.prompt.endswith(" [IND]") for m in marked] == list(top)
