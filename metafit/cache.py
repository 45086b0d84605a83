"""Where metafit keeps what it can rebuild (rendered glyph pools, converted checkpoints, built models).

One resolver, :func:`cache_dir`, used by every cache in the package:

1. ``$METAFIT_CACHE`` if set (``off``, ``0``, ``none`` or empty disable caching);
2. else ``$XDG_CACHE_HOME/metafit`` if ``XDG_CACHE_HOME`` is set;
3. else ``~/.cache/metafit``.

Entries are keyed by a content hash of their inputs by the caller, so a stale entry is never
read, and every write goes to a temporary name first, so a crash never leaves a half entry.
"""
from __future__ import annotations

import os
from pathlib import Path

DISABLED = ("", "0", "off", "none")


def cache_dir(*parts: str) -> Path | None:
    """metafit's cache folder joined with ``parts`` (not created), or None when caching is disabled.

    Example:
        >>> cache_dir("glyphs")            # doctest: +SKIP
        PosixPath('/home/me/.cache/metafit/glyphs')
    """
    root = os.environ.get("METAFIT_CACHE")
    if root is not None and root.strip().lower() in DISABLED:
        return None
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "metafit") if xdg else str(Path.home() / ".cache" / "metafit")
    return Path(root).expanduser().joinpath(*parts)
