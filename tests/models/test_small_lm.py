"""metafit's small LM: tokenizer and chat template, preset size, packing, build + cache (tiny settings)."""
import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx

import metafit.models as mm
from metafit.data.instructions import chat_prompt, encode_sft, make_instructions
from metafit.data.pretraining import instruction_chats, pack_rows, unigram_cross_entropy
from metafit.pretrain import small_lm
from metafit.pretrain.small_lm import TINY, TINY_TRAIN, SmallLMConfig, build, build_info, cache_key, llama_config
from metafit.pretrain.tokenizer import CHAT_TOKENS, SPECIAL_IDS, train_chat_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"{ex.prompt} {ex.response}" for ex in make_instructions(120, seed=0)]
    return train_chat_tokenizer(texts + ["Café naïve résumé, the cat sat on the mat."] * 5, 400)


def test_tokenizer_round_trips_splits_digits_and_has_fixed_special_ids(tokenizer):
    text = "Café naïve — 1234 résumé 🙂\n\ttabs  and  spaces"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte level: nothing is unknown
    assert tokenizer.convert_ids_to_tokens(tokenizer(" 1234")["input_ids"]) == ["Ġ1", "2", "3", "4"]
    assert tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS)) == list(range(7)) == list(SPECIAL_IDS.values())
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|bos|>", "<|end|>", "<|pad|>")
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]  # adds nothing


