"""Merging experiments: ATM on eight digits tasks (``merge_atm``) and compatible
specialization with a tiny char-level GPT-2 (``merge_compatible``, second half of this file).

``merge_atm`` — the eight tasks of :func:`metafit.data.digits.multitask_digits` (digit, parity,
≥ 5, mod 3, and the digit from flipped, inverted, rotated and upside-down images) on one shared
encoder (:class:`metafit.models.mlp.MLP`), in the setting of :mod:`metafit.merge.heads`.

The "pre-trained" encoder is trained through the trainer on a proxy task (upright digits 0–4
only). Each task's head is a linear probe fitted on the pre-trained features and then frozen
(the analogue of CLIP's zero-shot text heads); only the encoder is fine-tuned and merged. Fixed
split of the 1,797 images: 1,000 train, 300 validation, 497 test (a permutation from the seed).

Compared at budgets K (epochs per task): one-shot fine-tuning for K epochs then a merge
(TA with 1/T, TA / TIES / DARE / breadcrumbs with the coefficient tuned on validation),
PA-ATM (K rounds of 1 epoch, mean aggregation; optionally sum aggregation), PH-ATM (from the
tuned TA merge of the K_max-epoch fine-tunes, rounds on the validation split), joint
multi-task training for K epochs (upper bound), and the individually fine-tuned models (each
on its own task). Every fine-tune is a :func:`metafit.train.fit` run; the one-shot and joint
runs keep their parameters every epoch through a :func:`metafit.train.param_snapshots`
callback, so one run serves every K. The ATM rounds (PA, sum, PH) are checkpointed in
``checkpoints/{pa_atm,pa_atm_sum,ph_atm}``: a rerun of the same run folder restores them and
recomputes only the rest (a few seconds).
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
from flax import nnx

from metafit.data.batching import epoch_batches, multitask_batches
from metafit.data.chars import CHARS, SEQ_LEN, char_stream, char_tasks
from metafit.data.digits import multitask_digits
from metafit.experiments import RunConfig, experiment
from metafit.merge import atm as atm_lib
from metafit.merge import heads, linear, merge, routing, task_arithmetic
from metafit.merge.similarity import layer_cka
from metafit.models.gpt2 import GPT2Config, GPT2LMHeadModel
from metafit.models.mlp import MLP
from metafit.runs import RunDir, plot_curves
from metafit.train import fit, param_snapshots, unstack
from metafit.train.losses import next_token_loss

NUM_CLASSES = 10  # heads are padded to 10 outputs


# Aggregations inside ATM beside the mean: (label, (args, T) -> aggregate(base, finetuned, key)).
ATM_AGGREGATORS = {
    "ties": ("PA-ATM (TIES aggregation)",
             lambda args, T: lambda b, fts, key: merge("ties", b, fts, density=args.ties_density, scale=1.0)),
    "dare": ("PA-ATM (DARE aggregation)",
             lambda args, T: lambda b, fts, key: merge("dare_linear", b, fts, drop_rate=args.dare_drop,
                                                        scale=1.0 / T, key=key)),
}


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
      atm_aggregators: other aggregations run inside PA-ATM beside the mean (``ties``: TIES with
        ``ties_density`` and its disjoint mean; ``dare``: DARE with ``dare_drop`` and scale 1/T, a fresh
        drop mask each round), each at the card's coefficient (no tuning, like the mean).
      num_tasks: use the first this many tasks of the table (8 in the paper-style run; fewer for smoke tests).
      train_size / val_size: split sizes (the rest is test).
    """

    hidden: tuple[int, ...] = (64, 16)
    budgets: tuple[int, ...] = (1, 2, 4, 6, 8, 10)
    pretrain_epochs: int = 20
    ph_rounds: int = 5
    scales: tuple[float, ...] = (0.005, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)
    ties_density: float = 0.2
    dare_drop: float = 0.9
    breadcrumbs_density: float = 0.143
    breadcrumbs_gamma: float = 0.007
    probe_c: float = 0.05
    atm_sum: bool = True
    atm_aggregators: tuple[str, ...] = ("ties", "dare")
    num_tasks: int = 8
    train_size: int = 1000
    val_size: int = 300

    def __post_init__(self):
        unknown = sorted(set(self.atm_aggregators) - set(ATM_AGGREGATORS))
        if unknown:
            raise ValueError(f"args.atm_aggregators: unknown {unknown}; choose from {sorted(ATM_AGGREGATORS)}")


