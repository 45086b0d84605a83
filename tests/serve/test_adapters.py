"""Heterogeneous multi-LoRA batching: a mixed batch = each request alone = metafit.peft's LoRA; no recompiles.

The references are the LoRA models with the adapter folded into the weights by metafit.peft
(``merge_lora``): they share the base model's structure, so one compiled forward serves them all.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metafit.models as mm
import metafit.peft as peft
from metafit.serve.adapters import (AdapterBank, AdapterError, _write_slot, adapter_folder, rank_class, read_lora_adapter,
                                    select_units, unit_buckets)
from serve_tiny import tiny_folder

SPECS = {  # rank 4 -> class 8, rank 9 (rsLoRA) -> class 16 padded, rank 16 -> class 16, rank 32; different targets
    "a": dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj")),
    "b": dict(rank=16, alpha=16.0, targets=("o_proj", "down_proj", "q_proj")),
    "c": dict(rank=9, alpha=4.0, use_rslora=True, targets=("up_proj",)),
    "d": dict(rank=32, alpha=16.0, targets=("q_proj", "v_proj", "up_proj", "down_proj")),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    folder = tiny_folder(root / "base", num_hidden_layers=1)
    references = {}
    for seed, (name, spec) in enumerate(SPECS.items()):
        model, _ = mm.load(folder, tokenizer=False)
        peft.apply(model, peft.LoraConfig(init="random", **spec), rngs=nnx.Rngs(seed))
        peft.export_hf_peft(model, root / name, base_model_name_or_path=folder)
        references[name] = peft.merge_lora(model)
    references[None] = mm.load(folder, tokenizer=False)[0]
    served = mm.load(folder, tokenizer=False)[0]
    bank = AdapterBank(served, {8: 2, 16: 2, 32: 1}, batch_size=4)
    adapters = {name: read_lora_adapter(served, root / name, name) for name in SPECS}
    return root, folder, references, served, bank, adapters


@jax.jit
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def _warm_every_unit_bucket(served, bank, ids) -> int:
    """Compiles the forward for every unit bucket (as the engine's warm-up does); returns the programs compiled."""
    for units in bank.unit_buckets:
        select_units(bank.modules.values(), bank.rows([None] * 4, min_units=units))
        _forward(*nnx.split(served), ids)
    return _forward._cache_size()


def test_rank_classes_and_unit_buckets():
    assert [rank_class(r) for r in (1, 8, 9, 16, 17, 64, 65, 300)] == [8, 8, 16, 16, 32, 64, 128, 512]
    assert unit_buckets(8, 4) == (8, 16, 32) and unit_buckets(4, 1) == (4,) and unit_buckets(1, 64)[-1] == 64
    assert len(unit_buckets(8, 64)) == 7  # rank 512: 7 sizes, so 7 compiled forwards per bucket pair


def test_mixed_batch_equals_each_alone_and_peft_without_recompiling(setup):
    _, _, references, served, bank, adapters = setup
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 100, (4, 6)), jnp.int32)
    names = ["a", None, "b", "c"]
    peft_logits = {name: np.asarray(_forward(*nnx.split(references[name]), ids)) for name in names}
    bank.set_rows([None] * 4)
    base_logits = _forward(*nnx.split(served), ids)
    compiled, writes = _warm_every_unit_bucket(served, bank, ids), _write_slot._cache_size()
    for adapter in adapters.values():
        bank.load(adapter)
    assert _write_slot._cache_size() - writes <= 3  # one write program per rank class, not per module shape
    assert {n: (i.rank_class, i.slot, i.units) for n, i in bank.loaded.items()} == {
        "a": (8, 0, 1), "b": (16, 0, 2), "c": (16, 1, 2), "d": (32, 0, 4)}
    bank.set_rows(names)
    mixed = np.asarray(_forward(*nnx.split(served), ids))
    np.testing.assert_allclose(mixed[1], np.asarray(base_logits)[1], atol=1e-5)
    for row, name in enumerate(names):
        bank.set_rows([name] * 4)  # the same request served alone (every row the same adapter)
        alone = np.asarray(_forward(*nnx.split(served), ids))[row]
        through_peft = peft_logits[name][row]
        np.testing.assert_allclose(mixed[row], alone, atol=1e-5)
        np.testing.assert_allclose(mixed[row], through_peft, atol=1e-5)
        if name is not None:  # the adapter does change the output
            assert np.abs(through_peft - np.asarray(base_logits)[row]).max() > 0.1
    assert _forward._cache_size() == compiled  # loading adapters wrote slots; the forward did not recompile
    bank.unload("b")
    bank.set_rows([None, None, None, None])
    b_again = read_lora_adapter(served, adapters["b"].source, "b2")
    assert bank.load(b_again).slot == 0  # the freed slot is reused
    bank.unload("b2")
    bank.load(adapters["b"])


