"""LoRA supervised fine-tuning of a causal LM on metafit's generated instruction set.

Chat-formatted examples, loss on response tokens only, sequences bucketed to a
few fixed lengths, training through :func:`metafit.train.fit` with only the LoRA
weights trainable; eval loss and greedy exact match before and after; the
adapter is exported in the HF PEFT format (``adapter/``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metafit import peft
from metafit.data.batching import epoch_batches
from metafit.data.instructions import Instruction, chat_prompt, encode_sft, make_instructions
from metafit.experiments import RunConfig, experiment, plot_curves
from metafit.models import generate, load
from metafit.parallel import make_mesh
from metafit.runs import RunDir
from metafit.train import fit
from metafit.train.losses import causal_lm_loss


@dataclass(frozen=True)
class FinetuneArgs:
    """Options of LoRA SFT.

    Attributes:
      model: embedded name, HF folder or GGUF file (see :func:`metafit.models.load`).
      lora: the LoRA settings (rank, alpha, target module patterns, ...).
      n_train: generated training instructions.
      n_eval: held-out instructions for eval loss and exact match.
      tasks: instruction tasks to draw from (empty = all; see ``metafit list``).
      buckets: padded sequence lengths (one compilation each).
      max_new_tokens: generation budget for exact match.
      export_adapter: write ``adapter/`` in the HF PEFT format.
    """

    model: str = "smollm2-135m-instruct"
    lora: peft.LoraConfig = field(default_factory=lambda: peft.LoraConfig(rank=8, alpha=16.0,
                                                                          targets=("q_proj", "v_proj")))
    n_train: int = 384
    n_eval: int = 48
    tasks: tuple[str, ...] = ()
    buckets: tuple[int, ...] = (64, 96, 128)
    max_new_tokens: int = 8
    export_adapter: bool = True


def sft_loss(graphdef: nnx.GraphDef):
    """Response-only next-token loss of the NNX causal LM ``graphdef``."""

    def loss_fn(params, batch, key):
        logits = nnx.merge(graphdef, params)(batch["input_ids"], batch["attention_mask"])
        loss, tokens = causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
        return loss, {"response_tokens": tokens}

    return loss_fn


def exact_match(model, tokenizer, examples: list[Instruction], max_new_tokens: int, bucket: int) -> float:
    """Share of examples whose greedy answer (up to the end-of-turn token) equals the response."""
    prompts = [tokenizer(chat_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"] for ex in examples]
    length = max(bucket, max(len(p) for p in prompts))
    ids = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):], mask[i, length - len(p):] = p, 1
    out = np.asarray(generate(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                              max_new_tokens=max_new_tokens))
    answers = tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
    return float(np.mean([a.strip() == ex.response for a, ex in zip(answers, examples)]))


@experiment("lora_sft", config=FinetuneArgs)
def lora_sft(cfg: RunConfig, run: RunDir) -> dict:
    """LoRA SFT with eval loss and exact match before/after and the adapter exported."""
    args = cfg.args
    model, tokenizer = load(args.model)
    tasks = args.tasks or None
    train_set = make_instructions(args.n_train, seed=cfg.seed, tasks=tasks)
    eval_set = make_instructions(args.n_eval, seed=cfg.seed, tasks=tasks, offset=args.n_train)
    train_arrays = encode_sft(tokenizer, train_set, args.buckets)
    eval_batch = jax.tree.map(jnp.asarray, encode_sft(tokenizer, eval_set, args.buckets))

    peft.apply(model, args.lora, rngs=nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model)
    loss_fn = sft_loss(graphdef)
    eval_loss = jax.jit(lambda p: loss_fn(p, eval_batch, None)[0])
    before = {"eval_loss": float(eval_loss(params)),
              "exact_match": exact_match(model, tokenizer, eval_set, args.max_new_tokens, args.buckets[0])}

    result = fit(loss_fn, params, epoch_batches(train_arrays, cfg.train.batch_size, cfg.seed), cfg.train,
                 key=jax.random.key(cfg.seed), workdir=run.checkpoint_dir("sft"),
                 eval_fn=lambda p: {"eval_loss": eval_loss(p)}, trainable=peft.trainable_mask(params),
                 mesh=make_mesh(cfg.mesh), log=run.metrics)
    nnx.update(model, result.params)
    after = {"eval_loss": result.eval["eval_loss"],
             "exact_match": exact_match(model, tokenizer, eval_set, args.max_new_tokens, args.buckets[0])}
    if args.export_adapter:
        peft.export_hf_peft(model, run.path / "adapter", base_model_name_or_path=args.model)
    plot_curves(run.plot_path("sft_loss"), {
        "train loss": ([h["step"] for h in result.history], [h["loss"] for h in result.history]),
        "eval loss": ([e["step"] for e in result.evals], [e["eval_loss"] for e in result.evals]),
    }, xlabel="step", ylabel="response-token cross-entropy", title=f"LoRA SFT of {args.model}")
    return {"methods": {"base": before, "lora_sft": after}}
