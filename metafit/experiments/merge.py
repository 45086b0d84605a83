"""Merging experiments: ATM on eight digits tasks (``merge_atm``) and compatible
specialization with a tiny char-level GPT-2 (``merge_compatible``, second half of this file).

``merge_atm`` — eight tasks on one shared encoder, built from scikit-learn's digits:

====  =================================  =========
task  input                              label
====  =================================  =========
0     image                              digit (10)
1     image                              parity (2)
2     image                              digit >= 5 (2)
3     image                              digit mod 3 (3)
4     left-right flipped image           digit (10)
5     inverted intensities (1 − x)       digit (10)
6     image rotated by 90°               digit (10)
7     upside-down image                  digit (10)
====  =================================  =========

The "pre-trained" encoder (an MLP) is trained through the trainer on a proxy task
(upright digits 0–4 only). Each task's head is a linear probe fitted on the pre-trained
features and then frozen (the analogue of CLIP's zero-shot text heads); only the encoder
is fine-tuned and merged. Fixed split of the 1,797 images: 1,000 train, 300 validation,
497 test (a permutation from the seed).

Compared at budgets K (epochs per task): one-shot fine-tuning for K epochs then a merge
(TA with 1/T, TA / TIES / DARE / breadcrumbs with the coefficient tuned on validation),
PA-ATM (K rounds of 1 epoch, mean aggregation; optionally sum aggregation), PH-ATM (from the
tuned TA merge of the K_max-epoch fine-tunes, rounds on the validation split), joint
multi-task training for K epochs (upper bound), and the individually fine-tuned models (each
on its own task). Every fine-tune is a :func:`metafit.train.fit` run; the one-shot and joint
runs snapshot their parameters every epoch through ``eval_fn`` so one run serves every K.
The ATM rounds (PA, sum, PH) are checkpointed in ``checkpoints/{pa_atm,pa_atm_sum,ph_atm}``: a
rerun of the same run folder restores them and recomputes only the rest (a few seconds).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from metafit.experiments import RunConfig, experiment
from metafit.data.batching import epoch_batches
from metafit.merge import atm as atm_lib
from metafit.merge import merge, task_arithmetic
from metafit.models.mlp import MLP
from metafit.runs import RunDir, plot_curves
from metafit.train import fit

TASK_NAMES = ("digit", "parity", "ge5", "mod3", "flip_lr", "invert", "rot90", "flip_ud")
NUM_CLASSES = 10  # heads are padded to 10 outputs; unused classes get a -1e9 bias


@dataclass(frozen=True)
class ATMArgs:
    """Options of the ``merge_atm`` experiment.

    Attributes:
      hidden: encoder hidden widths; the last is the feature size.
      budgets: epoch budgets K compared (ATM runs max(K) rounds and reports each K on the way).
      pretrain_epochs: epochs of the proxy-task pre-training.
      ph_rounds: PH-ATM rounds on the validation split.
      scales: merge coefficients searched on validation for the tuned baselines.
      ties_density: TIES top-k fraction; dare_drop: DARE drop rate;
      breadcrumbs_density / breadcrumbs_gamma: breadcrumbs window (β = 0.85, γ = 0.993 in the paper).
      probe_c: inverse L2 strength of the logistic-regression heads (small = weaker zero-shot heads).
      atm_sum: also run PA-ATM with sum aggregation θ + Σ_t τ_t (one multi-task step per round, the
        identity's reading) beside the paper's mean θ + mean_t τ_t.
      num_tasks: use the first this many tasks of the table (8 in the paper-style run; fewer for smoke tests).
      train_size / val_size: split sizes (the rest is test).
    """

    hidden: tuple[int, ...] = (64, 16)
    budgets: tuple[int, ...] = (1, 2, 4, 6, 8, 10)
    pretrain_epochs: int = 20
    ph_rounds: int = 5
    scales: tuple[float, ...] = (0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)
    ties_density: float = 0.2
    dare_drop: float = 0.9
    breadcrumbs_density: float = 0.143
    breadcrumbs_gamma: float = 0.007
    probe_c: float = 0.05
    atm_sum: bool = True
    num_tasks: int = 8
    train_size: int = 1000
    val_size: int = 300


# ----------------------------------------------------------------------------- tasks


def digits_tasks(seed: int, train_size: int, val_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (x [T, n, 64], y [T, n])}`` for the eight tasks (a fixed permutation of the seed)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    label = digits.target.astype(np.int32)
    inputs = [images, images, images, images, images[:, :, ::-1], 1.0 - images, np.rot90(images, 1, axes=(1, 2)),
              images[:, ::-1, :]]
    labels = [label, label % 2, (label >= 5).astype(np.int32), label % 3, label, label, label, label]
    x = np.stack([i.reshape(len(label), -1) for i in inputs])
    y = np.stack(labels)
    order = np.random.default_rng(seed).permutation(len(label))
    cuts = {"train": order[:train_size], "validation": order[train_size:train_size + val_size],
            "test": order[train_size + val_size:]}
    return {split: (x[:, rows], y[:, rows]) for split, rows in cuts.items()}


def classes_of(task: int) -> int:
    return {1: 2, 2: 2, 3: 3}.get(task, 10)


def make_encoder(graphdef):
    return lambda params, x: jax.nn.relu(nnx.merge(graphdef, params)(x))


def fit_heads(features: np.ndarray, labels: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Frozen linear heads: a logistic-regression probe per task on pre-trained features."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    weights, biases = [], []
    for t in range(labels.shape[0]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # an approximate probe is still a fixed head
            probe = LogisticRegression(C=c, max_iter=300).fit(features[t], labels[t])
        w = np.zeros((features.shape[-1], NUM_CLASSES), np.float32)
        b = np.full(NUM_CLASSES, -1e9, np.float32)
        coef, icpt = probe.coef_, probe.intercept_
        if coef.shape[0] == 1:  # binary probes store one logit: use [−z/2, z/2]
            coef, icpt = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-icpt / 2, icpt / 2])
        w[:, probe.classes_] = coef.T
        b[probe.classes_] = icpt
        weights.append(w)
        biases.append(b)
    return np.stack(weights), np.stack(biases)


def task_loss(encode, head_w, head_b, task: int):
    """Cross-entropy of task ``task`` through its frozen head, as a trainer loss."""

    def loss_fn(params, batch, key):
        x, y = batch
        logits = encode(params, x) @ head_w[task] + head_b[task]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": (logits.argmax(-1) == y).mean()}

    return loss_fn


def joint_loss(encode, head_w, head_b):
    """Mean over tasks of each task's loss (batches carry all tasks: x [T, b, 64])."""

    def loss_fn(params, batch, key):
        x, y = batch
        logits = jax.vmap(lambda xt, w, b: encode(params, xt) @ w + b)(x, head_w, head_b)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {}

    return loss_fn


def task_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
    """``batch_at(step)`` over all tasks at once: the same shuffled rows for every task."""
    stream = epoch_batches((np.moveaxis(x, 1, 0), y.T), batch_size, seed)
    return lambda step: (lambda xb, yb: (np.moveaxis(xb, 0, 1), yb.T))(*stream(step))


# ----------------------------------------------------------------------------- experiment


@experiment("merge_atm", config=ATMArgs)
def merge_atm(cfg: RunConfig, run: RunDir) -> dict:
    """Budget-matched comparison of ATM with one-shot merges on eight digits tasks."""
    started = time.perf_counter()
    args, train = cfg.args, cfg.train
    data = {split: (x[:args.num_tasks], y[:args.num_tasks])
            for split, (x, y) in digits_tasks(cfg.seed, args.train_size, args.val_size).items()}
    x_tr, y_tr = data["train"]
    num_tasks = x_tr.shape[0]
    key = jax.random.key(cfg.seed)
    per_epoch = args.train_size // train.batch_size

    # Pre-training on the proxy task (upright digits 0-4), through the trainer.
    model = MLP(64, args.hidden[:-1], args.hidden[-1], rngs=nnx.Rngs(cfg.seed))
    graphdef, params0 = nnx.split(model, nnx.Param)
    encode = make_encoder(graphdef)
    proxy_rows = np.nonzero(y_tr[0] < 5)[0]
    head_def, head_params = nnx.split(nnx.Linear(args.hidden[-1], 5, rngs=nnx.Rngs(cfg.seed + 1)), nnx.Param)
    proxy_params = {"encoder": params0, "head": head_params}

    def proxy_loss(p, batch, key):
        x, y = batch
        logits = nnx.merge(head_def, p["head"])(encode(p["encoder"], x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), {}

    proxy_steps = args.pretrain_epochs * max(1, len(proxy_rows) // train.batch_size)
    pre = fit(proxy_loss, proxy_params, epoch_batches((x_tr[0, proxy_rows], y_tr[0, proxy_rows]), train.batch_size, cfg.seed),
              dataclasses.replace(train, steps=proxy_steps, log_every=proxy_steps), key=jax.random.fold_in(key, 0),
              progress=False, name="pretrain", log=run.metrics)
    base = pre.params["encoder"]

    features = lambda p, x: np.asarray(jax.vmap(functools.partial(encode, p))(jnp.asarray(x)))
    head_w, head_b = fit_heads(features(base, x_tr), y_tr, args.probe_c)
    head_w, head_b = jnp.asarray(head_w), jnp.asarray(head_b)

    @jax.jit
    def accuracies(p, x, y):
        logits = jax.vmap(lambda xt, w, b: encode(p, xt) @ w + b)(x, head_w, head_b)
        return (logits.argmax(-1) == y).mean(axis=1)

    split_acc = {s: functools.partial(accuracies, x=jnp.asarray(v[0]), y=jnp.asarray(v[1])) for s, v in data.items()}
    val_score = lambda p: float(split_acc["validation"](p).mean())
    test_acc = lambda p: 100.0 * float(split_acc["test"](p).mean())

    losses = [task_loss(encode, head_w, head_b, t) for t in range(num_tasks)]
    streams = [epoch_batches((x_tr[t], y_tr[t]), train.batch_size, cfg.seed + 10 + t) for t in range(num_tasks)]

    def finetune_for(epochs: int, streams_, snapshots: dict | None = None):
        def finetune(p, task, round_index, k):
            steps = epochs * per_epoch
            kept = []
            eval_fn = None
            if snapshots is not None:
                eval_fn = lambda q: (kept.append(jax.tree.map(jnp.copy, q)), {})[1]  # the trainer donates its buffers
            result = fit(losses[task], p, streams_[task],
                         dataclasses.replace(train, steps=steps, log_every=steps,
                                             eval_every=per_epoch if snapshots is not None else 0),
                         key=k, eval_fn=eval_fn, progress=False, name=f"task{task}_round{round_index}")
            if snapshots is not None:
                snapshots[task] = kept  # params after each epoch (the last eval is the final params)
            return result.params
        return finetune

    # One-shot fine-tuning for max(K) epochs, snapshotting every epoch: every budget at once.
    k_max = max(args.budgets)
    snapshots: dict[int, list] = {}
    atm_lib.one_shot(base, finetune_for(k_max, streams, snapshots), num_tasks, key=jax.random.fold_in(key, 1))
    at_budget = {k: [snapshots[t][k - 1] for t in range(num_tasks)] for k in args.budgets}

    methods = {
        "TA (1/T)": lambda b, fts, s: task_arithmetic(b, fts, 1.0 / len(fts)),
        "TA (tuned)": lambda b, fts, s: task_arithmetic(b, fts, s),
        "TIES (tuned)": lambda b, fts, s: merge("ties", b, fts, density=args.ties_density, scale=s),
        "DARE (tuned)": lambda b, fts, s: merge("dare_linear", b, fts, drop_rate=args.dare_drop, scale=s,
                                                 key=jax.random.fold_in(key, 2)),
        "Breadcrumbs (tuned)": lambda b, fts, s: merge("breadcrumbs", b, fts, density=args.breadcrumbs_density,
                                                        gamma=args.breadcrumbs_gamma, scale=s),
    }
    table: dict[str, dict[str, float]] = {}
    chosen: dict[str, float] = {}
    for name, build in methods.items():
        row = {}
        for k in args.budgets:
            if name == "TA (1/T)":
                merged = build(base, at_budget[k], None)
            else:
                scale, merged, _ = atm_lib.tune_scale(lambda s: build(base, at_budget[k], s), args.scales, val_score)
                chosen[f"{name} K={k}"] = scale
            row[f"K={k}"] = test_acc(merged)
        table[name] = row

    # PA-ATM: K_max rounds of one epoch, mean aggregation; round k is budget k.
    atm_result = atm_lib.atm(base, finetune_for(1, streams), num_tasks, k_max, key=jax.random.fold_in(key, 3),
                             checkpoint_dir=run.checkpoint_dir("pa_atm"))
    table["PA-ATM"] = {f"K={k}": test_acc(atm_result.rounds[k - 1]) for k in args.budgets}
    if args.atm_sum:
        summed = atm_lib.atm(base, finetune_for(1, streams), num_tasks, k_max, key=jax.random.fold_in(key, 3),
                             aggregate=lambda b, fts: task_arithmetic(b, fts, 1.0),
                             checkpoint_dir=run.checkpoint_dir("pa_atm_sum"))
        table["PA-ATM (sum)"] = {f"K={k}": test_acc(summed.rounds[k - 1]) for k in args.budgets}

    # PH-ATM: from the tuned TA merge of the K_max-epoch fine-tunes, rounds on the validation split.
    x_val, y_val = data["validation"]
    val_streams = [epoch_batches((x_val[t], y_val[t]), min(train.batch_size, args.val_size), cfg.seed + 20 + t)
                   for t in range(num_tasks)]
    _, ta_merge, _ = atm_lib.tune_scale(lambda s: task_arithmetic(base, at_budget[k_max], s), args.scales, val_score)
    ph_epoch = max(1, args.val_size // min(train.batch_size, args.val_size))

    def ph_finetune(p, task, round_index, k):
        steps = ph_epoch
        return fit(losses[task], p, val_streams[task], dataclasses.replace(train, steps=steps, log_every=steps),
                   key=k, progress=False, name=f"ph_task{task}").params

    ph = atm_lib.atm(ta_merge, ph_finetune, num_tasks, args.ph_rounds, key=jax.random.fold_in(key, 4),
                     checkpoint_dir=run.checkpoint_dir("ph_atm"))
    ph_curve = [test_acc(ta_merge)] + [test_acc(p) for p in ph.rounds]

    # Joint multi-task training for K epochs (snapshots per epoch), the upper bound.
    joint_snaps: list = []
    fit(joint_loss(encode, head_w, head_b), base, task_batches(x_tr, y_tr, train.batch_size, cfg.seed + 30),
        dataclasses.replace(train, steps=k_max * per_epoch, log_every=per_epoch, eval_every=per_epoch),
        key=jax.random.fold_in(key, 5), eval_fn=lambda q: (joint_snaps.append(jax.tree.map(jnp.copy, q)), {})[1], progress=False,
        name="joint", log=run.metrics)
    table["Joint multi-task"] = {f"K={k}": test_acc(joint_snaps[k - 1]) for k in args.budgets}

    # Individually fine-tuned experts, each evaluated on its own task (the usual "fine-tuned" row).
    test_x, test_y = jnp.asarray(data["test"][0]), jnp.asarray(data["test"][1])
    own = lambda fts: 100.0 * float(np.mean([accuracies(fts[t], test_x, test_y)[t] for t in range(num_tasks)]))
    table["Individual experts (own task)"] = {f"K={k}": own(at_budget[k]) for k in args.budgets}

    zero_shot = test_acc(base)
    budgets = list(args.budgets)
    plot_curves(run.plot_path("atm_vs_budget"), {
        name: (budgets, [row[f"K={k}"] for k in budgets]) for name, row in table.items()
    }, xlabel="budget K (epochs per task)", ylabel="average test accuracy (%)", title="8 digits tasks")
    plot_curves(run.plot_path("ph_atm"), {"PH-ATM": (list(range(args.ph_rounds + 1)), ph_curve)},
                xlabel="PH-ATM round (0 = tuned TA)", ylabel="average test accuracy (%)")
    run.log({"zero_shot": zero_shot, "ph_curve": ph_curve, "chosen_scales": chosen,
             "seconds": time.perf_counter() - started}, step=0, stage="summary")
    table["PH-ATM (rounds on validation)"] = {f"round={r}": v for r, v in enumerate(ph_curve)}
    table["Zero-shot (frozen heads on pre-trained encoder)"] = {"K=0": zero_shot}
    return {"methods": table}


# ============================================================================= compatible specialization

CHARS = "0123456789+=.CAMT"
TOKEN = {c: i for i, c in enumerate(CHARS)}
SEQ_LEN = 11  # every task string below has 11 characters
ANSWER_FROM = {"C": 6, "M": 6, "A": 7, "T": 7}  # index of the first answer character


def digit_map(digits: np.ndarray) -> np.ndarray:
    """The "map" skill: each digit d -> (d + 4) mod 10."""
    return (digits + 4) % 10


def char_tasks(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [n, 11], loss_mask [n, 10])`` of one task family; the mask marks answer targets.

    C (copy)  ``C3917=3917.``      M (map)     ``M3917=7351.``   (each digit + 4 mod 10)
    A (add)   ``A23+45=068.``      T (target)  ``T23+45=402.``   (map of the sum: needs both skills)
    """
    rng = np.random.default_rng(seed)
    if kind in "CM":
        d = rng.integers(0, 10, (n, 4))
        answer = d if kind == "C" else digit_map(d)
        text = [f"{kind}{''.join(map(str, a))}={''.join(map(str, b))}." for a, b in zip(d, answer)]
    else:
        a, b = rng.integers(0, 100, n), rng.integers(0, 100, n)
        total = np.stack([(a + b) // 100, (a + b) // 10 % 10, (a + b) % 10], axis=1)
        answer = total if kind == "A" else digit_map(total)
        text = [f"{kind}{x:02d}+{y:02d}={''.join(map(str, s))}." for x, y, s in zip(a, b, answer)]
    tokens = np.array([[TOKEN[c] for c in t] for t in text], np.int32)
    mask = np.zeros((n, SEQ_LEN - 1), np.float32)
    mask[:, ANSWER_FROM[kind] - 1:] = 1.0  # target position j predicts token j + 1
    return tokens, mask


def char_stream(kinds: str, batch_size: int, seed: int):
    """``batch_at(step)``: a fresh batch of a mixture of task kinds (a pure function of the step)."""
    def batch_at(step: int):
        parts = [char_tasks(k, batch_size // len(kinds), seed * 100_003 + step * 7 + i) for i, k in enumerate(kinds)]
        return tuple(np.concatenate(p) for p in zip(*parts))
    return batch_at


def answer_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over answer positions."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return jnp.sum(ce * mask) / jnp.sum(mask)


@dataclass(frozen=True)
class CompatibleArgs:
    """Options of the ``merge_compatible`` experiment.

    Attributes:
      n_embd / n_layer / n_head: the tiny char-level GPT-2.
      pretrain_steps: steps on the copy/add/map mixture; expert_steps: MLP-only steps per expert.
      snapshot_every: expert checkpoints kept for CKA vs step (early = first, late = last).
      router_steps / router_lr: router training on the target task (only the routers train).
      windows: multi-layer routing windows n (n = 1 is per-layer routing).
      alphas: activation / weight interpolation coefficients.
      eval_size: held-out target examples.
    """

    n_embd: int = 64
    n_layer: int = 4
    n_head: int = 4
    pretrain_steps: int = 600
    expert_steps: int = 600
    expert_lr: float = 3e-3
    snapshot_every: int = 100
    router_steps: int = 300
    router_lr: float = 5e-3
    windows: tuple[int, ...] = (1, 2, 3, 4)
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    eval_size: int = 512


@experiment("merge_compatible", config=CompatibleArgs)
def merge_compatible(cfg: RunConfig, run: RunDir) -> dict:
    """Compatible specialization: CKA vs step, interpolation early vs late, per-/multi-layer routing."""
    from metafit.merge import cka, linear
    from metafit.merge import routing
    from metafit.merge.methods import leaf_name
    from metafit.models.gpt2 import GPT2Config, GPT2LMHeadModel

    started = time.perf_counter()
    args, train = cfg.args, cfg.train
    key = jax.random.key(cfg.seed)
    gpt_cfg = GPT2Config(vocab_size=len(CHARS), n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                         n_positions=SEQ_LEN, activation_function="gelu_new")
    graphdef, params = nnx.split(GPT2LMHeadModel(gpt_cfg, rngs=nnx.Rngs(cfg.seed)), nnx.Param)

    def lm_loss(p, batch, k):
        tokens, mask = batch
        return answer_loss(nnx.merge(graphdef, p)(tokens), tokens, mask), {}

    def copy_tree(q):
        return jax.tree.map(jnp.copy, q)  # the trainer donates its buffers

    base = fit(lm_loss, params, char_stream("CCAM", train.batch_size, cfg.seed),
               dataclasses.replace(train, steps=args.pretrain_steps, log_every=100), key=jax.random.fold_in(key, 0),
               progress=False, name="pretrain", log=run.metrics).params

    # Experts: only MLP weights train (the paper's setting), snapshots for CKA vs step.
    mlp_only = jax.tree_util.tree_map_with_path(lambda path, _: ".mlp." in f".{leaf_name(path)}.", base)
    experts: dict[str, list] = {}
    for i, (name, kind) in enumerate([("add", "A"), ("map", "M")]):
        snaps: list = []
        fit(lm_loss, base, char_stream(kind, train.batch_size, cfg.seed + 1 + i),
            dataclasses.replace(train, steps=args.expert_steps, lr=args.expert_lr, log_every=100,
                                eval_every=args.snapshot_every),
            key=jax.random.fold_in(key, 1 + i), trainable=mlp_only, progress=False, name=f"expert_{name}",
            eval_fn=lambda q: (snaps.append(copy_tree(q)), {})[1], log=run.metrics)
        experts[name] = snaps
    steps = [args.snapshot_every * (j + 1) for j in range(len(experts["add"]))]

    evals = {kind: tuple(map(jnp.asarray, char_tasks(kind, args.eval_size, 10_000 + i))) for i, kind in enumerate("AMT")}
    probe = jnp.concatenate([evals["A"][0][:128], evals["M"][0][:128], evals["T"][0][:128]])

    @jax.jit
    def hidden_states(p):
        return routing.forward(nnx.merge(graphdef, p), probe)[1]

    # CKA between the two experts, layer by layer, at matched steps (step 0 = the shared base: CKA 1).
    base_h = hidden_states(base)
    cka_rows = {f"layer{l}": [float(cka(base_h[l].reshape(-1, args.n_embd), base_h[l].reshape(-1, args.n_embd)))]
                for l in range(args.n_layer)}
    for a, b in zip(experts["add"], experts["map"]):
        ha, hb = hidden_states(a), hidden_states(b)
        for l in range(args.n_layer):
            cka_rows[f"layer{l}"].append(float(cka(ha[l].reshape(-1, args.n_embd), hb[l].reshape(-1, args.n_embd))))

    def model_of(p):
        return nnx.merge(graphdef, p)

    plain = jax.jit(lambda p, tokens, mask: answer_loss(routing.forward(model_of(p), tokens)[0], tokens, mask))
    results: dict[str, dict[str, float]] = {}
    results["base"] = {"target_loss": float(plain(base, *evals["T"]))}
    for name in experts:
        results[f"expert {name} (late)"] = {
            "target_loss": float(plain(experts[name][-1], *evals["T"])),
            "add_loss": float(plain(experts[name][-1], *evals["A"])),
            "map_loss": float(plain(experts[name][-1], *evals["M"])),
        }

    @jax.jit
    def act_interp_loss(pa, pb, alpha, tokens, mask):
        a, b = model_of(pa), model_of(pb)
        mlp_fn = routing.interpolate_activations(routing.expert_mlps([a, b]), alpha)
        return answer_loss(routing.forward(a, tokens, mlp_fn)[0], tokens, mask)

    stages = {"early": 0, "late": len(steps) - 1}
    for stage, j in stages.items():
        pa, pb = experts["add"][j], experts["map"][j]
        for a in args.alphas:
            results[f"activation interp {stage} (step {steps[j]}) alpha={a:g}"] = {
                "target_loss": float(act_interp_loss(pa, pb, a, *evals["T"]))}
        for a in args.alphas:
            results[f"weight interp {stage} (step {steps[j]}) alpha={a:g}"] = {
                "target_loss": float(plain(linear([pa, pb], [a, 1.0 - a]), *evals["T"]))}

    # Routing: only the routers train, on the target task, experts frozen (closed over).
    def train_routers(pa, pb, n: int, stage: str) -> float:
        a, b = model_of(pa), model_of(pb)
        mlps = routing.expert_mlps([a, b])
        router_def, router_params = nnx.split(routing.Routers(args.n_layer, args.n_embd, 2 * n, rngs=nnx.Rngs(0)),
                                              nnx.Param)

        def loss_fn(rp, batch, k):
            tokens, mask = batch
            mlp_fn = routing.routed(nnx.merge(router_def, rp), mlps, n, k=2 * n)
            return answer_loss(routing.forward(a, tokens, mlp_fn)[0], tokens, mask), {}

        result = fit(loss_fn, router_params, char_stream("T", train.batch_size, cfg.seed + 50 + n),
                     dataclasses.replace(train, steps=args.router_steps, lr=args.router_lr, log_every=100),
                     key=jax.random.fold_in(key, 50 + n), progress=False, name=f"router_{stage}_n{n}", log=run.metrics)
        return float(jax.jit(loss_fn)(result.params, evals["T"], None)[0])

    for stage, j in stages.items():
        for n in (args.windows if stage == "late" else args.windows[:1]):
            label = "per-layer routing" if n == 1 else f"multi-layer routing n={n}"
            results[f"{label} {stage} (step {steps[j]})"] = {
                "target_loss": train_routers(experts["add"][j], experts["map"][j], n, stage)}

    plot_curves(run.plot_path("cka_vs_step"), {name: ([0] + steps, values) for name, values in cka_rows.items()},
                xlabel="expert fine-tuning step", ylabel="linear CKA (add vs map expert)",
                title="CKA between experts, per layer")
    for l, values in cka_rows.items():
        results[f"CKA {l}"] = {"cka_step0": values[0], f"cka_early": values[1], "cka_late": values[-1]}
    (run.path / "cka.json").write_text(json.dumps({"steps": [0] + steps, **cka_rows}, indent=1))
    run.log({"seconds": time.perf_counter() - started}, step=0, stage="summary")
    return {"methods": results}
