"""Does LoRA SFT on the pool teach metafit-small-lm the unseen families? (the check before the DELIFT grid)

Initial / Full / Random-30 % on the instruction use case's seed-0 sets (the grid's pool: 100 pairs by default, the
configs' uneven mix; its 36 held-out pairs), for a few SFT settings; prints the training loss every
quarter of the run, exact match overall and per family, and the first answers::

    PYTHONPATH=. python paper_repro/delift/diagnose_sft.py '[[60, 0.01, ["q_proj", "v_proj"], ["initial", "full"]]]'
    # another model and pool size (the smollm2 scale): settings, then model, n_pool, n_eval
    PYTHONPATH=. python paper_repro/delift/diagnose_sft.py '[[30, 0.001, ["q_proj", "v_proj"], ["full"]]]' smollm2-135m-instruct 60 36

Each setting is ``[steps, lr, lora targets, arms]``; batch 16, AdamW, cosine, warm-up steps // 10, clipping
at 1, LoRA rank 8 / alpha 16, as the configs. The random subset here is a numpy permutation (seed 0), not
the grid's ``random`` arm. Measured numbers: paper_repro/delift/README.md.
"""
import collections
import json
import sys
import time

import jax
import numpy as np
from flax import nnx

from metafit import peft
from metafit.data.batching import epoch_batches
from metafit.data.instructions import encode_sft
from metafit.data.unseen_instructions import make_unseen
from metafit.models import load
from metafit.train import TrainConfig, fit
from metafit.train.lm_eval import greedy_answers
from metafit.train.losses import next_token_loss

TASKS = ("opposite", "capital", "sound", "colour", "bracket", "twice")
MIX = (0.35, 0.25, 0.15, 0.1, 0.1, 0.05)  # configs/select/delift_*.yaml


def train_and_score(model, tokenizer, train, evaluate, steps, lr, targets, seed=0):
    model = nnx.clone(model)
    if train:
        peft.apply(model, peft.LoraConfig(rank=8, alpha=16.0, targets=tuple(targets)), rngs=nnx.Rngs(seed))
        graphdef, params = nnx.split(model)
        config = TrainConfig(steps=steps, batch_size=min(16, len(train)), lr=lr, optimizer="adamw", schedule="cosine",
                             warmup_steps=max(1, steps // 10), clip_norm=1.0, log_every=max(1, steps // 4),
                             eval_every=0, ckpt_every=0)
        data = epoch_batches(encode_sft(tokenizer, train, (64,)), config.batch_size, seed)
        result = fit(next_token_loss(graphdef), params, data, config, key=jax.random.key(seed),
                     trainable=peft.trainable_mask(params), progress=False)
        nnx.update(model, result.params)
        print("  loss", [round(h["loss"], 3) for h in result.history], flush=True)
    answers = greedy_answers(model, tokenizer, [e.prompt for e in evaluate], 8, 64)
    hits = [a.strip() == e.response for a, e in zip(answers, evaluate)]
    per_family = collections.defaultdict(list)
    for hit, e in zip(hits, evaluate):
        per_family[e.task].append(hit)
    return float(np.mean(hits)), {k: round(float(np.mean(v)), 2) for k, v in per_family.items()}, answers[:6]


def main(settings, model_name="metafit-small-lm", n_pool=100, n_eval=36):
    pool = make_unseen(n_pool, seed=0, tasks=TASKS, mix=MIX)
    evaluate = make_unseen(n_eval, seed=0, tasks=TASKS, offset=2_000_000)  # study.use_case_sets' evaluation set
    print("pool", dict(collections.Counter(p.task for p in pool)), "distinct prompts", len({p.prompt for p in pool}))
    model, tokenizer = load(model_name)
    random = np.random.default_rng(0).permutation(n_pool)[:round(0.3 * n_pool)]
    subsets = {"initial": [], "full": pool, "random": [pool[i] for i in random]}
    for steps, lr, targets, arms in settings:
        for arm in arms:
            start = time.time()
            scores = train_and_score(model, tokenizer, subsets[arm], evaluate, steps, lr, targets)
            print(arm, steps, lr, targets, scores, f"{time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), *sys.argv[2:3], *map(int, sys.argv[3:5]))
