"""Search space validation, meta-dataset files, meta-features (closed forms)."""
import json

import numpy as np
import pytest

from metafit.hpo import metadataset
from metafit.hpo.space import Range, SearchSpace, space_from_dict
from metafit.hpo.tasks import check_meta_features, entropy
from hpo_fixtures import TINY_SPACE, meta_file  # noqa: F401 (a fixture)


@pytest.mark.parametrize("raw, message", [
    ({"lr": {"low": 1e-2, "high": 1e-4, "log": True}}, "empty or inverted"),
    ({"dropout": {"low": 0.1, "high": 0.1}}, "empty or inverted"),
    ({"lr": {"low": 0.0, "high": 1e-2, "log": True}}, "log range needs low > 0"),
    ({"rank": []}, "choice list is empty"),
    ({"steps": [10]}, "multiple of space.fidelities"),
    ({"peft": ["prefix"]}, "not searchable"),
])
def test_bad_spaces_are_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        space_from_dict(raw)


def test_unknown_space_key_names_it():
    from metafit.config import ConfigError

    with pytest.raises(ConfigError, match="lr_max"):
        space_from_dict({"lr_max": 1.0})


def test_encode_is_unit_scaled_and_one_hot():
    space = SearchSpace()
    point = dict(space.default, lr=np.sqrt(1e-4 * 5e-2), dropout=0.2)
    x = space.encode(point)
    assert x.shape == (space.dim,)
    assert x[0] == pytest.approx(0.5, abs=1e-6) and x[3] == pytest.approx(1.0)  # log midpoint; top of range
    assert x[4:].sum() == len(space.choices())  # one hot per choice field
    for seed in range(5):
        sample = space.sample(np.random.default_rng(seed))
        space.check_point(sample)
        assert ((space.encode(sample) >= 0) & (space.encode(sample) <= 1)).all()
    assert Range(1.0, 100.0, log=True).from_unit(0.5) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="outside the space"):
        space.check_point(dict(space.default, lr=1.0))


def test_entropy_and_meta_features_checks():
    assert entropy(["a", "b", "a", "b"]) == pytest.approx(np.log(2))
    assert entropy(["a"] * 5) == 0.0
    with pytest.raises(ValueError, match="no meta-features"):
        check_meta_features({"log_n_train": 1.0}, "task x")


def test_meta_dataset_roundtrip_and_version_check(meta_file, tmp_path):
    meta = metadataset.load(meta_file, TINY_SPACE)
    assert meta.loss.shape == (4, 10, 4) and meta.complete.all()
    norm = meta.normalised()
    assert norm.min() == pytest.approx(0.0) and norm[:, :, -1].max() == pytest.approx(1.0)
    with pytest.raises(metadataset.MetaDatasetError, match="generated over search space 'test-tiny'"):
        metadataset.load(meta_file, SearchSpace())


def test_pack_joins_run_files_and_keeps_configs_finished_everywhere(tmp_path):
    from metafit.config import to_dict

    out = tmp_path / "gen"
    (out / "tasks").mkdir(parents=True)
    configs = metadataset.config_list(TINY_SPACE, 3)
    (out / "space.json").write_text(json.dumps({"space": to_dict(TINY_SPACE), "configs": configs, "model": "m"}))
    feats = {f: 1.0 for f in metadataset.META_FEATURES}
    for task, done in (("a", 3), ("b", 2)):
        (out / "tasks" / f"{task}.json").write_text(json.dumps(feats))
        (out / task).mkdir()
        for c in range(done):
            status = "failed" if (task, c) == ("b", 1) else "ok"
            curve = {str(s): 1.0 / s for s in TINY_SPACE.fidelity_steps(configs[c])} if status == "ok" else {}
            (out / task / f"{c:04d}.json").write_text(json.dumps({"status": status, "curve": curve, "seconds": 2.0}))
    packed = tmp_path / "packed.json"
    metadataset.pack(out, packed, command="test")
    meta = metadataset.load(packed, TINY_SPACE)
    assert meta.tasks == ("a", "b") or set(meta.tasks) == {"a", "b"}
    assert len(meta.configs) == 2  # config 2 is missing on task b
    assert meta.complete.sum() == 3 and np.isnan(meta.loss[list(meta.tasks).index("b"), 1]).all()
    assert meta.loss[0, 0].tolist() == [1.0, 0.5, pytest.approx(1 / 3, abs=1e-5), 0.25]


def _generation(tmp_path, n_configs: int, done: dict[str, list[int]]):
    """A generation folder: ``n_configs`` configs in space.json, run files of the configs ``done[task]``."""
    from metafit.config import to_dict

    out = tmp_path / "gen"
    (out / "tasks").mkdir(parents=True)
    configs = metadataset.config_list(TINY_SPACE, n_configs)
    (out / "space.json").write_text(json.dumps({"space": to_dict(TINY_SPACE), "configs": configs, "model": "m"}))
    feats = {f: 1.0 for f in metadataset.META_FEATURES}
    for task, finished in done.items():
        (out / "tasks" / f"{task}.json").write_text(json.dumps(feats))
        (out / task).mkdir()
        for c in finished:  # any config index: a stale file of an earlier, longer generation too
            curve = {str(s): 1.0 / s for s in TINY_SPACE.fidelity_steps(configs[min(c, n_configs - 1)])}
            (out / task / f"{c:04d}.json").write_text(json.dumps({"status": "ok", "curve": curve, "seconds": 2.0}))
    return out


@pytest.mark.parametrize("n_configs, done, max_configs, packed", [
    (4, {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}, 2, 2),      # at most max_configs
    (4, {"a": [0, 2, 3], "b": [0, 1, 2, 3]}, None, 1),      # config 1 missing on a (deleted to rerun): a hole ends it
    (2, {"a": [0, 1, 2], "b": [0, 1, 2]}, 30, 2),           # a stale run file past space.json's configs is not packed
])
def test_pack_takes_the_leading_configs_finished_on_every_task(tmp_path, n_configs, done, max_configs, packed):
    out = _generation(tmp_path, n_configs, done)
    data = metadataset.pack(out, tmp_path / "packed.json", command="test", max_configs=max_configs)
    assert len(data["configs"]) == packed
    assert sorted((r["task"], r["config"]) for r in data["runs"]) == [(t, c) for t in "ab" for c in range(packed)]
