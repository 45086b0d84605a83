"""A tiny random Llama checkpoint with a real (trained) tokenizer and chat template, built offline."""
import os
import shutil
import tempfile
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_llama(directory: Path, texts: list[str], hidden: int = 32, layers: int = 2) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<unk>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE)
    config = LlamaConfig(vocab_size=fast.vocab_size if hasattr(fast, "vocab_size") else len(fast), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, initializer_range=0.2)
    config.vocab_size = len(fast)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return Path(directory)


def shared_tiny_llama() -> Path:
    """The tiny Llama of the instruction texts, built once per test run (the run's ``METAFIT_CACHE``).

    Every test module and xdist worker of the run reads the same folder instead of training a
    tokenizer and saving a model again; a worker that loses the race to build it uses the winner's.
    """
    from metafit.data.instructions import make_instructions

    folder = Path(os.environ["METAFIT_CACHE"]) / "tests" / "tiny_llama"
    if not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix="tiny_llama."))
        make_tiny_llama(staging, [f"{ex.prompt} {ex.response}" for ex in make_instructions(300, seed=0)])
        try:
            staging.rename(folder)
        except OSError:  # another worker finished first
            shutil.rmtree(staging, ignore_errors=True)
    return folder
