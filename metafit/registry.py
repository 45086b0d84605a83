"""Named registries, one per family (experiments, optimizers, models, merge methods, ...).

Every :class:`Registry` joins a global catalogue so ``metafit list`` can show all
registered names by family. Unknown names raise :class:`UnknownNameError` listing
the valid names and the closest match; registering a name twice raises.

Example:
    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("mse")
    ... def mse(x, y): return ((x - y) ** 2).mean()
    >>> LOSSES.get("mse") is mse
    True
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

_CATALOGUE: dict[str, "Registry[Any]"] = {}


class UnknownNameError(KeyError):
    """An unknown name was looked up in a registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def did_you_mean(name: str, options: list[str]) -> str:
    """Returns " did you mean 'x'?" for the closest option, or "" if none is close."""
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """A mapping from names to objects of one family, with helpful errors.

    Args:
      family: human-readable family name used in errors and ``metafit list``.
    """

    def __init__(self, family: str):
        if family in _CATALOGUE:
            raise ValueError(f"a registry for family '{family}' already exists")
        self.family = family
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        _CATALOGUE[family] = self

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Callable[[T], T] | T:
        """Registers ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted.

        Extra keyword arguments are stored as metadata (see :meth:`meta`).
        """

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.family} '{name}' is already registered")
            self._items[name] = item
            self._meta[name] = dict(meta)
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """Returns the object registered as ``name`` or raises :class:`UnknownNameError`."""
        if name not in self._items:
            valid = sorted(self._items)
            raise UnknownNameError(
                f"unknown {self.family} '{name}';{did_you_mean(name, valid)} valid names: "
                + (", ".join(valid) or "(none registered)")
            )
        return self._items[name]

    def meta(self, name: str) -> dict[str, Any]:
        """Returns the metadata given at registration of ``name``."""
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {self.names()})"


def catalogue() -> dict[str, Registry[Any]]:
    """All registries created so far, by family name."""
    return dict(sorted(_CATALOGUE.items()))
