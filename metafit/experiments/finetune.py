"""LoRA supervised fine-tuning of a causal LM on metafit's generated instruction set or your own file.

``data: my.jsonl`` (or ``.csv``, or a ``datasets`` folder) trains on your rows instead
(:mod:`metafit.data.sft_files`: chat rows or prompt/response fields, loss on assistant tokens);
``n_eval`` rows are held out by a permutation of the seed. Exact match is scored when every
held-out row is one user -> assistant exchange.

Chat-formatted examples, loss on response tokens only
(:func:`metafit.train.losses.next_token_loss`), sequences bucketed to a few fixed lengths,
training through :func:`metafit.train.fit` with only the LoRA weights trainable; eval loss and
greedy exact match (:func:`metafit.train.lm_eval.exact_match`) before and after; the adapter is
exported in the HF PEFT format (``adapter/``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from metafit import peft
from metafit.data.batching import epoch_batches
from metafit.data.instructions import encode_sft, make_instructions
from metafit.data.sft_files import as_instructions, encode_chats, sft_file_split
from metafit.experiments import RunConfig, experiment, plot_curves
from metafit.models import load
from metafit.parallel import make_mesh, shard_params
from metafit.runs import RunDir
from metafit.train import fit
from metafit.train.lm_eval import exact_match
from metafit.train.losses import next_token_loss


@dataclass(frozen=True)
class FinetuneArgs:
    """Options of LoRA SFT.

    Attributes:
      model: embedded name, HF folder or GGUF file (see :func:`metafit.models.load`).
      lora: the LoRA settings (rank, alpha, target module patterns, ...).
      data: your SFT rows (``.jsonl``, ``.csv`` or a ``save_to_disk`` folder); empty = generated
        instructions.
      prompt_field: the prompt's field in prompt/response rows of ``data`` (chat rows use ``messages``).
      response_field: the response's field in prompt/response rows of ``data``.
      n_train: generated training instructions (with ``data``: every row not held out).
      n_eval: held-out rows for eval loss and exact match.
      tasks: instruction tasks to draw from (empty = all; see ``metafit list``).
      buckets: padded sequence lengths (one compilation each).
      max_new_tokens: generation budget for exact match.
      export_adapter: write ``adapter/`` in the HF PEFT format.
    """

    model: str = "smollm2-135m-instruct"
    lora: peft.LoraConfig = field(default_factory=lambda: peft.LoraConfig(rank=8, alpha=16.0,
                                                                          targets=("q_proj", "v_proj")))
    data: str = ""
    prompt_field: str = "prompt"
    response_field: str = "response"
    n_train: int = 384
    n_eval: int = 48
    tasks: tuple[str, ...] = ()
    buckets: tuple[int, ...] = (64, 96, 128)
    max_new_tokens: int = 8
    export_adapter: bool = True


@experiment("lora_sft", config=FinetuneArgs, validate=lambda cfg: cfg.args.data and sft_file_split(
    cfg.args.data, cfg.args.n_eval, cfg.seed, batch_size=cfg.train.batch_size, prompt_field=cfg.args.prompt_field,
    response_field=cfg.args.response_field))
def lora_sft(cfg: RunConfig, run: RunDir) -> dict:
    """LoRA SFT with eval loss and exact match before/after and the adapter exported."""
    args = cfg.args
    model, tokenizer = load(args.model)
    if args.data:  # your own rows; n_eval of them held out
        train_chats, eval_chats = sft_file_split(args.data, args.n_eval, cfg.seed, prompt_field=args.prompt_field,
                                                 response_field=args.response_field)
        train_arrays, eval_arrays = (encode_chats(tokenizer, c, args.buckets) for c in (train_chats, eval_chats))
        eval_set = as_instructions(eval_chats)  # None unless every held-out row is one exchange
    else:
        tasks = args.tasks or None
        train_set = make_instructions(args.n_train, seed=cfg.seed, tasks=tasks)
        eval_set = make_instructions(args.n_eval, seed=cfg.seed, tasks=tasks, offset=args.n_train)
        train_arrays, eval_arrays = (encode_sft(tokenizer, e, args.buckets) for e in (train_set, eval_set))
    eval_batch = jax.tree.map(jnp.asarray, eval_arrays)

    peft.apply(model, args.lora, rngs=nnx.Rngs(cfg.seed))
    mesh = make_mesh(cfg.mesh)
    graphdef, params = nnx.split(model)
    # placed as fit places them, so the evaluations and generation before training and after it see
    # the same argument shardings and compile once
    params = shard_params(params, mesh)
    nnx.update(model, params)
    loss_fn = next_token_loss(graphdef)
    # the batch is an argument, not a constant baked into the program: runs of one model share the compile
    jit_loss = jax.jit(loss_fn)
    eval_loss = lambda p: jit_loss(p, eval_batch, None)[0]
    before = {"eval_loss": float(eval_loss(params)),
              **({} if eval_set is None else
                 {"exact_match": exact_match(model, tokenizer, eval_set, args.max_new_tokens, args.buckets[0])})}

    result = fit(loss_fn, params, epoch_batches(train_arrays, cfg.train.batch_size, cfg.seed), cfg.train,
                 key=jax.random.key(cfg.seed), workdir=run.checkpoint_dir("sft"),
                 eval_fn=lambda p: {"eval_loss": eval_loss(p)}, trainable=peft.trainable_mask(params),
                 mesh=mesh, log=run.metrics)
    nnx.update(model, result.params)
    after = {"eval_loss": result.eval["eval_loss"],
             **({} if eval_set is None else
                {"exact_match": exact_match(model, tokenizer, eval_set, args.max_new_tokens, args.buckets[0])})}
    if args.export_adapter:
        peft.export_hf_peft(model, run.path / "adapter", base_model_name_or_path=args.model)
    plot_curves(run.plot_path("sft_loss"), {
        "train loss": ([h["step"] for h in result.history], [h["loss"] for h in result.history]),
        "eval loss": ([e["step"] for e in result.evals], [e["eval_loss"] for e in result.evals]),
    }, xlabel="step", ylabel="response-token cross-entropy", title=f"LoRA SFT of {args.model}")
    return {"methods": {"base": before, "lora_sft": after}}
