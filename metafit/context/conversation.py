"""Token ids of a conversation with the spans of each turn's content, hence the user-token mask.

User tokens are the content tokens of user turns: not role headers, not the system prompt, not
template punctuation. The conversation is rendered with the tokenizer's chat template, each
message's content is located in the rendered text in order, and a token is a content token of a
turn when its character span (from the fast tokenizer's offsets) lies inside that content.
Without the template the prompt is the messages' contents joined by newlines.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

Message = dict  # {"role": "user" | "assistant" | "system", "content": str}


class EncodedConversation(NamedTuple):
    """A tokenised conversation.

    Attributes:
      ids: ``[s]`` int32 token ids (the template's BOS included when it writes one).
      user_mask: ``[s]`` int32, 1 on the content tokens of user turns.
      turns: per message ``(role, start, end)``: its content tokens are ``ids[start:end]``.
    """

    ids: np.ndarray
    user_mask: np.ndarray
    turns: tuple[tuple[str, int, int], ...]


def _check(conversation: Sequence[Message]) -> None:
    if not conversation:
        raise ValueError("the conversation is empty; pass a list of {'role', 'content'} messages")
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} of the conversation is {message!r}; each message needs 'role' and "
                             "'content' keys")


def render(tokenizer, conversation: Sequence[Message], *, template: bool = True,
           generation_prompt: bool = False) -> str:
    """The conversation as text: the chat template, or the contents joined by newlines.

    Raises:
      ValueError: ``template=True`` and the tokenizer has no chat template.
    """
    _check(conversation)
    if not template:
        return "\n".join(m["content"] for m in conversation)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no chat template; pass template=False "
                         "or a tokenizer with one (tokenizer.chat_template)")
    return tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=generation_prompt)


def encode_conversation(tokenizer, conversation: Sequence[Message], *, template: bool = True,
                        generation_prompt: bool = False) -> EncodedConversation:
    """Token ids, user-token mask and content spans of ``conversation``.

    Args:
      tokenizer: a fast (Rust) tokenizer: character offsets locate the content tokens.
      conversation: ``[{"role": ..., "content": ...}, ...]``.
      template: apply the tokenizer's chat template (else join the contents by newlines).
      generation_prompt: end with the assistant header (the prompt for generation).

    Raises:
      ValueError: no chat template when one is asked for, a slow tokenizer, or a message whose
        content the template changed so that it cannot be found in the rendered text.
    """
    text = render(tokenizer, conversation, template=template, generation_prompt=generation_prompt)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("encode_conversation needs a fast tokenizer (character offsets); load one with "
                         "transformers' AutoTokenizer (use_fast=True)")
    spans, cursor = [], 0
    for message in conversation:
        start = text.find(message["content"], cursor)
        if start < 0:
            raise ValueError(f"the chat template changed the content of a {message['role']} message; cannot "
                             f"locate {message['content'][:40]!r} in the rendered conversation")
        cursor = start + len(message["content"])
        spans.append((message["role"], start, cursor))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], np.int32)
    offsets = np.asarray(encoded["offset_mapping"], np.int64).reshape(-1, 2)
    user_mask = np.zeros(len(ids), np.int32)
    turns = []
    for role, start, end in spans:
        inside = (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
        where = np.flatnonzero(inside)
        first, last = (int(where[0]), int(where[-1]) + 1) if len(where) else (0, 0)
        turns.append((role, first, last))
        if role == "user":
            user_mask[where] = 1
    return EncodedConversation(ids, user_mask, tuple(turns))


def left_pad(rows: Sequence[np.ndarray], length: int | None = None, pad_id: int = 0) -> tuple[np.ndarray, ...]:
    """Left-pads 1-D rows into ``[n, length]`` (default: the longest row); returns ``(array, mask)``."""
    length = max(len(r) for r in rows) if length is None else length
    out = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        if len(row):
            out[i, length - len(row):], mask[i, length - len(row):] = row, 1
    return out, mask
