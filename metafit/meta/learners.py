"""Meta-learners as pure functions: the MAML family, metric/ridge heads, and (I/O-)AMFS.

A learner is a :class:`MetaLearner`, a NamedTuple of pure functions in the optax
style::

    meta_params = learner.init(backbone_params)          # {"net": params, ...extras}
    adapted     = learner.adapt(meta_params, (x_s, y_s), key=key)
    outputs     = learner.predict(meta_params, adapted, x_q)

The meta-loss of a task is ``learner.loss(predict(adapt(support)), query)`` and
meta-gradients are ``jax.grad`` through ``adapt`` (see :mod:`metafit.meta.outer`);
first-order methods put ``lax.stop_gradient`` inside the inner loop instead of
a second code path. Inner gradient loops are a ``lax.scan``.

Registered in :data:`META_LEARNERS` (each with its own frozen config dataclass;
:func:`make_learner` builds one by name and validates its options):

=============  ======================================================================
``maml``       second-order MAML (Finn et al., 2017): ``phi = theta - a grad L_s(theta)``, k steps
``fomaml``     first-order MAML: the same with ``stop_gradient`` on the inner gradients
``anil``       ANIL (Raghu et al., 2020): inner loop on the linear head only, body by the outer loop
``metasgd``    Meta-SGD (Li et al., 2017): a learned per-parameter inner learning rate
``reptile``    Reptile (Nichol et al., 2018): meta-gradient ``theta - phi`` after k SGD steps
``protonet``   Prototypical networks (Snell et al., 2017): logits ``-||f(x) - c_k||^2``
``r2d2``       R2-D2 (Bertinetto et al., 2019): closed-form ridge head on features, learned
               ridge, scale and offset
``i-amfs``     closed-form inner loop in the empirical-NTK RKHS (ridge or gradient-flow
               form, Cholesky / expm), uniform outer loop
``o-amfs``     MAML inner loop, outer loop weighted by gradient agreement
``amfs``       both: NTK closed form inside, gradient-agreement weights outside
=============  ======================================================================

I-AMFS/O-AMFS/AMFS are the AMFS card's *reconstruction* of Park & Kang (2024,
arXiv 2411.00404), whose exact kernel and weighting are not public; the kernel
(:data:`metafit.meta.kernels.KERNELS`) and the weighting
(:data:`metafit.meta.weighting.TASK_WEIGHTINGS`) are options so the published
forms can replace them. For classification the closed-form inner loops regress
one-hot targets (squared error in function space) and the outer meta-loss is the
cross-entropy of the resulting logits on the query set.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metafit.config import from_dict
from metafit.meta.backbones import Network
from metafit.meta.kernels import KERNELS, flow_coefficients, ridge_coefficients
from metafit.meta.weighting import TASK_WEIGHTINGS
from metafit.registry import Registry

Params = Any
Array = jax.Array
LossFn = Callable[[Array, Array], tuple[Array, dict[str, Array]]]


class MetaLearner(NamedTuple):
    """A meta-learner as pure functions.

    Attributes:
      init: ``backbone_params -> meta_params`` (``{"net": params}`` plus learned extras).
      adapt: ``(meta_params, support, *, key) -> adapted`` (task-specific state).
      predict: ``(meta_params, adapted, x) -> outputs``.
      loss: ``(outputs, targets) -> (scalar, metrics)`` used inside and outside.
      weighting: ``per_task_grads -> weights[T]`` or ``None`` for the plain mean.
      task_grad: optional ``(meta_params, task, key) -> ((loss, metrics), grads)`` for
        learners whose meta-gradient is not the gradient of a loss (Reptile).
      config: the frozen config it was built from.
    """

    init: Callable[[Params], Params]
    adapt: Callable[..., Any]
    predict: Callable[[Params, Any, Array], Array]
    loss: LossFn
    weighting: Callable[[Any], Array] | None = None
    task_grad: Callable[..., Any] | None = None
    config: Any = None


# ----------------------------------------------------------------------------- losses


def mse_loss(outputs: Array, targets: Array) -> tuple[Array, dict[str, Array]]:
    """Mean squared error over points and outputs (the sinusoid metric)."""
    value = jnp.mean((outputs - targets) ** 2)
    return value, {"mse": value}


def cross_entropy_loss(logits: Array, labels: Array) -> tuple[Array, dict[str, Array]]:
    """Mean softmax cross-entropy with integer labels, plus accuracy."""
    value = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return value, {"xent": value, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


LOSSES: dict[str, LossFn] = {"mse": mse_loss, "xent": cross_entropy_loss}


def _loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; valid: {', '.join(LOSSES)} (mse = regression, xent = classification)")
    return LOSSES[name]


def regression_targets(labels: Array, loss: str, output_dim: int) -> Array:
    """Targets of a closed-form solver: ``y`` for regression, one-hot labels for classification."""
    return jax.nn.one_hot(labels, output_dim) if loss == "xent" else labels


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class OuterConfig:
    """Outer-loop options shared by every learner.

    Attributes:
      weighting: task weighting, a name in ``TASK_WEIGHTINGS`` (``uniform`` = plain mean).
      temperature: softmax temperature of ``softmax_cosine`` (ignored otherwise).
    """

    weighting: str = "uniform"
    temperature: float = 0.1

    def __post_init__(self):
        TASK_WEIGHTINGS.get(self.weighting)  # unknown names fail at config time, with suggestions
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class MAMLConfig(OuterConfig):
    """MAML: ``inner_steps`` SGD steps of size ``inner_lr`` on the support loss.

    Attributes:
      inner_lr: inner-loop step size (Finn et al.: 0.01 sinusoid, 0.4 Omniglot).
      inner_steps: inner SGD steps (0 = no adaptation).
      first_order: drop second-order terms (``stop_gradient`` on inner gradients).
    """

    inner_lr: float = 0.01
    inner_steps: int = 1
    first_order: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {self.inner_steps}")


@dataclasses.dataclass(frozen=True)
class FOMAMLConfig(MAMLConfig):
    """First-order MAML (same fields as :class:`MAMLConfig`)."""

    first_order: bool = True


@dataclasses.dataclass(frozen=True)
class ANILConfig(MAMLConfig):
    """ANIL: MAML on the head only (same fields as :class:`MAMLConfig`)."""


@dataclasses.dataclass(frozen=True)
class MetaSGDConfig(MAMLConfig):
    """Meta-SGD: ``inner_lr`` initialises a learned per-parameter learning rate."""


@dataclasses.dataclass(frozen=True)
class OAMFSConfig(MAMLConfig):
    """O-AMFS: MAML inner loop, task-weighted outer loop.

    The default weighting is ``softmax_cosine``, not the card's ``gradient_agreement``: the latter gives
    about 3 in 10 tasks a negative weight (gradient ascent on them) and did worse than the non-negative
    weightings on clean and heterogeneous sinusoids (paper_repro/amfs/README.md); pass
    ``weighting="gradient_agreement"`` for the card's outer loop.
    """

    weighting: str = "softmax_cosine"


@dataclasses.dataclass(frozen=True)
class ReptileConfig(OuterConfig):
    """Reptile: ``inner_steps`` SGD steps on the support set; meta-gradient ``theta - phi``.

    With the outer optimiser ``sgd`` at learning rate ``epsilon`` this is the
    original update ``theta <- theta + epsilon (phi - theta)``.
    """

    inner_lr: float = 0.01
    inner_steps: int = 5

    def __post_init__(self):
        super().__post_init__()
        if self.inner_steps < 1:
            raise ValueError(f"reptile needs inner_steps >= 1, got {self.inner_steps}")


@dataclasses.dataclass(frozen=True)
class ProtoNetConfig(OuterConfig):
    """Prototypical networks (no options beyond the outer loop)."""


@dataclasses.dataclass(frozen=True)
class R2D2Config(OuterConfig):
    """R2-D2 ridge head.

    Attributes:
      ridge: initial ridge ``lambda`` (learned in log space when ``learn_ridge``).
      learn_ridge: meta-learn ``lambda``.
    """

    ridge: float = 1.0
    learn_ridge: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")


@dataclasses.dataclass(frozen=True)
class IAMFSConfig(OuterConfig):
    """I-AMFS: closed-form inner loop in a kernel's RKHS.

    Attributes:
      kernel: a name in ``KERNELS`` (``ntk``: all parameters; ``ntk_head``: head only).
      form: ``ridge`` (``(Theta + lambda I)^{-1}``, Cholesky) or ``flow`` (gradient flow for ``flow_time``).
      ridge: ``lambda`` of the ridge form.
      flow_time: ``t`` of the gradient-flow form (``lr * steps`` on the summed squared error).
    """

    kernel: str = "ntk"
    form: Literal["ridge", "flow"] = "ridge"
    ridge: float = 0.1
    flow_time: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        KERNELS.get(self.kernel)
        if self.form not in ("ridge", "flow"):
            raise ValueError(f"form must be 'ridge' or 'flow', got {self.form!r}")
        if self.ridge < 0 or self.flow_time <= 0:
            raise ValueError(f"need ridge >= 0 and flow_time > 0, got {self.ridge}, {self.flow_time}")


@dataclasses.dataclass(frozen=True)
class AMFSConfig(IAMFSConfig):
    """AMFS: I-AMFS inner loop with a task-weighted outer loop (``softmax_cosine`` by default, see :class:`OAMFSConfig`)."""

    weighting: str = "softmax_cosine"


# ----------------------------------------------------------------------------- parts


def inner_sgd(loss: Callable[[Params], Array], params: Params, lr: Any, steps: int,
              first_order: bool = False) -> Params:
    """``steps`` gradient steps ``p <- p - lr * grad loss(p)`` under ``lax.scan``.

    Args:
      loss: scalar loss of the adapted parameters.
      params: starting point (differentiable: meta-gradients flow through the loop).
      lr: a scalar, or a tree like ``params`` (per-parameter rates, Meta-SGD).
      steps: number of steps (0 returns ``params``).
      first_order: ``stop_gradient`` on each inner gradient, so ``d phi / d theta = I``.
    """
    rates = lr if jax.tree.structure(lr) == jax.tree.structure(params) else jax.tree.map(lambda _: lr, params)

    def step(current, _):
        grads = jax.grad(loss)(current)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        return jax.tree.map(lambda p, g, a: p - a * g, current, grads, rates), None

    adapted, _ = jax.lax.scan(step, params, None, length=steps)
    return adapted


def _weighting(config: OuterConfig) -> Callable[[Any], Array] | None:
    if config.weighting == "uniform":
        return None  # the plain mean of task losses: one fused gradient, no per-task copies
    fn = TASK_WEIGHTINGS.get(config.weighting)
    if config.weighting == "softmax_cosine":
        return lambda grads: fn(grads, temperature=config.temperature)
    return fn


def _wrap(params: Params) -> Params:
    return {"net": params}


# ----------------------------------------------------------------------------- learners


class KernelAdapted(NamedTuple):
    """What a closed-form inner loop keeps.

    Attributes:
      support: support inputs (kernel learners) or support features (R2-D2).
      alpha: coefficients ``[n, o]``: predictions add ``k(x, support) alpha``.
      jitter: diagonal jitter the solve needed (0 when well conditioned); reported
        as the ``kernel_jitter`` metric and warned about once per meta-batch.
    """

    support: Array
    alpha: Array
    jitter: Array

META_LEARNERS: Registry[Callable[..., MetaLearner]] = Registry("meta-learner")


def gradient_learner(network: Network, config: MAMLConfig, *, loss: str, output_dim: int,
                     head_only: bool = False, learn_lr: bool = False) -> MetaLearner:
    """The MAML family: SGD inner loop on all parameters or the head, fixed or learned step sizes."""
    del output_dim
    loss_fn = _loss(loss)

    def init(params):
        meta = _wrap(params)
        if learn_lr:
            meta["inner_lr"] = jax.tree.map(lambda p: jnp.full_like(p, config.inner_lr), params)
        return meta

    def adapt(meta_params, support, *, key=None):
        del key  # the inner loop is deterministic
        x, y = support
        params = meta_params["net"]
        lr = meta_params["inner_lr"] if learn_lr else config.inner_lr
        if head_only:
            features = network.features(params, x)  # the body is fixed inside the task: compute once
            head = inner_sgd(lambda h: loss_fn(network.head(h, features), y)[0], params["head"],
                             lr["head"] if learn_lr else lr, config.inner_steps, config.first_order)
            return {**params, "head": head}
        return inner_sgd(lambda p: loss_fn(network.apply(p, x), y)[0], params, lr, config.inner_steps,
                         config.first_order)

    def predict(meta_params, adapted, x):
        del meta_params
        return network.apply(adapted, x)

    return MetaLearner(init, adapt, predict, loss_fn, _weighting(config), config=config)


for _name, _config, _options in (
    ("maml", MAMLConfig, {}),
    ("fomaml", FOMAMLConfig, {}),
    ("anil", ANILConfig, {"head_only": True}),
    ("metasgd", MetaSGDConfig, {"learn_lr": True}),
    ("o-amfs", OAMFSConfig, {}),
):
    META_LEARNERS.register(
        _name, lambda network, config, *, loss, output_dim, _o=_options: gradient_learner(
            network, config, loss=loss, output_dim=output_dim, **_o),
        config=_config,
    )


@META_LEARNERS.register("reptile", config=ReptileConfig)
def reptile(network: Network, config: ReptileConfig, *, loss: str, output_dim: int) -> MetaLearner:
    """Reptile: the per-task meta-gradient is ``theta - phi`` (first order by construction)."""
    maml_like = gradient_learner(
        network, MAMLConfig(weighting=config.weighting, temperature=config.temperature, inner_lr=config.inner_lr,
                            inner_steps=config.inner_steps, first_order=True),
        loss=loss, output_dim=output_dim,
    )

    def task_grad(meta_params, task, key):
        adapted = jax.lax.stop_gradient(maml_like.adapt(meta_params, task.support, key=key))
        value, metrics = maml_like.loss(network.apply(adapted, task.query[0]), task.query[1])
        direction = jax.tree.map(jnp.subtract, meta_params["net"], adapted)
        return (value, metrics), {"net": direction}

    return maml_like._replace(task_grad=task_grad, config=config)


@META_LEARNERS.register("protonet", config=ProtoNetConfig)
def protonet(network: Network, config: ProtoNetConfig, *, loss: str, output_dim: int) -> MetaLearner:
    """Prototypical networks: class means of support features; logits are negative squared distances."""
    if loss != "xent":
        raise ValueError("protonet is a classification learner (loss 'xent'); use r2d2 or i-amfs for regression")
    loss_fn = _loss(loss)

    def adapt(meta_params, support, *, key=None):
        del key
        x, y = support
        features = network.features(meta_params["net"], x)
        onehot = jax.nn.one_hot(y, output_dim, dtype=features.dtype)
        return (onehot.T @ features) / jnp.maximum(onehot.sum(0), 1.0)[:, None]

    def predict(meta_params, prototypes, x):
        features = network.features(meta_params["net"], x)
        return -jnp.sum((features[:, None, :] - prototypes[None]) ** 2, axis=-1)

    return MetaLearner(_wrap, adapt, predict, loss_fn, _weighting(config), config=config)


@META_LEARNERS.register("r2d2", config=R2D2Config)
def r2d2(network: Network, config: R2D2Config, *, loss: str, output_dim: int) -> MetaLearner:
    """R2-D2: ``W = Phi^T (Phi Phi^T + lambda I)^{-1} Y`` on support features; ``out = s Phi* W + b``.

    The dual (Woodbury) form solves an ``n x n`` system, ``n`` = support size, by
    Cholesky; a constant feature plays the role of the ridge head's bias.
    """
    loss_fn = _loss(loss)

    def init(params):
        return {"net": params, "log_ridge": jnp.log(jnp.asarray(config.ridge, jnp.float32)),
                "scale": jnp.ones((), jnp.float32), "offset": jnp.zeros((), jnp.float32)}

    def linear_kernel(a, b):
        return a @ b.T + 1.0

    def adapt(meta_params, support, *, key=None):
        del key
        x, y = support
        features = network.features(meta_params["net"], x)
        log_ridge = meta_params["log_ridge"] if config.learn_ridge else jax.lax.stop_gradient(meta_params["log_ridge"])
        targets = regression_targets(y, loss, output_dim)
        alpha, jitter = ridge_coefficients(linear_kernel(features, features), targets, jnp.exp(log_ridge), warn=False)
        return KernelAdapted(features, alpha, jitter)

    def predict(meta_params, adapted, x):
        features = network.features(meta_params["net"], x)
        return meta_params["scale"] * (linear_kernel(features, adapted.support) @ adapted.alpha) + meta_params["offset"]

    return MetaLearner(init, adapt, predict, loss_fn, _weighting(config), config=config)




def kernel_learner(network: Network, config: IAMFSConfig, *, loss: str, output_dim: int) -> MetaLearner:
    """I-AMFS/AMFS: ``f(X*) = f0(X*) + Theta(X*, X) alpha`` with ``alpha`` in closed form."""
    loss_fn = _loss(loss)
    kernel = KERNELS.get(config.kernel)(network)

    def adapt(meta_params, support, *, key=None):
        del key
        x, y = support
        params = meta_params["net"]
        residual = regression_targets(y, loss, output_dim) - network.apply(params, x)
        gram = kernel.gram(params, x)
        flat = residual.reshape(-1)
        if config.form == "ridge":
            alpha, jitter = ridge_coefficients(gram, flat, config.ridge, warn=False)
        else:
            alpha, jitter = flow_coefficients(gram, flat, config.flow_time), jnp.zeros((), gram.dtype)
        return KernelAdapted(x, alpha.reshape(residual.shape), jitter)

    def predict(meta_params, adapted, x):
        params = meta_params["net"]
        return network.apply(params, x) + kernel.cross(params, x, adapted.support, adapted.alpha)

    return MetaLearner(_wrap, adapt, predict, loss_fn, _weighting(config), config=config)


META_LEARNERS.register("i-amfs", kernel_learner, config=IAMFSConfig)
META_LEARNERS.register("amfs", kernel_learner, config=AMFSConfig)


def learner_config(name: str, options: dict[str, Any] | None = None, *, path: str = "learner_args") -> Any:
    """The validated config of learner ``name`` from a mapping of options (unknown keys fail)."""
    cls = META_LEARNERS.meta(name)["config"]
    try:
        return from_dict(cls, options or {}, path=path)
    except ValueError as err:  # __post_init__ checks
        raise type(err)(f"learner '{name}': {err}") from None


def make_learner(name: str, network: Network, *, loss: str, output_dim: int, config: Any = None,
                 **options: Any) -> MetaLearner:
    """Builds the registered learner ``name`` for ``network``.

    Args:
      name: a name in :data:`META_LEARNERS` (unknown names list the valid ones).
      network: the backbone's :class:`~metafit.meta.backbones.Network`.
      loss: ``"mse"`` (regression) or ``"xent"`` (classification, integer labels).
      output_dim: network outputs (ways, or the regression target size).
      config: a ready config instance; otherwise ``options`` are validated into the learner's config.

    Example:
        >>> learner = make_learner("maml", net, loss="mse", output_dim=1, inner_lr=0.01, inner_steps=5)
    """
    builder = META_LEARNERS.get(name)
    if config is None:
        config = learner_config(name, options)
    elif options:
        raise TypeError("pass either config= or keyword options, not both")
    try:
        hash((network, config))
    except TypeError:  # a config with an unhashable field: build it, uncached
        return builder(network, config, loss=loss, output_dim=output_dim)
    # outside the try: a TypeError raised by the builder itself surfaces once, not after a second build
    return _cached_learner(builder, network, config, loss, output_dim)


@functools.lru_cache(maxsize=64)
def _cached_learner(builder, network: Network, config: Any, loss: str, output_dim: int) -> MetaLearner:
    """Equal arguments give the same learner object: jitted functions taking the learner as a
    static argument (evaluation, the outer step) then reuse their compiled programs."""
    return builder(network, config, loss=loss, output_dim=output_dim)
