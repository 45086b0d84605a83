"""Byte-level BPE tokenizers trained here with ``tokenizers``, with chat role tokens and a template.

:func:`train_chat_tokenizer` learns a byte-level BPE vocabulary from texts and wraps it as a
transformers fast tokenizer, so ``tokenizer.apply_chat_template``, ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` and metafit's :func:`~metafit.data.instructions.chat_prompt` /
:func:`~metafit.data.instructions.encode_sft` work unchanged.

Choices (and why):

* byte-level, so every string round-trips (no unknown token) -- the alphabet is the 256 bytes;
* the GPT-2 pre-tokenisation regex with one change: a number is split into single digits
  (``" 123"`` -> ``" 1"``, ``"2"``, ``"3"``), as in Llama 3 / SmolLM2, so arithmetic sees every
  digit as a token instead of arbitrary merged chunks;
* one special token per role (:data:`CHAT_TOKENS`), so a role marker is a single position that
  attention steering and role-conditioned methods can address, and an end-of-turn token that is
  also ``eos_token``: :func:`~metafit.data.instructions.encode_sft` appends ``eos_token`` to the
  response and :func:`metafit.models.generate` stops on it;
* the chat template renders ``<|bos|>`` then ``<|role|>content<|end|>`` per message and, with
  ``add_generation_prompt``, ``<|assistant|>``. Every boundary is a special token, so rendering a
  conversation whole or prompt and response separately gives the same token ids.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple


class ChatTokens(NamedTuple):
    """The special tokens, in id order (ids 0..6 in a trained tokenizer)."""

    pad: str = "<|pad|>"
    bos: str = "<|bos|>"
    end_of_text: str = "<|endoftext|>"  # ends a plain-text document
    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end_of_turn: str = "<|end|>"  # ends a message; the tokenizer's eos_token


CHAT_TOKENS = ChatTokens()
SPECIAL_IDS = {name: i for i, name in enumerate(ChatTokens._fields)}
"""Id of each special token in every tokenizer :func:`train_chat_tokenizer` returns (``bos`` -> 1)."""
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant; got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + CHAT_TOKENS.end_of_turn + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + CHAT_TOKENS.assistant + "' }}{% endif %}"
)

# GPT-2's pattern with ` ?\p{N}` (one digit) instead of ` ?\p{N}+`.
PRETOKENIZE_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
                         model_max_length: int = 2048):
    """A byte-level BPE chat tokenizer learned from ``texts``.

    Args:
      texts: training text (documents and message contents; no special tokens needed).
      vocab_size: target vocabulary size including the 256 bytes and :data:`CHAT_TOKENS`; a
        small corpus may yield fewer merges (``len(tokenizer)`` is the real size).
      min_frequency: a pair must occur this often to be merged.
      model_max_length: the context length the tokenizer reports (the model's).

    Returns:
      A ``transformers.PreTrainedTokenizerFast`` with ``bos/eos/pad`` tokens, the role tokens as
      extra special tokens and :data:`CHAT_TEMPLATE`. It adds no special tokens on its own
      (``add_special_tokens`` has nothing to add): documents and the chat template do.

    Example:
      >>> tok = train_chat_tokenizer(["the cat sat on the mat"] * 10, 300)
      >>> tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
      '<|bos|><|user|>hi<|end|>'
    """
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(CHAT_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=CHAT_TOKENS.bos,
        eos_token=CHAT_TOKENS.end_of_turn,
        pad_token=CHAT_TOKENS.pad,
        extra_special_tokens=[CHAT_TOKENS.end_of_text, CHAT_TOKENS.system, CHAT_TOKENS.user, CHAT_TOKENS.assistant],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
