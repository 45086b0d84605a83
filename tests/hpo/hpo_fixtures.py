"""A small synthetic meta-dataset file (for the surrogate and planner tests: not measurements)."""
import json

import numpy as np
import pytest

from metafit.hpo.metadataset import config_list
from metafit.hpo.space import SearchSpace
from metafit.hpo.tasks import META_FEATURES

TINY_SPACE = SearchSpace(version="test-tiny", steps=(4,), batch_size=(4,), rank=(2, 4), alpha=(4.0, 8.0),
                         targets=(("q_proj", "v_proj"),), peft=("lora",),
                         default={"lr": 1e-2, "weight_decay": 0.0, "warmup": 0.0, "dropout": 0.0, "steps": 4,
                                  "batch_size": 4, "rank": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj"],
                                  "peft": "lora"})


def synthetic_meta_file(path, space=TINY_SPACE, tasks=4, configs=10, seed=0):
    """Curves ``z * (a + b (lr - lr*)^2) * (1 + 1/(k+1)) / 2`` with a task-dependent optimum ``lr*``."""
    from metafit.config import to_dict

    rng = np.random.default_rng(seed)
    points = config_list(space, configs, seed)
    task_names = [f"t{i}" for i in range(tasks)]
    data = {"space_version": space.version, "space": to_dict(space), "model": "synthetic", "command": "synthetic",
            "meta_features": list(META_FEATURES), "tasks": {}, "configs": points, "runs": []}
    for i, name in enumerate(task_names):
        feats = {f: float(rng.uniform(1, 3)) for f in META_FEATURES}
        feats["prompt_tokens"] = 10.0 + 10 * i  # the optimum moves with a meta-feature, so it can transfer
        data["tasks"][name] = feats
        best = -3.5 + 0.5 * i
        for c, p in enumerate(points):
            final = 0.3 + 0.5 * (np.log10(p["lr"]) - best) ** 2
            curve = [feats["zero_shot_loss"] * final * (1 + 1 / (k + 1)) / 2 for k in range(space.fidelities)]
            data["runs"].append({"task": name, "config": c, "status": "ok", "cost": 1.0 + p["rank"] / 4,
                                 "curve": curve})
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="session")
def meta_file(tmp_path_factory):
    return synthetic_meta_file(tmp_path_factory.mktemp("meta") / "meta.json")
