"""Noise-robust PEFT: CleaR against plain PEFT, full fine-tuning and noisy-label baselines.

One run = a dataset, a backbone, a noise model and rates, a list of ``method:tuning``
entries (``ce:full`` = full fine-tuning, ``ce:lora`` = plain LoRA, ``clear:adapter``,
``gce:lora``, ``coteaching:lora``, ``gmm_filter:lora``...) and seeds. Every entry trains
with :func:`metafit.robust.train_noisy` (one :func:`metafit.train.fit` call per seed;
checkpoints, with the per-epoch clean-probability state in them, under
``<run>/<entry>/<rate>/seed<k>/`` so a rerun resumes).

The returned table has, per entry and noise rate, mean ± std over seeds of the peak and
last test accuracy, memorisation (train accuracy on corrupted samples w.r.t. their noisy
labels) and, for GMM-based methods, the clean-probability AUROC. Plots: test accuracy and
memorisation per epoch, and accuracy against noise rate.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from metafit.data.text import hashed_bag_of_words
from metafit.experiments import RunConfig, experiment, plot_curves
from metafit.peft.config import PeftConfig
from metafit.robust import (BACKBONES, NOISY_METHODS, ClearConfig, CoteachingConfig, GCEConfig, GMMFilterConfig,
                            encoded_splits, make_backbone, make_method, method_config, noisy_task, summarise_seeds,
                            text_classifiers, train_noisy)
from metafit.robust.classifier import TUNINGS, bert_peft_config
from metafit.runs import RunDir

@dataclasses.dataclass(frozen=True)
class RobustArgs:
    """Options of the ``robust`` experiment.

    Attributes:
      dataset: ``keywords`` (synthetic), ``bbc_news`` or ``rotten_tomatoes``.
      num_examples, num_classes: size of the synthetic ``keywords`` corpus (ignored otherwise).
      backbone: ``tiny`` (a 2-layer BERT pre-trained here on an independent keyword corpus;
        only for ``keywords``) or ``all-minilm-l6-v2`` (the shipped encoder).
      backbone_steps: pre-training steps of the ``tiny`` backbone.
      backbone_layers: transformer layers of the ``tiny`` backbone (one routing group per layer).
      max_len: tokens per text (truncate / pad).
      val_fraction, test_fraction: the stratified split (fixed by ``split_seed``).
      train_size, test_size: stratified subsets of the train / test split (None = all);
        fixed by ``split_seed`` too, so every seed and method sees the same samples.
      split_seed: seed of the split and the subsets.
      noise: ``symmetric``, ``asymmetric``, ``instance`` or ``none``.
      noise_rates: η values; each gets its own noisy labels (per seed).
      epochs: passes over the (noisy) training set.
      methods: ``method:tuning`` entries, method in ``ce, clear, gce, coteaching, gmm_filter``,
        tuning in ``full, lora, adapter, prefix, bitfit``.
      seeds: training seeds (init, data order, noise draw); empty = the run's ``seed``.
      peft: PEFT settings (``method`` is set from each entry's tuning); the default is
        :func:`metafit.robust.classifier.bert_peft_config` (LoRA on query/value).
      clear, gce, coteaching, gmm_filter: method settings (co-teaching's forget rate
        defaults to the noise rate).
      full_finetune_lr: learning rate of ``full`` entries (full fine-tuning needs a far smaller
        one than PEFT); None = ``train.lr``.
      eval_batch_size: chunk size of evaluation and per-sample passes.
      track_memorisation: predict on the training set at every epoch end.
    """

    dataset: str = "keywords"
    num_examples: int = 600
    num_classes: int = 4
    backbone: str = "tiny"
    backbone_steps: int = 150
    backbone_layers: int = 2
    max_len: int = 32
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    train_size: int | None = None
    test_size: int | None = None
    split_seed: int = 0
    noise: str = "symmetric"
    noise_rates: tuple[float, ...] = (0.4,)
    epochs: int = 6
    methods: tuple[str, ...] = ("ce:full", "ce:adapter", "clear:adapter")
    seeds: tuple[int, ...] = ()
    peft: PeftConfig = bert_peft_config()
    clear: ClearConfig = ClearConfig()
    gce: GCEConfig = GCEConfig()
    coteaching: CoteachingConfig = CoteachingConfig()
    gmm_filter: GMMFilterConfig = GMMFilterConfig()
    full_finetune_lr: float | None = None
    eval_batch_size: int = 64
    track_memorisation: bool = True

    def __post_init__(self):
        for entry in self.methods:
            method, _, tuning = entry.partition(":")
            if method not in NOISY_METHODS:
                NOISY_METHODS.get(method)  # raises with the valid names and a suggestion
            if tuning not in TUNINGS:
                raise ValueError(f"args.methods: '{entry}' has tuning '{tuning}'; expected method:tuning "
                                 f"with tuning in {', '.join(TUNINGS)}")
            if method == "clear" and tuning == "full":
                raise ValueError("args.methods: 'clear:full' is not a thing: CleaR routes PEFT modules")
        if self.backbone not in BACKBONES:
            raise ValueError(f"args.backbone must be one of {', '.join(BACKBONES)}, got '{self.backbone}'")
        if self.backbone == "tiny" and self.dataset != "keywords":
            raise ValueError("args.backbone 'tiny' only knows the keywords vocabulary; use all-minilm-l6-v2")
        if self.backbone_layers < 1:
            raise ValueError(f"args.backbone_layers must be >= 1, got {self.backbone_layers}")
        if self.epochs < 1:
            raise ValueError(f"args.epochs must be >= 1, got {self.epochs}")


@experiment("robust", config=RobustArgs)
def robust(cfg: RunConfig, run: RunDir) -> dict:
    """Trains every ``method:tuning`` entry at every noise rate and seed; mean ± std table and plots."""
    args: RobustArgs = cfg.args
    seeds = args.seeds or (cfg.seed,)
    backbone = make_backbone(args.backbone, num_classes=args.num_classes, seed=cfg.seed, max_len=args.max_len,
                             steps=args.backbone_steps, layers=args.backbone_layers)
    corpus_size = {"num_examples": args.num_examples, "num_classes": args.num_classes} if args.dataset == "keywords" else {}
    splits = encoded_splits(args.dataset, backbone.tokenizer, max_len=args.max_len, split_seed=args.split_seed,
                            val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                            train_size=args.train_size, test_size=args.test_size, **corpus_size)
    features = hashed_bag_of_words(splits.train_texts) if args.noise == "instance" else None
    configs = {"clear": args.clear, "gce": args.gce, "coteaching": args.coteaching, "gmm_filter": args.gmm_filter}
    table: dict[str, dict[str, float]] = {}
    curves: dict[str, list[list[dict[str, float]]]] = {}
    for rate in args.noise_rates:
        for entry in args.methods:
            method_name, _, tuning = entry.partition(":")
            label = f"{entry} {args.noise[:4]}{rate:g}"
            classifiers = text_classifiers(backbone, splits.num_classes, tuning=tuning, peft_config=args.peft)
            method = make_method(method_name, classifiers(jax.random.key(0)), method_config(method_name, rate, configs))
            train_config = cfg.train
            if tuning == "full" and args.full_finetune_lr is not None:
                train_config = dataclasses.replace(cfg.train, lr=args.full_finetune_lr)
            runs, realised = [], []
            for seed in seeds:
                # training randomness depends on the seed only (the same init and data order at every
                # noise rate: a paired comparison); the noise draw depends on the seed and the rate
                task = noisy_task(splits, args.noise, rate, seed=seed, features=features)
                stage = f"{entry}/{args.noise}{rate:g}/seed{seed}"
                runs.append(train_noisy(method, classifiers, task, train_config, epochs=args.epochs,
                                        key=jax.random.key(seed), workdir=run.subdir(stage.replace(":", "_")),
                                        name=stage, log=run.metrics, eval_batch_size=args.eval_batch_size,
                                        track_memorisation=args.track_memorisation, gmm_seed=seed))
                realised.append(task.noise.noise_rate)
            table[label] = summarise_seeds([r.summary for r in runs], float(np.mean(realised)))
            curves[label] = [r.curve for r in runs]
    write_plots(run, curves, table, args)
    return {"methods": table}


def write_plots(run: RunDir, curves: dict[str, list[list[dict[str, float]]]], table: dict[str, dict[str, float]],
                args: RobustArgs) -> None:
    """Per-epoch test accuracy and memorisation (seed means), and accuracy against noise rate."""
    for metric in ("test_accuracy", "memorisation"):
        series = {}
        for label, per_seed in curves.items():
            rows = [[c.get(metric, float("nan")) for c in curve] for curve in per_seed]
            if rows and all(len(r) == len(rows[0]) for r in rows):
                series[label] = (list(range(1, len(rows[0]) + 1)), list(np.nanmean(np.asarray(rows), axis=0)))
        if series:
            plot_curves(run.plot_path(f"{metric}_curves"), series, xlabel="epoch", ylabel=metric.replace("_", " "),
                        title=f"{args.dataset}, {args.noise} noise")
    if len(args.noise_rates) > 1:
        series = {}
        for entry in args.methods:
            labels = [f"{entry} {args.noise[:4]}{rate:g}" for rate in args.noise_rates]
            series[entry] = (list(args.noise_rates), [table[l]["last_test_accuracy_mean"] for l in labels])
        plot_curves(run.plot_path("accuracy_vs_noise"), series, xlabel="noise rate η", ylabel="last test accuracy",
                    title=f"{args.dataset}, {args.noise} noise")
