"""Names of pytree leaves: one spelling of a key path everywhere (sharding rules, merges, PEFT paths).

A key path is what :func:`jax.tree_util.tree_flatten_with_path` yields (``DictKey``,
``GetAttrKey``, ``SequenceKey``, ``FlattenedIndexKey`` entries) or an NNX path (plain ``str``
and ``int`` keys, as in :func:`flax.nnx.to_flat_state`); both spell the same::

    >>> path_name((jax.tree_util.DictKey("layers"), jax.tree_util.SequenceKey(0), jax.tree_util.GetAttrKey("w")))
    'layers.0.w'
    >>> path_name(("encoder", 1, "kernel"), sep="/")
    'encoder/1/kernel'

:func:`jax.tree_util.keystr` (``['layers'][0].w``) stays the spelling of checkpoint metadata.
"""
from __future__ import annotations

from typing import Any, Iterable


def key_name(entry: Any) -> str:
    """One key path entry as text: a ``DictKey``'s key, a ``GetAttrKey``'s name, a ``SequenceKey``'s
    index, or the entry itself (NNX paths hold plain strings and ints)."""
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def path_name(path: Iterable[Any], sep: str = ".", skip: Iterable[str] = ()) -> str:
    """The entries of ``path`` joined by ``sep``, leaving out those named in ``skip``
    (e.g. ``skip=("base_layer",)`` for PEFT wrappers, which keep the wrapped layer under that name)."""
    skipped = set(skip)
    return sep.join(name for name in map(key_name, path) if name not in skipped)

