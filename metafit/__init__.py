"""metafit: efficient and robust model adaptation in JAX.

Public entry points:

* :mod:`metafit.train` — the one trainer (:func:`metafit.train.fit`, :class:`metafit.train.TrainConfig`);
* :mod:`metafit.config` — YAML -> validated frozen dataclasses;
* :mod:`metafit.registry` — named registries per family;
* :mod:`metafit.experiments` — registered experiments (imported on use), :func:`metafit.experiments.run_experiment`;
* :mod:`metafit.cli` — the ``metafit`` command (also ``python -m metafit``);
* :mod:`metafit.parallel` — meshes and sharding; and the method families
  (``meta``, ``bayes``, ``merge``, ``robust``, ``peft``, ``models``, ``select``).

Sub-packages are imported on use, so ``import metafit`` stays fast.
"""
__version__ = "0.1.0"
