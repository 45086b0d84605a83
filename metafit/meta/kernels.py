"""Closed-form inner loops in a kernel's RKHS: the empirical NTK, kernel ridge, gradient flow.

For a network ``f(theta, x)`` with Jacobian ``J(X) = d f(theta, X) / d theta`` the
empirical neural tangent kernel is ``Theta(X, X') = J(X) J(X')^T``. Training the
*linearised* network ``f0(x) + J(x) delta`` on a support set ``(X, Y)`` has closed
forms (Meta-RKHS, Zhou et al., ICLR 2021; reconstruction of I-AMFS, see the AMFS card):

* ridge form, the minimiser of ``1/2 ||f0(X) + J delta - Y||^2 + lambda/2 ||delta||^2``::

      f(X*) = f0(X*) + Theta(X*, X) (Theta(X, X) + lambda I)^{-1} (Y - f0(X))

* gradient-flow form, gradient flow on ``1/2 ||f0(X) + J delta - Y||^2`` (a *sum*
  over support points and outputs) for time ``t`` (``t = lr * steps`` of plain GD)::

      f_t(X*) = f0(X*) + Theta(X*, X) Theta(X, X)^{-1} (I - exp(-t Theta(X, X))) (Y - f0(X))

Both read ``f(X*) = f0(X*) + Theta(X*, X) alpha`` with coefficients ``alpha`` from
:func:`ridge_coefficients` or :func:`flow_coefficients`. Outputs are flattened
example-major, so with ``o`` outputs ``Theta`` is ``[n*o, n*o]`` (cross-output terms
kept) and ``alpha`` is ``[n, o]``.

A :class:`Kernel` is a pair of pure functions: ``gram`` builds ``Theta(X, X)``, and
``cross`` applies ``Theta(X*, X)`` to coefficients. For the NTK, ``cross`` never forms
the ``[m*o, n*o]`` matrix: ``Theta(X*, X) alpha = J(X*) (J(X)^T alpha)`` is one VJP and
one JVP, which is what keeps conv backbones affordable. Kernels are registered in
:data:`KERNELS` (``ntk``: all parameters; ``ntk_head``: the linear head only) and any
other ``Kernel`` can be passed to the learners.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metafit.meta.backbones import Network
from metafit.registry import Registry

Params = Any
Array = jax.Array


class IllConditionedWarning(RuntimeWarning):
    """A kernel system was too ill-conditioned to solve as given; jitter was added to its diagonal."""


# ----------------------------------------------------------------------------- kernels


class Kernel(NamedTuple):
    """A kernel over a network's outputs, as pure functions of the parameters.

    Attributes:
      gram: ``(params, x[n]) -> [n*o, n*o]``, symmetric positive semi-definite.
      cross: ``(params, x_query[m], x_support[n], alpha[n, o]) -> [m, o]`` = ``Theta(X*, X) alpha``.
    """

    gram: Callable[[Params, Array], Array]
    cross: Callable[[Params, Array, Array, Array], Array]


def _subset_apply(network: Network, params: Params, subset: str):
    """``(g(sub), sub)``: the network as a function of all parameters or of the head only."""
    if subset == "all":
        return (lambda p, x: network.apply(p, x)), params
    if subset == "head":
        return (lambda head, x: network.apply({**params, "head": head}, x)), params["head"]
    raise ValueError(f"NTK parameter subset must be 'all' or 'head', got {subset!r}")


def ntk_gram(network: Network, params: Params, x: Array, *, subset: str = "all") -> Array:
    """Empirical NTK ``J(X) J(X)^T`` over ``subset`` parameters, ``[n*o, n*o]`` (example-major)."""
    fn, sub = _subset_apply(network, params, subset)
    jac = jax.jacrev(lambda p: fn(p, x).reshape(-1))(sub)
    rows = [j.reshape(j.shape[0], -1) for j in jax.tree.leaves(jac)]
    return sum(r @ r.T for r in rows)


def ntk_cross(network: Network, params: Params, x_query: Array, x_support: Array, alpha: Array,
              *, subset: str = "all") -> Array:
    """``Theta(X*, X) alpha = J(X*) (J(X)^T alpha)``: one VJP and one JVP, no cross matrix."""
    fn, sub = _subset_apply(network, params, subset)
    _, pullback = jax.vjp(lambda p: fn(p, x_support), sub)
    (delta,) = pullback(alpha.astype(jnp.result_type(*jax.tree.leaves(sub))))
    _, out = jax.jvp(lambda p: fn(p, x_query), (sub,), (delta,))
    return out


KernelBuilder = Callable[[Network], Kernel]
KERNELS: Registry[KernelBuilder] = Registry("meta-kernel")


@KERNELS.register("ntk")
def ntk(network: Network) -> Kernel:
    """Empirical NTK of all parameters (I-AMFS default)."""
    return Kernel(
        gram=lambda p, x: ntk_gram(network, p, x),
        cross=lambda p, xq, xs, a: ntk_cross(network, p, xq, xs, a),
    )


@KERNELS.register("ntk_head")
def ntk_head(network: Network) -> Kernel:
    """Empirical NTK of the linear head only: ``(phi(x) . phi(x') + 1) I_o`` -- cheap, body trained by the outer loop."""
    return Kernel(
        gram=lambda p, x: ntk_gram(network, p, x, subset="head"),
        cross=lambda p, xq, xs, a: ntk_cross(network, p, xq, xs, a, subset="head"),
    )


# ----------------------------------------------------------------------------- solves


def _report_jitter(jitter_value) -> None:
    # A fixed message, so Python's default filter shows it once per call site instead of
    # once per meta-step; the size of the jitter is in the ``kernel_jitter`` metric.
    if np.any(np.asarray(jitter_value) > 0):
        warnings.warn(
            "ill-conditioned kernel solve: jitter was added to the diagonal so the Cholesky factor stays "
            "finite (the amount is reported as the 'kernel_jitter' metric); raise the ridge, or check for "
            "duplicate support points, to silence this",
            IllConditionedWarning,
            stacklevel=2,
        )


def warn_if_jittered(jitter: Array) -> None:
    """Warns (:class:`IllConditionedWarning`) if any ``jitter > 0``; works eagerly and under ``jit``.

    Under tracing the check runs as one ``jax.debug.callback``; callers that ``vmap``
    over tasks pass ``warn=False`` to the solver and call this once on the batch
    maximum, because a callback inside ``vmap`` runs once per task on the host.
    """
    if isinstance(jitter, jax.core.Tracer):
        jax.debug.callback(_report_jitter, jitter)
    else:
        _report_jitter(jitter)


def regularised_cholesky(matrix: Array, ridge: Array | float, *, rcond: float | None = None,
                         warn: bool = True) -> tuple[Array, Array]:
    """Cholesky factor of ``matrix + (ridge + jitter) I``, with jitter only when needed.

    The jitter lifts the smallest eigenvalue of the regularised matrix to at least
    ``rcond * lambda_max`` (``rcond`` = 1e-5 in float32, 1e-12 in float64), so the
    factor is finite for singular or indefinite-by-rounding kernels. It is computed
    from the eigenvalues under ``stop_gradient``: a numerical safeguard, not part
    of the model, so gradients flow through the Cholesky solve alone.

    Args:
      matrix: symmetric ``[n, n]``.
      ridge: the regulariser ``lambda >= 0`` (scalar).
      rcond: smallest allowed eigenvalue ratio.
      warn: emit an :class:`IllConditionedWarning` (via ``jax.debug.callback``) when jitter is added.

    Returns:
      ``(L, jitter)`` with ``L L^T = matrix + (ridge + jitter) I``.
    """
    n = matrix.shape[-1]
    if rcond is None:
        rcond = 1e-5 if matrix.dtype == jnp.float32 else 1e-12
    eigenvalues = jnp.linalg.eigvalsh(jax.lax.stop_gradient(matrix))
    top = jnp.maximum(jnp.abs(eigenvalues).max(), jnp.finfo(matrix.dtype).tiny)
    ridge = jnp.asarray(ridge, matrix.dtype)
    jitter = jnp.maximum(rcond * top - (eigenvalues[0] + jax.lax.stop_gradient(ridge)), 0.0)
    if warn:
        warn_if_jittered(jitter)
    factor = jnp.linalg.cholesky(matrix + (ridge + jitter) * jnp.eye(n, dtype=matrix.dtype))
    return factor, jitter


def ridge_coefficients(gram: Array, residual: Array, ridge: Array | float, *,
                       warn: bool = True) -> tuple[Array, Array]:
    """``alpha = (Theta + lambda I)^{-1} r`` by a (jittered if needed) Cholesky solve.

    Args:
      gram: ``[N, N]`` kernel matrix.
      residual: ``[N]`` or ``[N, k]`` right-hand side ``Y - f0(X)``.
      ridge: ``lambda``.
      warn: warn here if jitter was needed (``False`` when the caller reports it, e.g. per batch).

    Returns:
      ``(alpha, jitter)``: coefficients shaped like ``residual`` and the jitter used (0 if none).
    """
    factor, jitter = regularised_cholesky(gram, ridge, warn=warn)
    return jax.scipy.linalg.cho_solve((factor, True), residual), jitter


def flow_coefficients(gram: Array, residual: Array, time: Array | float) -> Array:
    """``alpha = Theta^{-1} (I - exp(-t Theta)) r``, evaluated without inverting ``Theta``.

    ``Theta^{-1} (I - exp(-t Theta)) = t phi1(-t Theta)`` with ``phi1(z) = (e^z - 1) / z``,
    an entire function, so the coefficients are finite even for a singular kernel
    (directions with zero eigenvalue contribute ``t r``, the small-eigenvalue limit).
    ``phi1(A) r`` is the top-right block of ``expm([[A, r], [0, 0]])`` (Higham, 2008,
    Thm 10.4), so one differentiable matrix exponential gives it.

    Args:
      gram: ``[N, N]`` kernel matrix.
      residual: ``[N]`` right-hand side ``Y - f0(X)``.
      time: flow time ``t = lr * steps`` (in units of the summed squared-error loss).

    Returns:
      ``alpha`` ``[N]``.
    """
    n = gram.shape[-1]
    vector = residual.reshape(n, -1)
    k = vector.shape[1]
    block = jnp.zeros((n + k, n + k), gram.dtype)
    block = block.at[:n, :n].set(-time * gram).at[:n, n:].set(vector)
    phi_r = jax.scipy.linalg.expm(block)[:n, n:]
    return (time * phi_r).reshape(residual.shape)
