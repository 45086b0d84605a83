"""SFT data from your own files: JSONL, CSV or a Hugging Face ``datasets`` folder.

Rows come in one of two shapes (decided per file by its first row):

* **chat**: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``
  (the HF ``messages`` format; in a CSV the cell holds that list as JSON);
* **prompt/response**: two text fields (names configurable, default ``prompt`` / ``response``),
  read as the chat ``[user: prompt, assistant: response]``.

:func:`read_sft_rows` reads and checks every row before any token is made: a JSONL line that is
not JSON (its line number), a row without the named fields (its number and the fields it has),
an empty file, an unknown role, a conversation without an assistant message are ``ValueError``.
``datasets`` folders (``Dataset.save_to_disk``) are read offline with ``datasets.load_from_disk``
(the optional extra ``metafit[data]``).

:func:`encode_chats` renders each conversation with the tokenizer's chat template and puts the
loss on assistant tokens only. The template is rendered on growing prefixes: the text that
``messages[:i]`` with the generation prompt adds is the prompt of assistant message ``i`` (no
loss), the text that ``messages[:i+1]`` adds after that is its answer, end-of-turn marker included
(loss). Each piece is tokenised on its own and the ids concatenated, the way
:func:`metafit.data.instructions.encode_sft` joins prompt and response, so a one-exchange
conversation encodes exactly as that instruction does. Rows are padded to the smallest bucket
that fits the longest (:func:`pad_sft_rows`; ``loss_mask[:, t]`` is 1 when token ``t + 1`` is
trained, the convention of :func:`metafit.train.losses.next_token_loss`).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from metafit.data.instructions import Instruction

Chat = list[dict[str, str]]
ROLES = ("system", "user", "assistant")


def read_sft_rows(path: str | Path, *, prompt_field: str = "prompt", response_field: str = "response",
                  messages_field: str = "messages", split: str = "train") -> list[Chat]:
    """Conversations from a ``.jsonl`` / ``.csv`` file or a ``save_to_disk`` folder, all checked.

    Args:
      path: the file or folder.
      prompt_field, response_field: text fields of prompt/response rows.
      messages_field: the list of messages of chat rows.
      split: the split of a saved ``DatasetDict`` (a saved ``Dataset`` has none).

    Raises:
      FileNotFoundError: no such file or folder.
      ValueError: an unknown file type, an empty file, or a bad row (named by line or row number).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SFT data {path} does not exist")
    if path.is_dir():
        rows, where = _dataset_rows(path, split), "row"
    elif path.suffix.lower() in (".jsonl", ".json"):
        rows, where = _jsonl_rows(path), "line"
    elif path.suffix.lower() == ".csv":
        rows, where = _csv_rows(path), "line"
    else:
        raise ValueError(f"SFT data {path}: unknown file type '{path.suffix}'; use .jsonl, .csv or a folder "
                         "written by datasets' save_to_disk")
    chats = [_to_chat(row, f"{path} {where} {number}", prompt_field, response_field, messages_field)
             for number, row in rows]
    if not chats:
        raise ValueError(f"SFT data {path} holds no rows")
    return chats


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number} is not valid JSON ({error.msg} at column {error.colno}); "
                                 "every line must be one JSON object") from error
    return rows


def _csv_rows(path: Path) -> list[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        return [(reader.line_num, row) for row in reader]


def _dataset_rows(path: Path, split: str) -> list[tuple[int, dict]]:
    try:
        import datasets
    except ImportError as error:
        raise ImportError("reading a datasets folder needs the `datasets` package: pip install 'metafit[data]'") \
            from error
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} holds the splits {sorted(loaded)}, not '{split}'; choose one of them")
        loaded = loaded[split]
    return list(enumerate(loaded))


def _to_chat(row: Any, where: str, prompt_field: str, response_field: str, messages_field: str) -> Chat:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be an object with fields, got {type(row).__name__}")
    if messages_field in row:
        messages = row[messages_field]
        if isinstance(messages, str):  # a CSV cell
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: field '{messages_field}' is not a JSON list of messages") from error
        return _check_messages(messages, where)
    missing = [f for f in (prompt_field, response_field) if f not in row or row[f] is None]
    if missing:
        raise ValueError(f"{where}: no field {missing}; the row has fields {sorted(row)}. Rows need "
                         f"'{messages_field}' (chat) or '{prompt_field}' and '{response_field}' (set the field "
                         "names to your columns)")
    for field in (prompt_field, response_field):
        if not isinstance(row[field], str):
            raise ValueError(f"{where}: field '{field}' must be text, got {type(row[field]).__name__}")
    return [{"role": "user", "content": row[prompt_field]}, {"role": "assistant", "content": row[response_field]}]


