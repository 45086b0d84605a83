"""DELIFT data selection: every selection arm of one use case, the same LoRA fine-tuning, three metrics.

The library does the work (:mod:`metafit.select.study`); this module parses the arguments, loads
the models and writes results. Each arm's subset is written to the run folder as
``selected_<arm>.jsonl``; ``args.pool_file`` selects from a user's own JSONL pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from metafit import peft
from metafit.experiments import RunConfig, experiment
from metafit.models import load
from metafit.runs import RunDir
from metafit.select import study


@dataclass(frozen=True)
class DeliftArgs:
    """Options of the DELIFT comparison.

    Attributes:
      model: the causal LM that scores utilities and is fine-tuned (``metafit.models.load``).
      encoder: the sentence encoder of DELIFT(SE), DEFT-UCS and the embedding metric.
      use_case: ``instruction`` (FL), ``task`` (FLMI toward a target set) or ``continual``
        (FLCG given an existing set).
      pool_file: a JSONL file of ``{"instruction", "response"}`` pairs to select from
        (empty = ``n_pool`` generated pairs).
      families: the generated family set: ``pretraining`` (:mod:`metafit.data.instructions`, the
        families metafit-small-lm was pretrained on; the default, kept for old configs) or ``unseen``
        (:mod:`metafit.data.unseen_instructions`, families it never saw; the shipped configs).
      tasks: the pool's families (empty = every family of the set).
      mix: one weight per pool family (``unseen`` only; empty = the families in turn).
      n_pool, n_side, n_eval: pool, target/existing set and evaluation set sizes.
      side_tasks: instruction families of the target (task) or existing (continual) set.
      budget: fraction of the pool selected.
      arms: the arms to run (see ``metafit.select.study.ARMS``).
      block: utility tile size (the unit of resume).
      utility_cache: a folder shared by runs, one subfolder per utility kernel (named by the digest of
        model, pairs and block): the use cases of one seed score the same pool once (empty = the
        run folder's ``utility/``).
      lora: the adapter every trained arm gets.
      buckets: padded SFT sequence lengths.
      max_new_tokens: generation budget of the answers scored.
      less_dim: random-projection width of the LESS-style gradients.
    """

    model: str = "metafit-small-lm"
    encoder: str = "all-minilm-l6-v2"
    use_case: str = "instruction"
    pool_file: str = ""
    families: str = "pretraining"
    tasks: tuple[str, ...] = ()
    mix: tuple[float, ...] = ()
    n_pool: int = 500
    n_side: int = 60
    n_eval: int = 60
    side_tasks: tuple[str, ...] = ("reverse", "sort")
    budget: float = 0.3
    arms: tuple[str, ...] = study.ARMS
    block: int = 64
    utility_cache: str = ""
    lora: peft.LoraConfig = field(default_factory=lambda: peft.LoraConfig(rank=8, alpha=16.0,
                                                                          targets=("q_proj", "v_proj")))
    buckets: tuple[int, ...] = (64,)
    max_new_tokens: int = 8
    less_dim: int = 256

    def __post_init__(self):
        if self.use_case not in study.USE_CASES:
            raise ValueError(f"args.use_case must be one of {study.USE_CASES}, got {self.use_case!r}")
        study.check_families(self.families, self.tasks, self.side_tasks, self.mix)
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"args.budget is a fraction in (0, 1], got {self.budget}")
        unknown = [a for a in self.arms if a not in study.ARMS]
        if unknown:
            raise ValueError(f"args.arms has unknown arms {unknown}; choose from {study.ARMS}")
        if self.pool_file and not Path(self.pool_file).is_file():
            raise ValueError(f"args.pool_file {self.pool_file!r} is not a file")
        if min(self.n_pool, self.n_eval, self.block) < 1 or (self.use_case != "instruction" and self.n_side < 1):
            raise ValueError("args.n_pool, args.n_eval, args.block (and args.n_side outside 'instruction') must be >= 1")


@experiment("delift", config=DeliftArgs)
def delift(cfg: RunConfig, run: RunDir) -> dict:
    """Selects with every arm, fine-tunes each subset the same way, scores ROUGE-L / exact match / embedding."""
    args = cfg.args
    pool = study.read_pairs(args.pool_file) if args.pool_file else None
    sets = study.use_case_sets(args.use_case, n_pool=args.n_pool, n_side=args.n_side, n_eval=args.n_eval,
                               seed=cfg.seed, side_tasks=args.side_tasks, pool=pool,
                               families=args.families, tasks=args.tasks or None, mix=args.mix or None)
    model, tokenizer = load(args.model)
    encoder, encoder_tokenizer = load(args.encoder)
    results = study.run_arms(model, tokenizer, encoder, encoder_tokenizer, sets, args.use_case, arms=args.arms,
                             budget_fraction=args.budget, lora=args.lora, train_config=cfg.train, seed=cfg.seed,
                             folder=run.path, block=args.block, buckets=args.buckets,
                             max_new_tokens=args.max_new_tokens, less_dim=args.less_dim, log=run.metrics,
                             utility_cache=Path(args.utility_cache) if args.utility_cache else None)
    return {"methods": results}
