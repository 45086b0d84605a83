"""Meta-learned surrogates: a deep-kernel GP of learning-curve points and an MLP cost model (JAX + optax).

Deep-kernel GP (as Quick-Tune, Arango et al. 2024). An observation is configuration ``x`` (encoded,
:meth:`SearchSpace.encode`), task meta-features ``m`` (standardised), fidelity ``f = k / F`` and the
curve prefix ``p`` (the losses at fidelities before ``k``, zero-padded, with their mask). An MLP
``phi`` maps ``u = [x, m, f, p, mask]`` to a 32-d embedding and an exact GP works on it::

    y(u) ~ GP(mu, k),   k(u, u') = s^2 exp(-|phi(u) - phi(u')|^2 / (2 l^2)),   y_obs = y + N(0, sigma^2)

with ``y = loss / zero_shot_loss`` (the held-out loss relative to the untuned model: a scale that a
new task also has). MLP weights, ``mu``, ``s``, ``l``, ``sigma`` minimise the negative log marginal
likelihood of random batches of the meta-dataset (AdamW, 1e-3)::

    -log p(y) = 1/2 (y - mu)^T (K + sigma^2 I)^-1 (y - mu) + 1/2 log|K + sigma^2 I| + n/2 log 2 pi

Prediction conditions the GP on a context (the meta-dataset, plus a target task's observations):
``mean = mu + k_*^T (K + sigma^2 I)^-1 (y - mu)``, ``var = s^2 - k_*^T (K + sigma^2 I)^-1 k_*``.

Fixed shapes: batches, contexts and candidate sets are padded to fixed sizes with a mask, so a
refit or a new prediction reuses the compiled programs. A masked point has its kernel row and
column zeroed and unit diagonal, which leaves the GP over the real points unchanged.

Cost model: an MLP of ``[x, m]`` predicting ``log(seconds of a full run)``, Huber loss.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metafit.hpo.metadataset import MetaDataset
from metafit.hpo.space import SearchSpace

EMBED = 32
HIDDEN = 64
BATCH = 128
CONTEXT_BLOCK = 256  # contexts are padded up to a multiple of this (one compilation per size class)
CANDIDATE_BLOCK = 64


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
    """He-initialised dense layers ``sizes[0] -> ... -> sizes[-1]``."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp(layers: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in layers[:-1]:
        x = jax.nn.gelu(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def rbf(z1: jax.Array, z2: jax.Array, log_scale: jax.Array, log_length: jax.Array) -> jax.Array:
    """``s^2 exp(-|z1 - z2|^2 / (2 l^2))`` for all pairs."""
    sq = jnp.sum((z1[:, None, :] - z2[None, :, :]) ** 2, -1)
    return jnp.exp(2 * log_scale) * jnp.exp(-0.5 * sq / jnp.exp(2 * log_length))


def _masked_system(params, z, y, mask):
    kernel = rbf(z, z, params["log_scale"], params["log_length"]) * (mask[:, None] * mask[None, :])
    noise = jnp.exp(2 * params["log_noise"]) * mask + (1.0 - mask)
    chol = jnp.linalg.cholesky(kernel + jnp.diag(noise))
    resid = (y - params["mean"]) * mask
    return chol, resid


def gp_nll(params, z: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """Negative log marginal likelihood of the unmasked points (see the module docstring)."""
    chol, resid = _masked_system(params, z, y, mask)
    alpha = jax.scipy.linalg.cho_solve((chol, True), resid)
    logdet = 2 * jnp.sum(jnp.log(jnp.diag(chol)) * mask)  # masked diagonal entries are 1: log 1 = 0
    return 0.5 * resid @ alpha + 0.5 * logdet + 0.5 * jnp.sum(mask) * jnp.log(2 * jnp.pi)


def gp_posterior(params, z, y, mask, z_star) -> tuple[jax.Array, jax.Array]:
    """Posterior mean and variance (of the latent ``y``, no observation noise) at ``z_star``."""
    chol, resid = _masked_system(params, z, y, mask)
    k_star = rbf(z, z_star, params["log_scale"], params["log_length"]) * mask[:, None]
    mean = params["mean"] + k_star.T @ jax.scipy.linalg.cho_solve((chol, True), resid)
    v = jax.scipy.linalg.solve_triangular(chol, k_star, lower=True)
    var = jnp.exp(2 * params["log_scale"]) - jnp.sum(v**2, 0)
    return mean, jnp.maximum(var, 1e-9)


def init_gp(key: jax.Array, in_dim: int) -> dict[str, Any]:
    # float32 scalars, not weak-typed Python floats: the first update would change their type and recompile
    scalar = functools.partial(jnp.asarray, dtype=jnp.float32)
    return {"encoder": init_mlp(key, (in_dim, HIDDEN, HIDDEN, EMBED)), "mean": scalar(1.0), "log_scale": scalar(0.0),
            "log_length": scalar(np.log(np.sqrt(EMBED))), "log_noise": scalar(np.log(0.05))}


def embed(params, u: jax.Array) -> jax.Array:
    return mlp(params["encoder"], u)


class Observations(NamedTuple):
    """Curve points in surrogate form: inputs ``u [n, d]``, targets ``y [n]`` (loss / zero-shot loss)."""

    u: np.ndarray
    y: np.ndarray


def observation_inputs(space: SearchSpace, configs: np.ndarray, features: np.ndarray, fidelity: np.ndarray,
                       prefix: np.ndarray) -> np.ndarray:
    """``u = [x, m, f, prefix, prefix mask]``: ``configs [n, dx]``, ``features [n, dm]``, ``fidelity [n]``
    (index k: the point is at ``(k + 1) / F``), ``prefix [n, F - 1]`` (NaN where not observed yet)."""
    frac = (np.asarray(fidelity, np.float32) + 1) / space.fidelities
    seen = np.isfinite(prefix)
    return np.concatenate([configs, features, frac[:, None], np.where(seen, prefix, 0.0), seen], 1).astype(np.float32)


def curve_prefixes(curve: np.ndarray, k: int, fidelities: int) -> np.ndarray:
    """The losses before fidelity ``k`` of each curve ``[n, F]``, NaN-padded to ``F - 1``."""
    out = np.full((curve.shape[0], fidelities - 1), np.nan, np.float32)
    out[:, :k] = curve[:, :k]
    return out


@dataclasses.dataclass
class Surrogate:
    """A fitted deep-kernel GP + cost model with the meta-dataset they condition on.

    Build with :meth:`fit`; :meth:`predict` gives the posterior of ``loss / zero_shot_loss`` for
    candidate (config, fidelity) pairs on a task, given that task's observations so far.
    """

    space: SearchSpace
    params: dict[str, Any]
    cost_params: list
    feature_mean: np.ndarray
    feature_std: np.ndarray
    context: Observations
    cost_scale: tuple[float, float]
    task_features: np.ndarray  # raw meta-features of the training tasks [tasks, features]
    seed: int = 0

    @classmethod
    def fit(cls, meta: MetaDataset, *, steps: int = 300, seed: int = 0, lr: float = 1e-3) -> "Surrogate":
        """Meta-trains both surrogates on every finished run of ``meta``."""
        space = meta.space
        feature_mean, feature_std = meta.features.mean(0), meta.features.std(0) + 1e-6
        context = meta_observations(meta, feature_mean, feature_std)
        key = jax.random.key(seed)
        params = init_gp(key, context.u.shape[1])
        params = _train_gp(params, context, steps, lr, seed)
        cost_x, cost_y = _cost_rows(meta, feature_mean, feature_std)
        cost_params, cost_scale = _train_cost(cost_x, cost_y, seed)
        return cls(space, params, cost_params, feature_mean, feature_std, context, cost_scale, meta.features, seed)

    def training_features(self) -> list[np.ndarray]:
        """Raw meta-features of each task the surrogate was trained on."""
        return list(self.task_features)

    def features(self, raw: dict[str, float] | np.ndarray) -> np.ndarray:
        from metafit.hpo.tasks import check_meta_features

        values = raw if isinstance(raw, np.ndarray) else check_meta_features(raw)
        return ((values - self.feature_mean) / self.feature_std).astype(np.float32)

    def target_observations(self, raw_features, history: Sequence[dict]) -> Observations:
        """Surrogate rows of a task's history: ``{"config": point, "curve": [loss at k=0..], ...}``."""
        zero_shot = float(_zero_shot(raw_features))
        rows_u, rows_y = [], []
        for trial in history:
            curve = np.asarray(trial["curve"], np.float32) / zero_shot
            x = self.space.encode(trial["config"])
            for k, value in enumerate(curve):
                if np.isfinite(value):
                    rows_u.append(self._inputs(x, raw_features, k, curve[None]))
                    rows_y.append(value)
        if not rows_u:
            return Observations(np.zeros((0, self.context.u.shape[1]), np.float32), np.zeros(0, np.float32))
        return Observations(np.concatenate(rows_u), np.asarray(rows_y, np.float32))

    def _inputs(self, x: np.ndarray, raw_features, k: int, curve: np.ndarray) -> np.ndarray:
        n = curve.shape[0]
        feats = np.repeat(self.features(raw_features)[None], n, 0)
        return observation_inputs(self.space, np.repeat(x[None], n, 0), feats, np.full(n, k),
                                  curve_prefixes(curve, k, self.space.fidelities))

    def predict(self, raw_features, points: Sequence[dict], fidelity: Sequence[int],
                history: Sequence[dict] = (), *, params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and std of ``loss / zero_shot_loss`` for each (point, fidelity index).

        Each point's curve prefix comes from ``history`` (the task's observations, matched by config).
        """
        seen = {_key(t["config"]): np.asarray(t["curve"], np.float32) / float(_zero_shot(raw_features))
                for t in history}
        rows = []
        for point, k in zip(points, fidelity):
            curve = seen.get(_key(point), np.full(self.space.fidelities, np.nan, np.float32))
            rows.append(self._inputs(self.space.encode(point), raw_features, int(k), curve[None]))
        u_star = np.concatenate(rows)
        target = self.target_observations(raw_features, history)
        u = np.concatenate([self.context.u, target.u])
        y = np.concatenate([self.context.y, target.y])
        mean, var = _predict_padded(params or self.params, u, y, u_star)
        return mean, np.sqrt(var)

    def refit(self, raw_features, history: Sequence[dict], *, steps: int = 30, lr: float = 1e-3) -> dict:
        """GP parameters trained further on the meta-dataset plus the target's observations (BO with refit)."""
        target = self.target_observations(raw_features, history)
        data = Observations(np.concatenate([self.context.u, target.u]), np.concatenate([self.context.y, target.y]))
        # the target's points are a small share of a batch unless oversampled: give them half of each batch
        weights = np.ones(len(data.y))
        if len(target.y):
            weights[len(self.context.y):] = len(self.context.y) / len(target.y)
        return _train_gp(self.params, data, steps, lr, self.seed + 1 + len(target.y), weights=weights)

    def predict_cost(self, raw_features, points: Sequence[dict]) -> np.ndarray:
        """Predicted seconds of a full run of each point on the task."""
        x = np.stack([np.concatenate([self.space.encode(p), self.features(raw_features)]) for p in points])
        mu, sd = self.cost_scale
        return np.exp(np.asarray(_mlp_jit(self.cost_params, x.astype(np.float32)))[:, 0] * sd + mu)


def _key(point: dict) -> str:
    from metafit.hpo.space import point_key

    return point_key(point)


def _zero_shot(raw_features) -> float:
    from metafit.hpo.tasks import META_FEATURES

    if isinstance(raw_features, dict):
        return raw_features["zero_shot_loss"]
    return float(raw_features[META_FEATURES.index("zero_shot_loss")])


def meta_observations(meta: MetaDataset, feature_mean: np.ndarray, feature_std: np.ndarray,
                      tasks: Sequence[int] | None = None) -> Observations:
    """Every finished curve point of ``meta`` as surrogate rows."""
    from metafit.hpo.tasks import META_FEATURES

    space = meta.space
    x = np.stack([space.encode(c) for c in meta.configs])
    zero_shot = meta.features[:, META_FEATURES.index("zero_shot_loss")]
    rows_u, rows_y = [], []
    for t in tasks if tasks is not None else range(len(meta.tasks)):
        ok = meta.complete[t]
        curve = (meta.loss[t, ok] / zero_shot[t]).astype(np.float32)
        feats = np.repeat(((meta.features[t] - feature_mean) / feature_std)[None], ok.sum(), 0).astype(np.float32)
        for k in range(space.fidelities):
            rows_u.append(observation_inputs(space, x[ok], feats, np.full(ok.sum(), k),
                                             curve_prefixes(curve, k, space.fidelities)))
            rows_y.append(curve[:, k])
    return Observations(np.concatenate(rows_u), np.concatenate(rows_y))


def _train_gp(params, data: Observations, steps: int, lr: float, seed: int, weights: np.ndarray | None = None):
    """AdamW on the NLL of random fixed-size batches (padded and masked when the data is smaller)."""
    n = len(data.y)
    size = min(BATCH, n)
    rng = np.random.default_rng(seed)
    p = None if weights is None else weights / weights.sum()
    opt = optax.adamw(lr)
    state = opt.init(params)
    for _ in range(steps):
        idx = rng.choice(n, size, replace=False, p=p) if p is None or (p > 0).sum() >= size else rng.choice(n, size, p=p)
        u, y, mask = _pad(data.u[idx], data.y[idx], BATCH)
        params, state = _gp_step(params, state, u, y, mask, np.float32(lr))
    return params


@jax.jit
def _gp_step(params, state, u, y, mask, lr):
    opt = optax.adamw(lr)
    loss, grads = jax.value_and_grad(lambda q: gp_nll(q, embed(q, u), y, mask) / jnp.sum(mask))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _pad(u: np.ndarray, y: np.ndarray, size: int):
    """Host (numpy) arrays: a jitted call takes them as they are, where ``jnp.asarray`` would run one
    more device program per array and step."""
    n = len(y)
    mask = np.zeros(size, np.float32)
    mask[:n] = 1
    u_pad = np.zeros((size, u.shape[1]), np.float32)
    u_pad[:n] = u
    y_pad = np.zeros(size, np.float32)
    y_pad[:n] = y
    return u_pad, y_pad, mask


def _block(n: int, block: int) -> int:
    return max(block, -(-n // block) * block)


def _predict_padded(params, u, y, u_star):
    ctx_u, ctx_y, ctx_mask = _pad(u, y, _block(len(y), CONTEXT_BLOCK))
    m = len(u_star)
    star, _, _ = _pad(u_star, np.zeros(m, np.float32), _block(m, CANDIDATE_BLOCK))
    mean, var = _posterior_jit(params, ctx_u, ctx_y, ctx_mask, star)
    return np.asarray(mean)[:m], np.asarray(var)[:m]


_mlp_jit = jax.jit(mlp)  # one compilation per input shape, not one per operation


@jax.jit
def _posterior_jit(params, u, y, mask, u_star):
    return gp_posterior(params, embed(params, u), y, mask, embed(params, u_star))


def _cost_rows(meta: MetaDataset, feature_mean, feature_std):
    x = np.stack([meta.space.encode(c) for c in meta.configs])
    rows, targets = [], []
    for t in range(len(meta.tasks)):
        feats = (meta.features[t] - feature_mean) / feature_std
        for c in range(len(meta.configs)):
            if np.isfinite(meta.cost[t, c]):
                rows.append(np.concatenate([x[c], feats]))
                targets.append(np.log(meta.cost[t, c]))
    return np.asarray(rows, np.float32), np.asarray(targets, np.float32)


def _train_cost(x: np.ndarray, y: np.ndarray, seed: int, steps: int = 300, lr: float = 3e-3):
    """MLP regression of standardised log cost with the Huber loss (full batch, padded to a block)."""
    mu, sd = float(y.mean()), float(y.std() + 1e-6)
    params = init_mlp(jax.random.key(seed + 7), (x.shape[1], HIDDEN, 1))
    size = _block(len(y), CONTEXT_BLOCK)
    xp, yp, mask = _pad(x, (y - mu) / sd, size)
    return _cost_fit(params, xp, yp, mask, np.float32(lr), steps), (mu, sd)


@jax.jit
def _cost_fit(params, x, y, mask, lr, steps):
    """``steps`` full-batch AdamW steps in one compiled loop (the trip count is traced: one compilation)."""
    def loss(q):
        err = optax.huber_loss(mlp(q, x)[:, 0], y)
        return jnp.sum(err * mask) / jnp.sum(mask)

    opt = optax.adamw(lr)

    def step(_, carry):
        params, state = carry
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))[0]
