"""Closed-form and reference checks of the merge parts and presets; sharded merges."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metafit.merge as mm
from metafit.merge import methods, parts
from metafit.merge.methods import MERGE_METHODS, merge_tensor_jit
from metafit.registry import UnknownNameError


def tree(seed, shift=0.0):
    """Nested dicts, float32 and bfloat16, 2-D and 1-D, an integer: every merge compiles two programs,
    (6, 5) float32 (kernel and emb; also the models of test_merge_recipe) and (5,) bfloat16."""
    rng = np.random.default_rng(seed)
    return {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((6, 5)) + shift, jnp.float32),
                  "bias": jnp.asarray(rng.standard_normal(5) + shift, jnp.bfloat16)},
        "emb": jnp.asarray(rng.standard_normal((6, 5)) + shift, jnp.float32),
        "count": jnp.asarray(seed, jnp.int32),
    }


def finetunes(base, n=3, seed=1, same_sign=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        def perturb(x):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                return x
            d = rng.standard_normal(x.shape)
            return (x + (np.abs(d) if same_sign else d) * 0.1).astype(x.dtype)
        out.append(jax.tree.map(perturb, base))
    return out


def close(a, b, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                                         atol=atol, rtol=0), a, b)


# ----------------------------------------------------------------------------- sharding
# First in the file: this subprocess (a JAX start, nine merge programs) is the file's longest test, and xdist
# (loadfile) hands a worker its next file once at most two tests of its current file are left.

SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import metafit.merge as mm
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    # two tensors of one shape (the single-device merges compile once per method), laid out differently:
    # "a" split over both mesh axes, "b" over "data" only and replicated over "model"
    base = {name: jnp.asarray(rng.standard_normal((64, 48)), jnp.float32) for name in "ab"}
    fts = [jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape), jnp.float32) * 0.1, base) for _ in range(2)]
    key = jax.random.key(0)
    single = [mm.ties(base, fts, 0.3, 0.8), mm.merge("dare_ties", base, fts, drop_rate=0.5, key=key),
              mm.breadcrumbs(base, fts, 0.2, 0.05)]
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    spec = {"a": NamedSharding(mesh, P("data", "model")), "b": NamedSharding(mesh, P("data", None))}
    put = lambda t: jax.tree.map(jax.device_put, t, spec)
    sbase, sfts = put(base), [put(f) for f in fts]
    sharded = [mm.ties(sbase, sfts, 0.3, 0.8), mm.merge("dare_ties", sbase, sfts, drop_rate=0.5, key=key),
               mm.breadcrumbs(sbase, sfts, 0.2, 0.05)]
    assert len(sharded[0]["a"].sharding.device_set) == 8 and len(sharded[0]["b"].sharding.device_set) == 8
    for s, m in zip(single, sharded):
        for x, y in zip(jax.tree.leaves(s), jax.tree.leaves(m)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    print("SHARDED-OK")
""")


def test_merge_on_8_fake_devices_equals_single_device():
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=120)
    assert "SHARDED-OK" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------- parts

