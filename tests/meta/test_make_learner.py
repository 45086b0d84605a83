"""make_learner's cache: equal arguments share a learner; a builder's own TypeError surfaces after one build."""
import pytest

from metafit.meta import learners


def test_a_type_error_of_the_builder_surfaces_after_one_build_and_unhashable_configs_build_uncached(monkeypatch):
    calls = []

    def builder(network, config, *, loss, output_dim):
        calls.append(config)
        if config == ("broken",):
            raise TypeError("bad option inside the builder")
        return ("learner", network, config)

    monkeypatch.setattr(learners.META_LEARNERS, "get", lambda name: builder)
    network = object()
    with pytest.raises(TypeError, match="bad option inside the builder"):
        learners.make_learner("any", network, loss="mse", output_dim=1, config=("broken",))
    assert calls == [("broken",)]  # not built a second time on the uncached path

    first = learners.make_learner("any", network, loss="mse", output_dim=1, config=("ok",))
    assert learners.make_learner("any", network, loss="mse", output_dim=1, config=("ok",)) is first
    unhashable = ["a list"]
    assert learners.make_learner("any", network, loss="mse", output_dim=1, config=unhashable)[2] is unhashable