def test_rank8_row_among_rank32_rows_equals_alone_within_the_warm_programs(setup):
    _, _, references, served, bank, adapters = setup
    for name in set(("a", "d")) - set(bank.loaded):  # loaded by the test above when it ran first
        bank.load(adapters[name])
    ids = jnp.asarray(np.random.RandomState(1).randint(3, 100, (4, 6)), jnp.int32)
    peft_logits = {name: np.asarray(_forward(*nnx.split(references[name]), ids)) for name in ("a", "d")}
    compiled = _warm_every_unit_bucket(served, bank, ids)
    names = ["d", "a", "d", "d"]  # 4 + 1 + 4 + 4 = 13 units: the rank-8 row computes 1 of them, not 1 + 2 + 4
    route = bank.rows(names)
    assert route.rows.tolist() == [0] * 4 + [1] + [2] * 4 + [3] * 4 + [3] * 3 and len(route.rows) == 16
    bank.set_rows(names)
    mixed = np.asarray(_forward(*nnx.split(served), ids))
    for name, row in (("a", 1), ("d", 0), ("d", 3)):
        bank.set_rows([name] * 4)
        np.testing.assert_allclose(mixed[row], np.asarray(_forward(*nnx.split(served), ids))[row], atol=1e-5)
        np.testing.assert_allclose(mixed[row], peft_logits[name][row], atol=1e-5)
    assert _forward._cache_size() == compiled  # every routing ran one of the len(unit_buckets) warm programs


def test_bad_adapters_are_named(setup, tmp_path):
    root, folder, _, served, bank, adapters = setup
    with pytest.raises(AdapterError, match="already loaded"):
        bank.load(adapters["a"])
    small = AdapterBank(mm.load(folder, tokenizer=False)[0], {8: 1}, targets=("q_proj",), batch_size=2)
    with pytest.raises(AdapterError, match="v_proj, which the server does not adapt"):
        small.load(adapters["a"])
    with pytest.raises(AdapterError, match="class 16"):
        AdapterBank(mm.load(folder, tokenizer=False)[0], {8: 1}, batch_size=2).load(adapters["b"])
    dora, _ = mm.load(folder, tokenizer=False)
    peft.apply(dora, peft.LoraConfig(rank=4, use_dora=True), rngs=nnx.Rngs(0))
    peft.export_hf_peft(dora, tmp_path / "dora", base_model_name_or_path=folder)
    with pytest.raises(AdapterError, match="DoRA"):
        read_lora_adapter(served, tmp_path / "dora", "d")
    with pytest.raises(AdapterError, match="powers of two"):
        AdapterBank(mm.load(folder, tokenizer=False)[0], {12: 1}, batch_size=2)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    for f in (root / "a").iterdir():
        (run / "adapter" / f.name).write_bytes(f.read_bytes())
    assert adapter_folder(run) == run / "adapter"  # a metafit run folder holding one adapter
    with pytest.raises(AdapterError, match="neither an adapter folder"):
        adapter_folder(tmp_path / "dora" / "..")