@pytest.mark.parametrize("n", [7, 64, 1000])
def test_magnitude_mask_keeps_exactly_k_largest_even_with_ties(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        x = rng.integers(-3, 4, size=n).astype(np.float32)  # many exact ties
        k = int(rng.integers(0, n + 1))
        mask = np.asarray(jax.jit(parts.magnitude_mask)(jnp.asarray(x), k))
        assert mask.sum() == k
        if 0 < k < n:
            assert np.abs(x[mask]).min() >= np.abs(x[~mask]).max()


def test_breadcrumbs_window_drops_outliers_and_small_entries():
    x = jnp.arange(1.0, 11.0)  # magnitudes 1..10
    kept = jax.jit(parts.sparsify_breadcrumbs)(x, 3, 2)  # drop top 2 (10, 9), keep next 3 (8, 7, 6); one program
    np.testing.assert_array_equal(np.nonzero(np.asarray(kept))[0], [5, 6, 7])


# ----------------------------------------------------------------------------- closed forms

def test_ties_of_identical_finetunes_at_scale_one_returns_the_finetune():
    base, ft = tree(0), finetunes(tree(0), 1)[0]
    # two copies: the programs compiled for the two-model checks below are reused
    close(mm.ties(base, [ft, ft], density=1.0, scale=1.0), ft, atol=1e-6)


def test_ties_density_one_without_conflicts_is_task_arithmetic():
    base = tree(0)
    del base["dense"]["bias"]  # bf16 rounding can zero a small delta, and a zero entry agrees with no sign
    fts = finetunes(base, 2, same_sign=True)
    close(mm.ties(base, fts, density=1.0, scale=0.9), mm.task_arithmetic(base, fts, 0.9 / len(fts)), atol=1e-5)


def numpy_ties(base, fts, density, scale):
    """TIES exactly as Yadav et al. 2023 describe it, per tensor, in numpy."""
    deltas = np.stack([f - base for f in fts]).astype(np.float64)
    trimmed = []
    for d in deltas:
        k = max(1, int(density * d.size))
        order = np.argsort(-np.abs(d).ravel(), kind="stable")
        keep = np.zeros(d.size, bool)
        keep[order[:k]] = True
        trimmed.append(np.where(keep.reshape(d.shape), d, 0.0))
    trimmed = np.stack(trimmed)
    sign = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(trimmed) == sign
    count = agree.sum(0)
    mean = np.where(count > 0, (trimmed * agree).sum(0) / np.maximum(count, 1), 0.0)
    return base + scale * mean


def test_ties_matches_a_numpy_reference_with_sign_conflicts():
    kernel = lambda t: {"kernel": t["dense"]["kernel"]}  # the tensor compared (one compiled program, not four)
    base = tree(0)
    fts = finetunes(base, 4, seed=3)
    merged = mm.ties(kernel(base), [kernel(f) for f in fts], density=0.3, scale=0.7)
    expected = numpy_ties(np.asarray(base["dense"]["kernel"]), [np.asarray(f["dense"]["kernel"]) for f in fts], 0.3, 0.7)
    np.testing.assert_allclose(np.asarray(merged["kernel"]), expected, atol=1e-6)


def test_dare_with_zero_drop_rate_is_task_arithmetic():
    base = tree(0)
    fts = finetunes(base, 2)
    close(mm.dare(base, fts, 0.0, 0.5, key=jax.random.key(1)), mm.task_arithmetic(base, fts, 0.5), atol=0)


def test_dare_drops_at_rate_p_and_rescales_survivors():
    base = {"w": jnp.zeros((200, 100))}
    ft = {"w": jnp.ones((200, 100))}
    merged = np.asarray(mm.dare(base, [ft], 0.75, 1.0, key=jax.random.key(0))["w"])
    assert set(np.unique(merged)) <= {0.0, 4.0}
    assert abs((merged != 0).mean() - 0.25) < 0.01
    other = np.asarray(mm.dare(base, [ft], 0.75, 1.0, key=jax.random.key(1))["w"])
    assert (other != merged).any()


def test_slerp_endpoints_and_midpoint_on_the_sphere():
    a, b = tree(0), tree(5)
    del a["count"], b["count"]  # integer leaves are copied from the first model, not interpolated
    close(mm.slerp(a, b, 0.0), a, atol=0)
    close(mm.slerp(a, b, 1.0), b, atol=0)
    x, y = {"v": jnp.array([1.0, 0.0])}, {"v": jnp.array([0.0, 1.0])}
    np.testing.assert_allclose(mm.slerp(x, y, 0.5)["v"], [np.sqrt(0.5)] * 2, atol=1e-6)


def test_model_stock_closed_form_for_two_orthogonal_equal_offsets():
    base = {"w": jnp.zeros(2)}
    fts = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}]
    # cos = 0 -> t = 2·0 / (1 + 0) = 0: orthogonal updates carry no shared signal, keep the base.
    close(mm.model_stock(base, fts), base)
    fts = [{"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([1.0, 0.0])}]
    cos = 1 / np.sqrt(2)
    t = 2 * cos / (1 + cos)
    np.testing.assert_allclose(mm.model_stock(base, fts)["w"], t * np.array([1.0, 0.5]), atol=1e-6)


def test_fisher_merge_closed_form():
    models = [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 6.0])}]
    fishers = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([3.0, 1.0])}]
    merged = mm.fisher_merge(models, fishers, fisher_floor=0.0)
    np.testing.assert_allclose(merged["w"], [(1 + 9) / 4, 6.0], atol=1e-6)


def test_diagonal_fisher_of_a_gaussian_linear_model_is_mean_x_squared():
    # log p(y | x) = −(y − w·x)²/2 + c  ->  score = (y − w·x) x; with y = w·x + 1: F = mean x².
    x = jnp.asarray(np.random.default_rng(0).standard_normal((50, 3)), jnp.float32)
    w = jnp.array([0.5, -1.0, 2.0])
    fisher = mm.diagonal_fisher(lambda p, ex: -0.5 * (ex[1] - p @ ex[0]) ** 2, w, (x, x @ w + 1.0))
    np.testing.assert_allclose(fisher, np.mean(np.asarray(x) ** 2, axis=0), rtol=1e-5)


def test_task_vector_roundtrip_and_nnx_state():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    _, base = nnx.split(model, nnx.Param)
    ft = jax.tree.map(lambda x: x + 1.0, base)
    merged = mm.task_arithmetic(base, [ft, ft], 0.5)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    close(merged, ft)
    close(mm.apply_task_vector(base, mm.task_vector(base, ft), 1.0), ft)


# ----------------------------------------------------------------------------- shared registry checks