def test_chat_template_renders_roles_and_matches_encode_sft(tokenizer, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2."},
                {"role": "assistant", "content": "3"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|bos|><|system|>Be brief.<|end|><|user|>Add 1 and 2.<|end|><|assistant|>3<|end|>"
    prompt = chat_prompt(tokenizer, "Add 1 and 2.")
    assert prompt == "<|bos|><|user|>Add 1 and 2.<|end|><|assistant|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [i for i in ids if i < 7] == [1, 3, 6, 4, 6, 5, 6]  # each marker is one token
    with pytest.raises(Exception, match="roles are system, user and assistant"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)

    # encode_sft (prompt and response tokenised apart) gives the ids of the whole rendered chat
    examples = make_instructions(6, seed=1)
    enc = encode_sft(tokenizer, examples, buckets=(64,))
    for row, ex in enumerate(examples):
        whole = tokenizer(tokenizer.apply_chat_template(
            [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response}], tokenize=False),
            add_special_tokens=False)["input_ids"]
        assert enc["input_ids"][row, :len(whole)].tolist() == whole
        targets = enc["input_ids"][row, 1:][enc["loss_mask"][row, :-1] == 1]
        assert tokenizer.decode(targets) == ex.response + "<|end|>"

    tokenizer.save_pretrained(tmp_path)
    import transformers

    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again.apply_chat_template(messages, tokenize=False) == text
    assert again(text, add_special_tokens=False)["input_ids"] == ids


def test_preset_has_under_5m_parameters():
    model = nnx.eval_shape(lambda: mm.LlamaForCausalLM(llama_config(SmallLMConfig()), rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # embedding 2048 x 192 (tied) + 4 x (q, o 192x192; k, v 192x64; 3 MLP 192x512; 2 norms) + final norm
    assert count == 2048 * 192 + 4 * (2 * 192 * 192 + 2 * 192 * 64 + 3 * 192 * 512 + 2 * 192) + 192 == 1_967_808
    assert count <= 5_000_000
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads < model.config.num_attention_heads


def test_pack_rows_keeps_chats_whole_and_masks_padding():
    packed = pack_rows([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 5, split=False, pad_id=0)
    np.testing.assert_array_equal(packed["input_ids"], [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]])
    np.testing.assert_array_equal(packed["loss_mask"], [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    stream = pack_rows([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4, split=True, pad_id=0)
    np.testing.assert_array_equal(stream["input_ids"], [[1, 2, 3, 4], [5, 6, 7, 8]])  # tail [9] dropped
    np.testing.assert_array_equal(stream["loss_mask"], [[1, 1, 1, 0]] * 2)


def test_unigram_baseline_and_chats_are_pure_functions():
    train = np.array([[0, 1, 1, 2]]), np.array([[1, 1, 1, 0]])
    # train targets 1, 1, 2 -> counts + 1 = [1, 3, 2] / 6 over a vocabulary of 3; eval target 2
    assert unigram_cross_entropy(*train, np.array([[0, 2]]), np.array([[1, 0]]), 3) == pytest.approx(-np.log(2 / 6))
    chats = instruction_chats(200, seed=0)
    assert chats == instruction_chats(200, seed=0) and chats[50:60] == instruction_chats(10, seed=0, offset=50)
    assert all(c[-1]["role"] == "assistant" for c in chats)
    assert 0.1 < np.mean([c[0]["role"] == "system" for c in chats]) < 0.4  # system_fraction 0.25
    assert 0.1 < np.mean([len(c) > 3 for c in chats]) < 0.4  # multi_turn_fraction 0.25


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def forward(model, ids):
    """Logits through one compiled program (shared by models of one structure), not one per op."""
    return np.asarray(_logits(*nnx.split(model), ids))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny build (keywords corpus, 2 steps), with the in-memory model's logits on a probe."""
    captured, save_folder = {}, small_lm.save_folder
    probe = np.arange(3, 43, dtype=np.int32).reshape(2, 20)

    def spy(model, folder, tok):
        captured["logits"] = forward(model, probe)
        return save_folder(model, folder, tok)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(small_lm, "save_folder", spy)
        cache = tmp_path_factory.mktemp("cache")  # laid out like $METAFIT_CACHE
        folder = build(TINY, train=TINY_TRAIN, cache_dir=cache / "small-lm", progress=False)
    return folder, probe, captured["logits"]


def test_build_writes_an_hf_folder_that_loads_with_identical_logits(built):
    folder, probe, logits = built
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "metafit_small_lm.json"} <= {p.name for p in folder.iterdir()}
    model, tokenizer = mm.load(folder)
    np.testing.assert_array_equal(forward(model, probe), logits)
    info = build_info(folder)
    assert info["key"] == folder.name == cache_key(TINY, train=TINY_TRAIN)
    # trained: held-out losses fell below the uniform distribution's log(vocab)
    assert info["heldout"]["heldout_chat_loss"] < np.log(info["vocab_size"]) - 0.3
    data = small_lm.pretraining_data(TINY, seed=0, tokenizer=tokenizer)  # recomputed from the loaded model
    metrics = small_lm.heldout_metrics(model, data, TINY.eval_rows)
    assert metrics["heldout_chat_loss"] == pytest.approx(info["heldout"]["heldout_chat_loss"], rel=1e-6)
    # generation stops at the end-of-turn token and the chat tokenizer came along
    ids = tokenizer(chat_prompt(tokenizer, "Add 1 and 2."), add_special_tokens=False)["input_ids"]
    out = np.asarray(mm.generate(model, np.asarray(ids, np.int32), max_new_tokens=6))
    assert out.shape == (len(ids) + 6,) and out[: len(ids)].tolist() == ids
    assert model.config.eos_token_ids == (SPECIAL_IDS["end_of_turn"], SPECIAL_IDS["end_of_text"])


def test_transformers_reads_the_folder_with_the_same_logits(built):
    torch = pytest.importorskip("torch")
    import transformers

    torch.set_num_threads(1)  # a tiny forward: more threads only spin-wait on a busy machine (models_tiny.py)

    folder, probe, logits = built
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        theirs = reference(torch.as_tensor(probe, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, logits, atol=1e-4)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]


def test_second_build_is_a_cache_hit_and_the_name_resolves(built, monkeypatch):
    folder, _, _ = built

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(small_lm, "fit", no_training)
    monkeypatch.setattr(small_lm, "pretraining_data", no_training)
    assert build(TINY, train=TINY_TRAIN, cache_dir=folder.parent, progress=False) == folder
    monkeypatch.setattr(small_lm, "build", lambda: folder)  # what load("metafit-small-lm") calls
    assert mm.resolve("metafit-small-lm") == folder


def test_cache_key_follows_settings_corpus_and_code(monkeypatch):
    key = cache_key(TINY, train=TINY_TRAIN)
    assert key == cache_key(dataclasses.replace(TINY), train=TINY_TRAIN)
    changed = [
        cache_key(dataclasses.replace(TINY, hidden_size=48), train=TINY_TRAIN),
        cache_key(TINY, train=dataclasses.replace(TINY_TRAIN, lr=1e-3)),
        cache_key(TINY, train=TINY_TRAIN, seed=1),
    ]
    with monkeypatch.context() as patch:
        patch.setattr(small_lm, "code_version", lambda: "another version")
        changed.append(cache_key(TINY, train=TINY_TRAIN))
    datasets = small_lm.load_text_dataset

    def one_byte_more(name):
        dataset = datasets(name)
        return dataset._replace(texts=dataset.texts[:-1] + (dataset.texts[-1] + "!",))

    small_lm._text_digest.cache_clear()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(small_lm, "load_text_dataset", one_byte_more)
            changed.append(cache_key(dataclasses.replace(TINY, max_documents=0), train=TINY_TRAIN))
    finally:
        small_lm._text_digest.cache_clear()
    changed.append(cache_key(dataclasses.replace(TINY, max_documents=0), train=TINY_TRAIN))  # the bytes are in the key
    assert len({key, *changed}) == 7


def test_code_version_ignores_documentation_but_not_code(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    versions = []
    for i, source in enumerate([
        'def f(x):\n    """Doubles."""\n    return 2 * x\n',
        '"""A module."""\n\n\ndef f(x):  # a comment\n    """Twice x."""\n    return 2 * x\n',
        'def f(x):\n    """Doubles."""\n    return 3 * x\n',
    ]):
        (tmp_path / f"code_{i}.py").write_text(source)
        monkeypatch.setattr(small_lm, "_SOURCE_MODULES", (f"code_{i}",))
        versions.append(small_lm.code_version())
    assert versions[0] == versions[1] != versions[2]


def test_config_file_builds_the_default_model(repo):
    from metafit.experiments import load_run_config
    from metafit.pretrain.small_lm import PRETRAIN

    cfg = load_run_config(repo / "configs/pretrain/small_lm.yaml")
    # so `metafit run` fills the very cache entry that load("metafit-small-lm") reads
    assert (cfg.train, cfg.args.small_lm, cfg.seed) == (PRETRAIN, SmallLMConfig(), 0)
    finetune = load_run_config(repo / "configs/finetune/lora_small.yaml")
    assert finetune.experiment == "lora_sft" and finetune.args.model == "metafit-small-lm"


def test_pretrain_experiment_on_the_tiny_build(built, tmp_path, monkeypatch, repo):
    from metafit.config import to_dict
    from metafit.experiments import run_experiment

    folder, _, _ = built
    monkeypatch.setenv("METAFIT_CACHE", str(folder.parent.parent))  # the tiny build is a cache hit: no training
    overrides = [f"args.small_lm.{k}={json.dumps(v)}" for k, v in to_dict(TINY).items()]
    overrides += [f"train.{k}={json.dumps(v)}" for k, v in to_dict(TINY_TRAIN).items()]
    overrides += ["args.n_eval=2", "args.max_new_tokens=4"]
    run, results = run_experiment(repo / "configs/pretrain/small_lm.yaml", overrides, workdir=tmp_path / "run")
    metrics, info = results["metrics"], build_info(folder)
    assert metrics["parameters"] == info["parameters"] and metrics["build_seconds"] == info["seconds"]
    assert metrics["heldout_chat_loss"] == pytest.approx(info["heldout"]["heldout_chat_loss"], rel=1e-6)
    assert metrics["heldout_chat_perplexity"] == pytest.approx(np.exp(metrics["heldout_chat_loss"]))
    tasks = ("add", "count", "reverse", "sort", "successor", "upper")
    assert all(metrics[f"{t}_em"] in (0.0, 0.5, 1.0) and 0 <= metrics[f"{t}_seen"] <= 1 for t in tasks)
    assert metrics["mean_em"] == pytest.approx(np.mean([metrics[f"{t}_em"] for t in tasks]))
    assert isinstance(metrics["sample_answer"], str)
    assert json.loads((run.path / "results.json").read_text())["metrics"]["parameters"] == info["parameters"]
