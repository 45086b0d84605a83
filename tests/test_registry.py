import pytest

from metafit.registry import Registry, UnknownNameError, catalogue


def test_register_get_and_listing():
    things = Registry("test-thing-a")
    things.register("alpha", 1)

    @things.register("beta", note="x")
    def beta():
        return 2

    assert things.get("alpha") == 1 and things.get("beta")() == 2
    assert things.names() == ["alpha", "beta"] and "alpha" in things and len(things) == 2
    assert things.meta("beta") == {"note": "x"}
    assert catalogue()["test-thing-a"] is things


def test_unknown_name_lists_valid_names_and_suggests():
    things = Registry("test-thing-b")
    things.register("cosine", 1)
    things.register("linear", 2)
    with pytest.raises(UnknownNameError) as err:
        things.get("cosin")
    message = str(err.value)
    assert "unknown test-thing-b 'cosin'" in message
    assert "did you mean 'cosine'?" in message
    assert "cosine, linear" in message


def test_duplicate_registration_raises():
    things = Registry("test-thing-c")
    things.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        things.register("a", 2)
    with pytest.raises(ValueError, match="already exists"):
        Registry("test-thing-c")