@pytest.mark.parametrize("name", MERGE_METHODS.names())
def test_every_method_preserves_structure_and_dtypes_and_copies_integers(name):
    method = MERGE_METHODS.get(name)
    base = tree(0)
    models = finetunes(base, 2)
    extra = {"fisher": [jax.tree.map(lambda x: jnp.abs(x).astype(jnp.float32), m) for m in models]} \
        if method.tensor_inputs else {}
    merged = mm.merge(name, base if method.needs_base else None, models, key=jax.random.key(0), **extra)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
        assert got.dtype == want.dtype and got.shape == want.shape
    assert int(merged["count"]) == (0 if method.needs_base else int(models[0]["count"]))


@pytest.mark.parametrize("name", MERGE_METHODS.names())
def test_merging_identical_models_returns_the_model(name, monkeypatch):
    method = MERGE_METHODS.get(name)
    model = tree(0)
    extra = {"fisher": [jax.tree.map(jnp.ones_like, model)] * 2} if method.tensor_inputs else {}
    merge_identical = lambda: mm.merge(name, model if method.needs_base else None, [model, model],  # noqa: E731
                                       key=jax.random.key(0), **extra)
    jax.tree.map(assert_bit_identical, merge_identical(), model)  # copied
    # the compiled merge itself returns the model too: why copying unchanged tensors is right for every method
    monkeypatch.setattr(methods, "_unchanged", lambda reference, models: False)
    close(merge_identical(), model, atol=1e-6)


def assert_bit_identical(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


@pytest.mark.parametrize("name", MERGE_METHODS.names())
def test_tensors_no_model_changed_are_copied_without_compiling_a_merge(name, monkeypatch):
    """The fine-tunes change dense/kernel only: it alone goes through the compiled merge, the rest come back
    bit-identical to the base."""
    method = MERGE_METHODS.get(name)
    base = tree(0)
    models = [{**base, "dense": {**base["dense"], "kernel": model["dense"]["kernel"]}} for model in finetunes(base, 2)]
    merged_shapes = []

    def recorded(method, base, models, *rest, compiled=methods.merge_tensor_jit):
        merged_shapes.append(models[0].shape)
        return compiled(method, base, models, *rest)

    monkeypatch.setattr(methods, "merge_tensor_jit", recorded)
    extra = {"fisher": [jax.tree.map(jnp.ones_like, m) for m in models]} if method.tensor_inputs else {}
    merged = mm.merge(name, base if method.needs_base else None, models, key=jax.random.key(0), **extra)
    assert merged_shapes == [(6, 5)]
    assert not np.array_equal(merged["dense"]["kernel"], base["dense"]["kernel"])
    for got, want in ((merged["dense"]["bias"], base["dense"]["bias"]), (merged["emb"], base["emb"]),
                      (merged["count"], base["count"])):
        assert_bit_identical(got, want)


def test_new_hyperparameter_values_do_not_recompile():
    base = tree(0)
    fts = finetunes(base, 2)
    mm.ties(base, fts, density=0.2, scale=1.0)
    before = merge_tensor_jit._cache_size()
    mm.ties(base, fts, density=0.5, scale=0.3)
    assert merge_tensor_jit._cache_size() == before


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_fail_with_a_named_cause():
    base = tree(0)
    fts = finetunes(base, 2)
    wrong = dict(fts[1], dense={"kernel": jnp.zeros((6, 4)), "bias": fts[1]["dense"]["bias"]})
    with pytest.raises(mm.MergeError, match="tensor 'dense.kernel' has shape"):
        mm.ties(base, [fts[0], wrong])
    with pytest.raises(mm.MergeError, match=r"'density' must be in \(0, 1\]"):
        mm.ties(base, fts, density=1.5)
    with pytest.raises(mm.MergeError, match="sum to 1.2"):
        mm.linear(fts, [0.6, 0.6])
    with pytest.raises(mm.MergeError, match="did you mean 'density'"):
        mm.merge("ties", base, fts, densty=0.3)
    with pytest.raises(mm.MergeError, match="needs 2 models"):
        mm.merge("slerp", None, fts + [base], t=0.5)
    with pytest.raises(mm.MergeError, match="random"):
        mm.merge("dare_ties", base, fts)
    with pytest.raises(UnknownNameError, match="did you mean 'ties'"):
        mm.merge("tiez", base, fts)


def test_a_users_rule_runs_on_unchanged_tensors_and_presets_copy_them():
    # the copy shortcut holds for every preset (task vectors are 0, weighted means of one tensor);
    # a user's rule may not return its reference for equal inputs, so it is always run
    from metafit.merge.methods import MERGE_METHODS, MergeMethod, merge_tensor

    doubled = MergeMethod("doubled_for_test", lambda base, models, params, key: 2.0 * models[0],
                          needs_base=False, per_model=(), shared=())
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(merge_tensor(doubled, None, [x, x], {}, None), 2.0 * x)
    assert all(MERGE_METHODS.get(name).copies_unchanged for name in MERGE_METHODS.names())
