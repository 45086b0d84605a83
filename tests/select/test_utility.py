"""The DELIFT utility kernel against a direct per-pair computation; resume; scaling; bad input."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metafit import select
from metafit.data.instructions import make_instructions
from metafit.select import utility
from tiny_select import tiny  # noqa: F401  (a module-scoped fixture)


@pytest.fixture(scope="module")
def data():
    return make_instructions(8, seed=0)


@pytest.fixture(scope="module")
def distances(tiny, data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("u")
    compiled = utility._tile_with_prefix_cache._cache_size()
    out = utility.pair_distances(*tiny, data[:5], data, workdir=workdir, block=4, batch_pairs=8)
    # both example tiles (heads of different lengths) share one compiled program; the no-example head
    # has its own of one chunk (2) of heads instead of a full tile (4)
    assert utility._tile_with_prefix_cache._cache_size() - compiled <= 2
    return workdir, out


def direct_distances(model, rows):
    """(L2, KL) of each joined prompt ``(ids, response_start, response_len)``, one plain forward each
    (right padding to one length only adds later tokens, which causal attention never sees)."""
    ids = np.zeros((len(rows), 384), np.int32)
    for r, (row, _, _) in enumerate(rows):
        ids[r, :len(row)] = row
    logp = np.asarray(jax.jit(lambda x: jax.nn.log_softmax(model(x), -1))(jnp.asarray(ids)))
    out = []
    for r, (row, start, length) in enumerate(rows):
        picked = logp[r, np.arange(start - 1, start - 1 + length), row[start:start + length]]
        out.append((np.sqrt(((1 - np.exp(picked)) ** 2).mean()), -picked.mean()))
    return np.array(out)


def test_kernel_matches_a_direct_per_pair_computation(tiny, data, distances):
    model, tokenizer = tiny
    _, (bare, joined) = distances
    enc = utility.encode(tokenizer, data[:5], data)
    rows, got = [], []
    for i in range(5):
        for head, value in [(enc.bare_head, bare[:, i])] + [(enc.heads[j], joined[:, i, j]) for j in range(8)]:
            rows.append((head + enc.queries[i], len(head) + enc.response_start[i], enc.response_len[i]))
            got.append(value)
    np.testing.assert_allclose(np.array(got), direct_distances(model, rows), atol=1e-5)
    u = select.utility_matrix(model, tokenizer, data[:5], data, block=4, batch_pairs=8, workdir=distances[0])
    np.testing.assert_allclose(u, bare[0][:, None] - joined[0], atol=1e-6)
    pmi = select.utility_matrix(model, tokenizer, data[:5], data, distance="kl", block=4, batch_pairs=8,
                                workdir=distances[0])
    np.testing.assert_allclose(pmi, bare[1][:, None] - joined[1], atol=1e-6)


def test_without_prefix_reuse_gives_the_same_numbers(tiny, data, distances):
    _, (bare, joined) = distances
    again = utility.pair_distances(*tiny, data[:5], data, block=4, batch_pairs=8, reuse_prefix=False)
    np.testing.assert_allclose(again[1], joined, atol=1e-5)


def test_resume_recomputes_only_missing_tiles_and_refuses_other_runs(tiny, data, distances, tmp_path):
    model, tokenizer = tiny
    workdir, (bare, joined) = distances
    tiles = sorted(p.name for p in workdir.glob("tile_*.npy"))
    assert tiles == ["tile_0_0.npy", "tile_0_1.npy", "tile_1_0.npy", "tile_1_1.npy"]
    marked = np.load(workdir / "tile_1_0.npy")
    np.save(workdir / "tile_1_0.npy", marked + 100.0)  # a finished tile is read, not recomputed
    (workdir / "tile_0_1.npy").unlink()
    again = utility.pair_distances(model, tokenizer, data[:5], data, workdir=workdir, block=4, batch_pairs=8)
    np.testing.assert_allclose(again[1][:, :4, 4:], joined[:, :4, 4:], atol=1e-6)
    np.testing.assert_allclose(again[1][:, 4:, :4], joined[:, 4:, :4] + 100.0, atol=1e-5)
    np.save(workdir / "tile_1_0.npy", marked)
    before = sorted(p.name for p in workdir.iterdir())
    other = nnx.clone(model)
    other.model.norm.weight.value = other.model.norm.weight.value + 1.0
    with pytest.raises(ValueError, match="different model"):
        select.utility_matrix(other, tokenizer, data[:5], data, workdir=workdir, block=4)
    with pytest.raises(ValueError, match="different examples"):
        select.utility_matrix(model, tokenizer, data[:5], data[:6], workdir=workdir, block=4)
    assert sorted(p.name for p in workdir.iterdir()) == before


def test_cache_dir_shares_one_folder_per_kernel(tiny, data, distances, tmp_path):
    model, tokenizer = tiny
    workdir, (bare, joined) = distances
    first = utility.pair_distances(model, tokenizer, data[:5], data, cache_dir=tmp_path, block=4, batch_pairs=8)
    (folder,) = tmp_path.iterdir()
    assert json.loads((folder / "manifest.json").read_text()) == json.loads((workdir / "manifest.json").read_text())
    np.testing.assert_allclose(first[1], joined, atol=1e-6)
    marked = np.load(folder / "tile_1_0.npy")
    np.save(folder / "tile_1_0.npy", marked + 100.0)  # another run asking for the same kernel reads it
    again = utility.pair_distances(model, tokenizer, data[:5], data, cache_dir=tmp_path, block=4, batch_pairs=8)
    np.testing.assert_allclose(again[1][:, 4:, :4], joined[:, 4:, :4] + 100.0, atol=1e-5)
    other = utility.pair_distances(model, tokenizer, data[:5], data[:6], cache_dir=tmp_path, block=4, batch_pairs=8)
    assert len(list(tmp_path.iterdir())) == 2  # another example set: its own folder, the first untouched
    np.testing.assert_allclose(other[1], joined[:, :, :6], atol=1e-5)
    np.testing.assert_allclose(np.load(folder / "tile_1_0.npy"), marked + 100.0)
    with pytest.raises(ValueError, match="not both"):
        utility.pair_distances(model, tokenizer, data[:5], data, workdir=workdir, cache_dir=tmp_path, block=4)


def test_bad_pairs_are_named_before_compute(tiny, data):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"examples\[1\] has an empty response"):
        select.utility_matrix(model, tokenizer, data[:2], [data[0], ("Say nothing.", " ")])
    short = ("Say hi.", "hi")
    with pytest.raises(ValueError, match=r"examples\[1\] .* more than the model's context of 2048"):
        select.utility_matrix(model, tokenizer, [short], [short, ("x" * 2100, "y")])
    with pytest.raises(ValueError, match=r"queries\[0\] takes .* more than the model's context"):
        select.utility_matrix(model, tokenizer, [("x" * 2100, "y")], [short])
    with pytest.raises(ValueError, match="distance must be"):
        select.utility_matrix(model, tokenizer, [short], [short], distance="cosine")


def test_similarity_from_utility():
    u = np.array([[50.0, 1.0, 3.0], [2.0, -9.0, 0.0], [5.0, -1.0, 7.0]])
    s = select.similarity_from_utility(u)
    off = ~np.eye(3, dtype=bool)
    np.testing.assert_allclose(s[off], (u[off] - (-1.0)) / (5.0 - (-1.0)))  # diagonal left out of min/max
    np.testing.assert_allclose(np.diag(s), 1.0)
    rect = select.similarity_from_utility(u[:, :2])
    np.testing.assert_allclose(rect, (u[:, :2] + 9.0) / 59.0, rtol=1e-6)
    with pytest.raises(ValueError, match="non-finite"):
        select.similarity_from_utility(np.array([[0.0, np.nan], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        select.similarity_from_utility(np.zeros(3))
