"""Generation conventions: generation_config.json, stop strings, streaming (= the non-streaming tokens)."""
import jax
import numpy as np
import pytest

import metafit.models as mm
from metafit.models.generate import TextStream, generate_text, stream, stream_text
from serve_tiny import set_generation_config, tiny_folder

NEW = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny"), num_hidden_layers=1)


@pytest.fixture(scope="module")
def loaded(folder):
    return mm.load(folder)


def _prompt(tokenizer, text="hello there"):
    return np.asarray(tokenizer(text)["input_ids"], np.int32)


def test_generation_config_eos_list_and_max_new_tokens_match_transformers(folder, loaded, tmp_path):
    model, tokenizer = loaded
    ids = _prompt(tokenizer)
    free = np.asarray(mm.generate(model, ids, max_new_tokens=NEW, stop_tokens=()))[len(ids):]
    at = next(k for k in range(1, NEW) if free[k] not in free[:k] and 2 not in free[:k + 1])  # first seen at step k
    stop = int(free[at])  # becomes a second eos id
    import shutil
    shutil.copytree(folder, tmp_path / "gc")
    set_generation_config(tmp_path / "gc", eos_token_id=[2, stop], max_new_tokens=NEW, pad_token_id=0)
    model2, _ = mm.load(tmp_path / "gc")
    assert model2.config.generation.eos_token_ids == (2, stop)
    assert model2.config.generation.max_new_tokens == NEW and not model2.config.generation.do_sample
    got = np.asarray(mm.generate(model2, ids))  # eos list and length from the file
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "gc")).eval()
    with torch.no_grad():  # transformers reads the same generation_config.json
        want = reference.generate(torch.as_tensor(ids[None], dtype=torch.long), do_sample=False).numpy()[0]
    assert got.shape == (len(ids) + NEW,)
    np.testing.assert_array_equal(got[:len(want)], want)
    assert got[len(ids) + at] == stop and (got[len(ids) + at + 1:] == 0).all()


def test_generation_config_sampling_defaults_and_stream_yields_their_tokens(folder, tmp_path):
    """Sampling settings come from generation_config.json; streaming them (a batch of two) yields generate's tokens.

    One test for both: the sampled generation and stream programs compile once, for this model.
    Greedy streaming of one prompt is checked in the stop-string test below.
    """
    import shutil
    shutil.copytree(folder, tmp_path / "gc")
    set_generation_config(tmp_path / "gc", do_sample=True, temperature=0.7, top_p=0.9)
    model, tokenizer = mm.load(tmp_path / "gc")
    generation = model.config.generation
    assert (generation.do_sample, generation.temperature, generation.top_p, generation.top_k) == (True, 0.7, 0.9, 50)
    ids = np.stack([_prompt(tokenizer, "abcdef"), _prompt(tokenizer, "uvwxyz")])
    with pytest.raises(ValueError, match="do_sample=true"):
        mm.generate(model, ids, max_new_tokens=3)
    key = jax.random.key(4)
    by_default = np.asarray(mm.generate(model, ids, max_new_tokens=NEW, key=key, stop_tokens=()))
    explicit = mm.generate(model, ids, max_new_tokens=NEW, key=key, temperature=0.7, top_p=0.9, top_k=50,
                           stop_tokens=())
    np.testing.assert_array_equal(by_default, np.asarray(explicit))
    streamed = np.stack(list(stream(model, ids, max_new_tokens=NEW, key=key, stop_tokens=())), axis=1)
    np.testing.assert_array_equal(streamed, by_default[:, ids.shape[1]:])
    mm.save(model, tmp_path / "resaved")  # written back, read back
    assert mm.load(tmp_path / "resaved", tokenizer=False)[0].config.generation == generation


def test_bad_generation_config_names_the_field(folder, tmp_path):
    import shutil
    shutil.copytree(folder, tmp_path / "gc")
    set_generation_config(tmp_path / "gc", temperature=-1)
    with pytest.raises(mm.MalformedWeightsError, match="temperature"):
        mm.load(tmp_path / "gc")


def test_stop_string_cuts_before_it_and_streams_the_same_text(loaded):
    model, tokenizer = loaded
    ids = _prompt(tokenizer)
    tokens = np.asarray(mm.generate(model, ids, max_new_tokens=NEW, stop_tokens=()))[len(ids):]
    # greedy streaming yields generate's tokens (one prompt: the programs stream_text uses below)
    np.testing.assert_array_equal(np.stack(list(stream(model, ids, max_new_tokens=NEW, stop_tokens=()))), tokens)
    full = tokenizer.decode(tokens)
    stop = full[3:5]  # two characters in the middle of the greedy continuation
    text = generate_text(model, tokenizer, ids, stop=[stop], max_new_tokens=NEW, stop_tokens=())
    assert text == full[:full.find(stop)]
    assert "".join(stream_text(model, tokenizer, ids, stop=[stop], max_new_tokens=NEW, stop_tokens=())) == text
    assert generate_text(model, tokenizer, ids, max_new_tokens=NEW, stop_tokens=()) == full


class _Chars:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_a_possible_stop_start():
    pieces = TextStream(_Chars(), stop=["END"])
    out = [pieces.push(ord(c)) for c in "abEN"]
    assert out == ["a", "b", "", ""] and not pieces.stopped  # "EN" may start "END": held
    assert pieces.push(ord("x")) == "ENx"                      # it did not
    for c in "yEND":
        pieces.push(ord(c))
    assert pieces.stopped and pieces.text == "abENxy"
    with pytest.raises(ValueError, match="non-empty"):
        TextStream(_Chars(), stop=[""])


def test_engine_row_chooser_skips_sampling_only_when_no_row_samples():
    """Greedy rows take the argmax whether or not another row of the batch samples; sampled rows draw
    from their own nucleus (top_p 0 keeps the top token only; two equal top tokens at top_p 0.5+)."""
    import jax
    import jax.numpy as jnp

    from metafit.serve.engine import _row_chooser

    logits = jnp.asarray(np.log(np.asarray([[0.1, 0.6, 0.3, 1e-3], [0.45, 0.1, 0.45, 1e-3], [0.2, 0.1, 0.3, 0.4]],
                                           np.float32)))
    keys = jax.random.split(jax.random.key(0), 3)
    choose = jax.jit(lambda x, t, p: _row_chooser(keys, t, p)(x, 1))
    greedy = np.asarray(choose(logits, jnp.zeros(3), jnp.ones(3)))
    np.testing.assert_array_equal(greedy, [1, 0, 3])
    drawn = {tuple(np.asarray(_row_chooser(jax.random.split(jax.random.key(s), 3), jnp.asarray([0.0, 1.0, 1.0]),
                                           jnp.asarray([1.0, 0.6, 0.0]))(logits, s))) for s in range(20)}
    assert {d[0] for d in drawn} == {1} and {d[2] for d in drawn} == {3}  # greedy row; top_p 0: the top token only
    assert {d[1] for d in drawn} == {0, 2}  # both halves of the 0.6 nucleus are drawn, nothing else
