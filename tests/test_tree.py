"""One spelling of pytree key paths: jax key entries and NNX paths name leaves the same way."""
import jax
from flax import nnx

from metafit.models.mlp import MLP
from metafit.tree import key_name, path_name


def test_jax_key_entries_and_nnx_paths_spell_the_same():
    tree = {"layers": [{"w": 1}], "head": 2}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert [path_name(p) for p, _ in flat] == ["head", "layers.0.w"]
    assert path_name(flat[1][0], sep="/") == "layers/0/w"
    assert key_name(jax.tree_util.GetAttrKey("kernel")) == "kernel"
    assert key_name(jax.tree_util.SequenceKey(3)) == "3"
    nnx_paths = [p for p, _ in nnx.to_flat_state(nnx.state(MLP(2, (), 1, rngs=nnx.Rngs(0)), nnx.Param))]
    assert [path_name(p) for p in nnx_paths] == ["head.bias", "head.kernel"]


def test_skip_leaves_out_wrapper_links():
    assert path_name(("encoder", "layer", 0, "query", "base_layer", "kernel"), skip=("base_layer",)) == \
        "encoder.layer.0.query.kernel"
