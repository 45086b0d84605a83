"""Meta-learning: pure-function learners (MAML family, ProtoNet, R2-D2, AMFS), kernels, task weights.

Layers: :mod:`backbones` (NNX MLP/Conv4, :func:`build_backbone` by name, and their functional view) ->
:mod:`kernels` (empirical NTK, Cholesky / expm closed forms) and :mod:`weighting`
(gradient agreement, softmax-cosine, uniform) -> :mod:`learners` (the registry
:data:`META_LEARNERS`) -> :mod:`outer` (meta-loss, weighted meta-gradient,
evaluation). Meta-training goes through :func:`metafit.train.fit` (see
``metafit.experiments.meta``).

Example:
    >>> from metafit.data.tasks import get_tasksets
    >>> from metafit.meta import MLP, functional, make_learner, meta_value_and_grad
    >>> tasksets = get_tasksets("sinusoid", shots=10, queries=10)
    >>> network, params = functional(MLP(1, (40, 40), 1, rngs=nnx.Rngs(0)))
    >>> learner = make_learner("maml", network, loss="mse", output_dim=1)
    >>> meta_params = learner.init(params)
    >>> tasks = tasksets.train.sample_batch(jax.random.key(0), 25)
    >>> (loss, metrics), grads = meta_value_and_grad(learner, meta_params, tasks, jax.random.key(1))
"""
from metafit.meta.backbones import BACKBONES, MLP, Conv4, Network, build_backbone, functional
from metafit.meta.kernels import (
    KERNELS,
    IllConditionedWarning,
    Kernel,
    flow_coefficients,
    ntk_cross,
    ntk_gram,
    regularised_cholesky,
    ridge_coefficients,
    warn_if_jittered,
)
from metafit.meta.learners import (
    LOSSES,
    META_LEARNERS,
    MetaLearner,
    inner_sgd,
    learner_config,
    make_learner,
)
from metafit.meta.outer import (
    adapted_predictions,
    batch_meta_loss,
    over_tasks,
    evaluate,
    meta_loss,
    meta_value_and_grad,
    summarize,
    task_value_and_grad,
)
from metafit.meta.weighting import (
    TASK_WEIGHTINGS,
    combine_task_grads,
    gradient_agreement,
    gradient_agreement_clipped,
    softmax_cosine,
    task_gram,
)

__all__ = [
    "BACKBONES", "MLP", "Conv4", "Network", "build_backbone", "functional", "KERNELS", "Kernel", "IllConditionedWarning", "ntk_gram", "ntk_cross",
    "regularised_cholesky", "ridge_coefficients", "flow_coefficients", "warn_if_jittered", "LOSSES", "META_LEARNERS", "MetaLearner",
    "inner_sgd", "learner_config", "make_learner", "meta_loss", "adapted_predictions", "batch_meta_loss", "over_tasks", "task_value_and_grad",
    "meta_value_and_grad", "evaluate", "summarize", "TASK_WEIGHTINGS", "task_gram", "gradient_agreement",
    "gradient_agreement_clipped", "softmax_cosine", "combine_task_grads",
]
