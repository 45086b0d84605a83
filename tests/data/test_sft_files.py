"""SFT rows from JSONL / CSV / datasets folders: token ids and loss masks against hand-built expectations."""
import json

import numpy as np
import pytest

from metafit.data.instructions import Instruction, encode_sft
from metafit.data.sft_files import as_instructions, encode_chats, read_sft_rows, sft_file_split, split_chats
from metafit.pretrain.tokenizer import SPECIAL_IDS, train_chat_tokenizer

BOS, SYSTEM, USER, ASSISTANT, END, PAD = (SPECIAL_IDS[k] for k in ("bos", "system", "user", "assistant",
                                                                    "end_of_turn", "pad"))


@pytest.fixture(scope="module")
def tokenizer():
    # the small LM's tokenizer class and chat template, trained in milliseconds on a few words
    return train_chat_tokenizer(["hello world, the cat sat on the mat"] * 5, 300)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_multi_turn_chat_trains_on_assistant_tokens_only(tokenizer):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "cat?"},
            {"role": "assistant", "content": "mat"}]
    s, h, hello, cat, mat = (_ids(tokenizer, t) for t in ("be brief", "hi", "hello", "cat?", "mat"))
    # <|bos|><|system|>be brief<|end|><|user|>hi<|end|><|assistant|>hello<|end|><|user|>cat?<|end|><|assistant|>mat<|end|>
    expected = ([BOS, SYSTEM] + s + [END, USER] + h + [END, ASSISTANT] + hello + [END, USER] + cat + [END, ASSISTANT]
                + mat + [END])
    trained = ([0] * (2 + len(s) + 2 + len(h) + 2) + [1] * (len(hello) + 1) + [0] * (1 + len(cat) + 2)
               + [1] * (len(mat) + 1))
    out = encode_chats(tokenizer, [chat, chat[1:3]], buckets=(8, 64, 128))
    n = len(expected)
    assert out["input_ids"].shape == (2, 64)
    assert out["input_ids"][0, :n].tolist() == expected and (out["input_ids"][0, n:] == PAD).all()
    assert out["attention_mask"][0].tolist() == [1] * n + [0] * (64 - n)
    assert out["loss_mask"][0].tolist() == trained[1:] + [0] * (64 - n + 1)  # position t predicts token t+1
    # the loss covers exactly the answers and their end-of-turn tokens
    targets = out["input_ids"][0, 1:][out["loss_mask"][0, :-1] > 0].tolist()
    assert targets == hello + [END] + mat + [END]


def test_one_exchange_encodes_exactly_as_the_generated_instructions(tokenizer):
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world"}]]
    instructions = as_instructions(chats)
    assert instructions == [Instruction("file", "hi", "hello world")]
    ours, theirs = encode_chats(tokenizer, chats, (32,)), encode_sft(tokenizer, instructions, (32,))
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])


def test_jsonl_csv_and_custom_fields_read_the_same_rows(tmp_path):
    rows = [{"q": "hi", "a": "yo"}, {"q": "cat", "a": "mat"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.csv").write_text('q,a\nhi,yo\ncat,"mat"\n')
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    (tmp_path / "c.csv").write_text("messages\n" + '"' + json.dumps(chat["messages"]).replace('"', '""') + '"\n')
    expected = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in (("hi", "yo"),
                                                                                                ("cat", "mat"))]
    for name in ("d.jsonl", "d.csv"):
        assert read_sft_rows(tmp_path / name, prompt_field="q", response_field="a") == expected
    assert read_sft_rows(tmp_path / "c.csv") == expected[:1]
    train, held = split_chats(expected, 1, seed=0)
    assert len(train) == len(held) == 1 and sorted(map(str, train + held)) == sorted(map(str, expected))


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', "line 2 is not valid JSON"),
    ('{"prompt": "a", "response": "b"}\n\n{"question": "a", "answer": "b"}\n',
     r"line 3: no field \['prompt', 'response'\]; the row has fields \['answer', 'question'\]"),
    ("", "holds no rows"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', "message 0 has the unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', "no assistant message"),
    ('[1, 2]\n', "a row must be an object"),
])
def test_bad_rows_are_named(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_sft_rows(path)


def test_bad_files_and_sizes(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError):
        read_sft_rows(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown file type '.txt'"):
        read_sft_rows(tmp_path / "x.txt")
    (tmp_path / "d.csv").write_text("prompt,other\nhi,yo\n")
    with pytest.raises(ValueError, match=r"d.csv line 2: no field \['response'\]"):
        read_sft_rows(tmp_path / "d.csv")
    (tmp_path / "ok.csv").write_text("prompt,response\nhi,yo\na,b\nc,d\n")
    assert len(sft_file_split(tmp_path / "ok.csv", 1, seed=0, batch_size=2)[0]) == 2
    with pytest.raises(ValueError, match="2 training rows .* cannot fill a batch of 4"):
        sft_file_split(tmp_path / "ok.csv", 1, seed=0, batch_size=4)
    with pytest.raises(ValueError, match="n_eval=2 but the data has 2 rows"):
        split_chats([[], []], 2, seed=0)
    long = [[{"role": "user", "content": "hello world " * 20}, {"role": "assistant", "content": "x"}]]
    with pytest.raises(ValueError, match="example 0 has .* tokens, more than the largest bucket 16"):
        encode_chats(tokenizer, long, (16,))


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"prompt": ["hi", "cat"], "response": ["yo", "mat"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dict"))
    expected = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in zip(*rows.values())]
    assert read_sft_rows(tmp_path / "flat") == expected
    assert read_sft_rows(tmp_path / "dict") == expected
    with pytest.raises(ValueError, match="holds the splits \\['train'\\], not 'test'"):
        read_sft_rows(tmp_path / "dict", split="test")
    chats = datasets.Dataset.from_dict({"messages": [expected[0]]})
    chats.save_to_disk(str(tmp_path / "chats"))
    assert read_sft_rows(tmp_path / "chats") == expected[:1]
