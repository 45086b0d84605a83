"""Transfer of fine-tuning configurations: search space, meta-dataset, surrogates, portfolio, transfer BO.

    >>> from metafit import hpo
    >>> meta = hpo.load_meta_dataset()                 # packaged learning curves of real runs
    >>> surrogate = hpo.Surrogate.fit(meta)            # deep-kernel GP + cost MLP (JAX, optax)
    >>> hpo.portfolio(surrogate, 4, list(meta.configs))

``metafit tune CONFIG --budget N --workdir DIR`` runs the search on a LoRA SFT job
(:mod:`metafit.hpo.tune`). See docs/hpo.md.
"""
from metafit.hpo.acquisition import expected_improvement, greedy_portfolio, portfolio, suggest, zero_shot_config
from metafit.hpo.metadataset import MetaDataset, MetaDatasetError, generate
from metafit.hpo.metadataset import load as load_meta_dataset
from metafit.hpo.space import Range, SearchSpace, space_from_dict
from metafit.hpo.surrogate import Surrogate
from metafit.hpo.tasks import META_FEATURES, SUITE, TaskSpec
from metafit.hpo.tune import TuneError, TuneRequest, tune

__all__ = ["SearchSpace", "Range", "space_from_dict", "MetaDataset", "MetaDatasetError", "load_meta_dataset",
           "generate", "Surrogate", "portfolio", "suggest", "greedy_portfolio", "expected_improvement",
           "zero_shot_config", "META_FEATURES", "SUITE", "TaskSpec", "tune", "TuneRequest", "TuneError"]