@experiment("merge_atm", config=ATMArgs)
def merge_atm(cfg: RunConfig, run: RunDir) -> dict:
    """Budget-matched comparison of ATM with one-shot merges on eight digits tasks."""
    started = time.perf_counter()
    args, train = cfg.args, cfg.train
    data = multitask_digits(cfg.seed, args.train_size, args.val_size, args.num_tasks)
    x_tr, y_tr = data["train"]
    num_tasks = x_tr.shape[0]
    key = jax.random.key(cfg.seed)
    per_epoch = args.train_size // train.batch_size

    # Pre-training on the proxy task (upright digits 0-4), through the trainer.
    graphdef, params0 = nnx.split(MLP(64, args.hidden[:-1], args.hidden[-1], rngs=nnx.Rngs(cfg.seed)), nnx.Param)
    encode = heads.relu_encoder(graphdef)
    proxy_rows = np.nonzero(y_tr[0] < 5)[0]
    head_def, head_params = nnx.split(nnx.Linear(args.hidden[-1], 5, rngs=nnx.Rngs(cfg.seed + 1)), nnx.Param)
    proxy_steps = args.pretrain_epochs * max(1, len(proxy_rows) // train.batch_size)
    pre = fit(heads.linear_head_loss(encode, head_def), {"encoder": params0, "head": head_params},
              epoch_batches((x_tr[0, proxy_rows], y_tr[0, proxy_rows]), train.batch_size, cfg.seed),
              dataclasses.replace(train, steps=proxy_steps, log_every=proxy_steps), key=jax.random.fold_in(key, 0),
              progress=False, name="pretrain", log=run.metrics)
    base = pre.params["encoder"]

    head_w, head_b = heads.fit_probe_heads(heads.task_features(encode, base, x_tr), y_tr, c=args.probe_c,
                                           num_classes=NUM_CLASSES)
    head_w, head_b = jnp.asarray(head_w), jnp.asarray(head_b)
    accuracies = heads.task_accuracies(encode, head_w, head_b)
    split_acc = {s: functools.partial(accuracies, x=jnp.asarray(x), y=jnp.asarray(y)) for s, (x, y) in data.items()}
    val_score = lambda p: float(split_acc["validation"](p).mean())
    test_acc = lambda p: 100.0 * float(split_acc["test"](p).mean())

    loss = heads.task_loss(encode, head_w, head_b)  # one loss (one compiled step) for every task
    streams = [heads.with_task(epoch_batches((x_tr[t], y_tr[t]), train.batch_size, cfg.seed + 10 + t), t)
               for t in range(num_tasks)]
    specs = lambda epochs: [atm_lib.FinetuneSpec(loss, streams[t], epochs * per_epoch) for t in range(num_tasks)]

    # One-shot fine-tuning for max(K) epochs, snapshotting every epoch: every budget at once.
    k_max = max(args.budgets)
    snapshots = atm_lib.one_shot_snapshots(base, specs(k_max), train, every=per_epoch, key=jax.random.fold_in(key, 1))
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
    one_epoch = atm_lib.fit_finetune(specs(1), train)
    atm_result = atm_lib.atm(base, one_epoch, num_tasks, k_max, key=jax.random.fold_in(key, 3),
                             checkpoint_dir=run.checkpoint_dir("pa_atm"))
    table["PA-ATM"] = {f"K={k}": test_acc(atm_result.rounds[k - 1]) for k in args.budgets}
    if args.atm_sum:
        summed = atm_lib.atm(base, one_epoch, num_tasks, k_max, key=jax.random.fold_in(key, 3),
                             aggregate=lambda b, fts: task_arithmetic(b, fts, 1.0),
                             checkpoint_dir=run.checkpoint_dir("pa_atm_sum"))
        table["PA-ATM (sum)"] = {f"K={k}": test_acc(summed.rounds[k - 1]) for k in args.budgets}
    for aggregator in args.atm_aggregators:
        label, make = ATM_AGGREGATORS[aggregator]
        other = atm_lib.atm(base, one_epoch, num_tasks, k_max, key=jax.random.fold_in(key, 3),
                            aggregate=make(args, num_tasks), aggregate_takes_key=True,
                            checkpoint_dir=run.checkpoint_dir(f"pa_atm_{aggregator}"))
        table[label] = {f"K={k}": test_acc(other.rounds[k - 1]) for k in args.budgets}

    # PH-ATM: from the tuned TA merge of the K_max-epoch fine-tunes, rounds on the validation split.
    x_val, y_val = data["validation"]
    val_batch = min(train.batch_size, args.val_size)
    ph_specs = [atm_lib.FinetuneSpec(loss, heads.with_task(epoch_batches((x_val[t], y_val[t]), val_batch,
                                                                        cfg.seed + 20 + t), t),
                                     max(1, args.val_size // val_batch)) for t in range(num_tasks)]
    _, ta_merge, _ = atm_lib.tune_scale(lambda s: task_arithmetic(base, at_budget[k_max], s), args.scales, val_score)
    ph = atm_lib.atm(ta_merge, atm_lib.fit_finetune(ph_specs, train), num_tasks, args.ph_rounds,
                     key=jax.random.fold_in(key, 4), checkpoint_dir=run.checkpoint_dir("ph_atm"))
    ph_curve = [test_acc(ta_merge)] + [test_acc(p) for p in ph.rounds]

    # Joint multi-task training for K epochs (snapshots per epoch), the upper bound.
    joint_snapshots = param_snapshots(base, every=per_epoch, count=k_max)
    joint = fit(heads.joint_loss(encode, head_w, head_b), base,
                multitask_batches(x_tr, y_tr, train.batch_size, cfg.seed + 30),
                dataclasses.replace(train, steps=k_max * per_epoch, log_every=per_epoch), key=jax.random.fold_in(key, 5),
                callbacks=[joint_snapshots], progress=False, name="joint", log=run.metrics)
    joint_at = unstack(joint.callback_states[joint_snapshots.name])
    table["Joint multi-task"] = {f"K={k}": test_acc(joint_at[k - 1]) for k in args.budgets}

    # Individually fine-tuned experts, each evaluated on its own task (the usual "fine-tuned" row).
    own = lambda fts: 100.0 * float(np.mean([split_acc["test"](fts[t])[t] for t in range(num_tasks)]))
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
    return {"methods": table, "chosen_scales": chosen}


# ============================================================================= compatible specialization


@dataclass(frozen=True)
class CompatibleArgs:
    """Options of the ``merge_compatible`` experiment.

    Attributes:
      n_embd / n_layer / n_head: the tiny char-level GPT-2.
      pretrain_steps: steps on the copy/add/map mixture; expert_steps: MLP-only steps per expert.
      snapshot_every: expert checkpoints kept for CKA vs step (early = first, late = last).
      router_steps / router_lr: router training on the target task (only the routers train).
      windows: multi-layer routing windows n (n = 1 is per-layer routing) of the late experts.
      early_windows: the windows routed over the early experts.
      control_windows: the windows of the capacity control: the same routers over two copies of the
        base's MLPs (n >= 2; at n = 1 the control is the base model exactly).
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
    early_windows: tuple[int, ...] = (1, 2, 3, 4)
    control_windows: tuple[int, ...] = (2, 3, 4)
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    eval_size: int = 512

    def __post_init__(self):
        for field_name in ("windows", "early_windows", "control_windows"):
            values = list(getattr(self, field_name))
            if not all(1 <= n <= self.n_layer for n in values):
                raise ValueError(f"args.{field_name}={values}: each routing window n must be in 1..n_layer={self.n_layer}")
        if 1 in self.control_windows:
            raise ValueError("args.control_windows: n = 1 over two copies of the base MLPs is the base model exactly; "
                             "use windows >= 2")
        if self.snapshot_every < 1 or self.expert_steps % self.snapshot_every:
            raise ValueError(f"args.snapshot_every={self.snapshot_every} must be >= 1 and divide "
                             f"args.expert_steps={self.expert_steps} (the last snapshot is the late expert)")


@experiment("merge_compatible", config=CompatibleArgs)
def merge_compatible(cfg: RunConfig, run: RunDir) -> dict:
    """Compatible specialization: CKA vs step, interpolation early vs late, per-/multi-layer routing, router control."""
    started = time.perf_counter()
    args, train = cfg.args, cfg.train
    key = jax.random.key(cfg.seed)
    gpt_cfg = GPT2Config(vocab_size=len(CHARS), n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                         n_positions=SEQ_LEN, activation_function="gelu_new")
    graphdef, params = nnx.split(GPT2LMHeadModel(gpt_cfg, rngs=nnx.Rngs(cfg.seed)), nnx.Param)
    lm_loss = next_token_loss(graphdef)
    base = fit(lm_loss, params, char_stream("CCAM", train.batch_size, cfg.seed),
               dataclasses.replace(train, steps=args.pretrain_steps, log_every=100), key=jax.random.fold_in(key, 0),
               progress=False, name="pretrain", log=run.metrics).params

    # Experts: only MLP weights train (the paper's setting), snapshots for CKA vs step.
    experts: dict[str, list] = {}
    for i, (name, kind) in enumerate([("add", "A"), ("map", "M")]):
        snapshots = param_snapshots(base, every=args.snapshot_every, count=args.expert_steps // args.snapshot_every)
        result = fit(lm_loss, base, char_stream(kind, train.batch_size, cfg.seed + 1 + i),
                     dataclasses.replace(train, steps=args.expert_steps, lr=args.expert_lr, log_every=100),
                     key=jax.random.fold_in(key, 1 + i), trainable=routing.mlp_mask(base), callbacks=[snapshots],
                     progress=False, name=f"expert_{name}", log=run.metrics)
        experts[name] = unstack(result.callback_states[snapshots.name])
    steps = [args.snapshot_every * (j + 1) for j in range(len(experts["add"]))]

    evals = {kind: jax.tree.map(jnp.asarray, char_tasks(kind, args.eval_size, 10_000 + i)) for i, kind in enumerate("AMT")}
    hidden_states = routing.residual_streams(graphdef, jnp.concatenate([evals[k]["input_ids"][:128] for k in "AMT"]))

    # CKA between the two experts, layer by layer, at matched steps (the shared base at step 0 is 1 by
    # construction and is not reported).
    cka_by_step = [layer_cka(hidden_states(a), hidden_states(b)) for a, b in zip(experts["add"], experts["map"])]
    cka_rows = {f"layer{l}": [values[l] for values in cka_by_step] for l in range(args.n_layer)}

    plain = routing.forward_loss(graphdef)
    exact = routing.forward_loss(graphdef, routing.answer_exact_match)
    # Did each expert learn its own task? Greedy exact match on its held-out strings at every snapshot.
    learning = {name: [float(exact(p, evals[kind])) for p in experts[name]] for name, kind in (("add", "A"), ("map", "M"))}
    results: dict[str, dict[str, float]] = {}
    results["base"] = {"target_loss": float(plain(base, evals["T"])), "add_em": float(exact(base, evals["A"])),
                       "map_em": float(exact(base, evals["M"]))}
    for name in experts:
        late = experts[name][-1]
        results[f"expert {name} (late)"] = {
            "target_loss": float(plain(late, evals["T"])),
            "add_loss": float(plain(late, evals["A"])), "add_em": float(exact(late, evals["A"])),
            "map_loss": float(plain(late, evals["M"])), "map_em": float(exact(late, evals["M"])),
        }

    act_interp_loss = routing.interpolation_loss(graphdef)
    stages = {"early": 0, "late": len(steps) - 1}
    for stage, j in stages.items():
        pa, pb = experts["add"][j], experts["map"][j]
        for name, p in (("add", pa), ("map", pb)):  # the late rows already hold their own-task scores
            results.setdefault(f"expert {name} ({stage})", {})["target_loss"] = float(plain(p, evals["T"]))
        for a in args.alphas:
            results[f"activation interp {stage} (step {steps[j]}) alpha={a:g}"] = {
                "target_loss": float(act_interp_loss(pa, pb, a, evals["T"]))}
        for a in args.alphas:
            results[f"weight interp {stage} (step {steps[j]}) alpha={a:g}"] = {
                "target_loss": float(plain(linear([pa, pb], [a, 1.0 - a]), evals["T"]))}

    # Routing: only the routers train, on the target task, experts frozen. The control routes over two
    # copies of the base's MLPs: the same router capacity with nothing specialised to compose.
    candidates = {f"early (step {steps[0]})": ([experts["add"][0], experts["map"][0]], args.early_windows),
                  f"late (step {steps[-1]})": ([experts["add"][-1], experts["map"][-1]], args.windows),
                  "control: base MLPs": ([base, base], args.control_windows)}
    for label, (models, windows) in candidates.items():
        for n in windows:
            router_params, router_loss = routing.fit_routers(
                graphdef, models, char_stream("T", train.batch_size, cfg.seed + 50 + n),
                dataclasses.replace(train, steps=args.router_steps, lr=args.router_lr, log_every=100), window=n,
                key=jax.random.fold_in(key, 50 + n), name=f"router_{label.split()[0].rstrip(':')}_n{n}", log=run.metrics)
            kind = "per-layer routing" if n == 1 else f"multi-layer routing n={n}"
            results[f"{kind} {label}"] = {"target_loss": float(router_loss(router_params, evals["T"]))}

    plot_curves(run.plot_path("cka_vs_step"), {name: (steps, values) for name, values in cka_rows.items()},
                xlabel="expert fine-tuning step", ylabel="linear CKA (add vs map expert)",
                title="CKA between experts, per layer")
    for l, values in cka_rows.items():
        results[f"CKA {l}"] = {"cka_early": values[0], "cka_late": values[-1]}
    (run.path / "cka.json").write_text(json.dumps({"steps": steps, **cka_rows}, indent=1))
    run.log({"seconds": time.perf_counter() - started}, step=0, stage="summary")
    return {"methods": results, "expert_em_by_step": {"steps": steps, **learning}}