def _check_messages(messages: Any, where: str) -> Chat:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} objects")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has the unknown role {message['role']!r}; roles are "
                             f"{', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}: message {i} content must be text, got {type(message['content']).__name__}")
        chat.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in chat):
        raise ValueError(f"{where}: the conversation has no assistant message, so nothing to train on")
    return chat


def chat_segments(tokenizer, chat: Chat) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, trained)`` pieces; ``trained`` marks assistant answers.

    Raises:
      ValueError: the tokenizer has no chat template, or its rendering of a prefix is not a prefix of
        the rendering of the whole (then answer spans cannot be found by rendering prefixes).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat rows need a tokenizer with a chat template; this tokenizer has none")
    render = lambda messages, prompt=False: tokenizer.apply_chat_template(  # noqa: E731
        messages, tokenize=False, add_generation_prompt=prompt)
    segments, done = [], ""
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        before, after = render(chat[:i], True), render(chat[: i + 1])
        if not before.startswith(done) or not after.startswith(before):
            raise ValueError("the chat template renders a conversation's prefix differently from the whole; "
                             "assistant tokens cannot be located, so use prompt/response rows")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    whole = render(chat)
    if not whole.startswith(done):
        raise ValueError("the chat template renders a conversation's prefix differently from the whole")
    if whole[len(done):]:
        segments.append((whole[len(done):], False))
    return [(text, trained) for text, trained in segments if text]


def encode_chats(tokenizer, chats: Sequence[Chat], buckets: Sequence[int] = (64, 128),
                 pad_id: int | None = None) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask``, ``loss_mask`` ``[n, L]`` with the loss on assistant tokens only."""
    rows = []
    for chat in chats:
        ids, trained = [], []
        for text, is_answer in chat_segments(tokenizer, chat):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            trained += [is_answer] * len(piece)
        rows.append((ids, trained))
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    return pad_sft_rows(rows, buckets, 0 if pad_id is None else pad_id)


def pad_sft_rows(rows: Sequence[tuple[Sequence[int], Sequence[bool]]], buckets: Sequence[int],
                 pad_id: int) -> dict[str, np.ndarray]:
    """Pads ``(token_ids, trained)`` rows to the smallest bucket that fits the longest.

    ``loss_mask[:, t] = trained[t + 1]`` (position t predicts token t+1); padding has
    ``attention_mask`` 0 and no loss.

    Raises:
      ValueError: a row is longer than the largest bucket (its index and length).
    """
    lengths = [len(ids) for ids, _ in rows]
    longest = max(lengths)
    fitting = [b for b in sorted(buckets) if b >= longest]
    if not fitting:
        raise ValueError(f"example {int(np.argmax(lengths))} has {longest} tokens, more than the largest bucket "
                         f"{max(buckets)}; add a larger bucket or shorten the examples")
    length = fitting[0]
    ids = np.full((len(rows), length), pad_id, np.int32)
    attention = np.zeros((len(rows), length), np.int32)
    loss_mask = np.zeros((len(rows), length), np.float32)
    for i, (tokens, trained) in enumerate(rows):
        ids[i, : len(tokens)] = tokens
        attention[i, : len(tokens)] = 1
        loss_mask[i, : len(tokens) - 1] = np.asarray(trained[1:], np.float32)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


def split_chats(chats: Sequence[Chat], n_eval: int, seed: int) -> tuple[list[Chat], list[Chat]]:
    """``(train, eval)``: ``n_eval`` conversations held out by a permutation of ``seed``."""
    if not 0 < n_eval < len(chats):
        raise ValueError(f"n_eval={n_eval} but the data has {len(chats)} rows; hold out between 1 and "
                         f"{len(chats) - 1} rows")
    order = np.random.default_rng(seed).permutation(len(chats))
    return [chats[i] for i in order[n_eval:]], [chats[i] for i in order[:n_eval]]


def sft_file_split(path: str | Path, n_eval: int, seed: int, *, batch_size: int = 1, prompt_field: str = "prompt",
                   response_field: str = "response") -> tuple[list[Chat], list[Chat]]:
    """``(train, eval)`` conversations of a file (:func:`read_sft_rows`, :func:`split_chats`), checked to
    leave at least ``batch_size`` training rows."""
    train, held_out = split_chats(read_sft_rows(path, prompt_field=prompt_field, response_field=response_field),
                                  n_eval, seed)
    if len(train) < batch_size:
        raise ValueError(f"{path}: {len(train)} training rows (after n_eval={n_eval} held out) cannot fill a batch "
                         f"of {batch_size}; lower the batch size or n_eval, or add rows")
    return train, held_out


def as_instructions(chats: Sequence[Chat]) -> list[Instruction] | None:
    """The conversations as instructions (for greedy exact match) if each is one user -> assistant exchange."""
    if all(len(c) == 2 and c[0]["role"] == "user" and c[1]["role"] == "assistant" for c in chats):
        return [Instruction("file", c[0]["content"], c[1]["content"]) for c in chats]
    return None
