"""Glyph few-shot classification: an Omniglot-like set rendered from matplotlib's DejaVu fonts.

Omniglot has characters (classes) grouped in alphabets and drawn by 20 people.
Here a class is a Unicode *letter* (category ``L*``, one code point with no
canonical decomposition, so "a" and "á" are not two classes of one shape), an
*alphabet* is its Unicode block (Latin Extended-A, Cyrillic, Canadian Syllabics,
Arabic Presentation Forms-B, ...), and a *drawer* is one of the DejaVu fonts that
has the glyph (Sans/Serif/Mono x regular/bold/oblique) plus a fixed random affine
distortion (rotation, shear, scale, shift). Every class has ``instances`` drawings
(default 20, as in Omniglot), ``image_size`` pixels square (default 28), white ink
on black in ``[0, 1]``.

The class splits are a committed file, ``glyph_splits.json`` (code points and a
font bit mask per class, no images), generated once by :func:`generate_splits`
(``python -m metafit.data.glyphs --write-splits``). Splits are by alphabet as in
Omniglot: background alphabets for meta-training, separate validation alphabets,
and evaluation alphabets for testing. Glyphs that render identically to an earlier
code point (Latin "A" = Greek "Alpha" = Cyrillic "A") are dropped when the file is
generated, so no task can hold two indistinguishable classes.

Rendered pools are cached under ``glyphs/`` of :func:`metafit.cache.cache_dir`
(``$METAFIT_CACHE``, default ``~/.cache/metafit``; ``METAFIT_CACHE=off`` disables it),
keyed by the split file, the options and the matplotlib version; the first build
takes a few seconds per thousand classes.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from metafit.cache import cache_dir
from metafit.data.tasks import TASKSETS, TaskSet, check_class_pool, pooled_taskset

SPLITS_FILE = Path(__file__).with_name("glyph_splits.json")

# The DejaVu faces matplotlib bundles ("Display" faces hold a few dozen glyphs only).
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
)

# Unicode blocks that hold DejaVu letters; a block plays the role of an Omniglot alphabet.
BLOCKS = (
    (0x0000, 0x007F, "Basic Latin"), (0x0080, 0x00FF, "Latin-1 Supplement"),
    (0x0100, 0x017F, "Latin Extended-A"), (0x0180, 0x024F, "Latin Extended-B"),
    (0x0250, 0x02AF, "IPA Extensions"), (0x02B0, 0x02FF, "Spacing Modifier Letters"),
    (0x0370, 0x03FF, "Greek and Coptic"), (0x0400, 0x04FF, "Cyrillic"), (0x0500, 0x052F, "Cyrillic Supplement"),
    (0x0530, 0x058F, "Armenian"), (0x0590, 0x05FF, "Hebrew"), (0x0600, 0x06FF, "Arabic"),
    (0x0750, 0x077F, "Arabic Supplement"), (0x07C0, 0x07FF, "NKo"), (0x0E80, 0x0EFF, "Lao"),
    (0x10A0, 0x10FF, "Georgian"), (0x1400, 0x167F, "Unified Canadian Aboriginal Syllabics"),
    (0x1680, 0x169F, "Ogham"), (0x1D00, 0x1D7F, "Phonetic Extensions"),
    (0x1D80, 0x1DBF, "Phonetic Extensions Supplement"), (0x1E00, 0x1EFF, "Latin Extended Additional"),
    (0x1F00, 0x1FFF, "Greek Extended"), (0x2070, 0x209F, "Superscripts and Subscripts"),
    (0x2100, 0x214F, "Letterlike Symbols"), (0x2150, 0x218F, "Number Forms"), (0x2C00, 0x2C5F, "Glagolitic"),
    (0x2C60, 0x2C7F, "Latin Extended-C"), (0x2C80, 0x2CFF, "Coptic"), (0x2D00, 0x2D2F, "Georgian Supplement"),
    (0x2D30, 0x2D7F, "Tifinagh"), (0xA4D0, 0xA4FF, "Lisu"), (0xA640, 0xA69F, "Cyrillic Extended-B"),
    (0xA700, 0xA71F, "Modifier Tone Letters"), (0xA720, 0xA7FF, "Latin Extended-D"),
    (0xFB00, 0xFB4F, "Alphabetic Presentation Forms"), (0xFB50, 0xFDFF, "Arabic Presentation Forms-A"),
    (0xFE70, 0xFEFF, "Arabic Presentation Forms-B"), (0x10300, 0x1032F, "Old Italic"),
    (0x1D400, 0x1D7FF, "Mathematical Alphanumeric Symbols"),
)

EM_PIXELS = 26  # font size at the final resolution: capitals fill about 20 of 28 pixels
SUPERSAMPLE = 4  # glyphs are rendered and distorted at 4x, then box-filtered down (anti-aliasing)


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=None)
def _font(name: str):
    from matplotlib.ft2font import FT2Font

    return FT2Font(str(font_dir() / name))


def block_of(code_point: int) -> str | None:
    """The alphabet (Unicode block name) of ``code_point``, or None if it is in none of :data:`BLOCKS`."""
    for start, end, name in BLOCKS:
        if start <= code_point <= end:
            return name
    return None


def render_glyph(code_point: int, font_name: str, canvas: int) -> np.ndarray:
    """Ink of one glyph centred on a ``canvas x canvas`` float image in ``[0, 1]``.

    The font size is fixed (not fitted to the box), so relative sizes survive
    ("o" stays smaller than "O"); glyphs wider or taller than the canvas are
    shrunk to fit.
    """
    font = _font(font_name)
    font.set_size(EM_PIXELS * canvas / 28, 72)  # 72 dpi: one point is one pixel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing-glyph warnings: callers only ask for glyphs in the cmap
        font.set_text(chr(code_point), 0.0)
    font.draw_glyphs_to_bitmap(antialiased=True)
    ink = np.asarray(font.get_image(), dtype=np.float32) / 255.0
    rows, cols = np.nonzero(ink > 0)
    out = np.zeros((canvas, canvas), np.float32)
    if rows.size == 0:
        return out
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    limit = canvas - 2 * (canvas // 14)  # keep a margin for the affine distortion
    if max(ink.shape) > limit:
        from scipy.ndimage import zoom

        ink = np.clip(zoom(ink, limit / max(ink.shape), order=1), 0.0, 1.0)
    top, left = (canvas - ink.shape[0]) // 2, (canvas - ink.shape[1]) // 2
    out[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    return out


def distort(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A random affine "drawer": rotation <= 12 deg, shear <= 0.15, scale 0.85-1.1, shift <= 1.5/28 of the side."""
    from scipy.ndimage import affine_transform

    size = image.shape[0]
    angle = np.deg2rad(rng.uniform(-12, 12) * strength)
    shear = rng.uniform(-0.15, 0.15) * strength
    scale = 1.0 + rng.uniform(-0.15, 0.10, size=2) * strength
    shift = rng.uniform(-1.5, 1.5, size=2) * strength * size / 28
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    forward = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(scale)
    inverse = np.linalg.inv(forward)  # affine_transform maps output coordinates to input coordinates
    centre = (size - 1) / 2.0
    offset = centre - inverse @ (centre + shift)
    return np.clip(affine_transform(image, inverse, offset=offset, order=1), 0.0, 1.0)


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Box filter: mean over ``factor x factor`` blocks."""
    size = image.shape[0] // factor
    return image.reshape(size, factor, size, factor).mean(axis=(1, 3))


# ----------------------------------------------------------------------------- the split file


def generate_splits(min_fonts: int = 4, fractions: tuple[float, float, float] = (0.6, 0.1, 0.3),
                    seed: int = 0) -> dict[str, Any]:
    """Builds the split description (deterministic: same fonts + seed -> same file).

    Args:
      min_fonts: keep letters present in at least this many DejaVu faces (drawers).
      fractions: target shares of *classes* for train / validation / test; whole
        alphabets are assigned in a seeded order until each share is reached.
      seed: seed of the alphabet order.

    Returns:
      ``{"fonts": [...], "splits": {split: {alphabet: [[code_point, font_mask], ...]}}, ...}``.
    """
    cmaps = [set(_font(name).get_charmap()) for name in FONTS]
    candidates = sorted(set().union(*cmaps))
    alphabets: dict[str, list[list[int]]] = {}
    seen: set[bytes] = set()
    for cp in candidates:
        char = chr(cp)
        if not unicodedata.category(char).startswith("L") or len(unicodedata.normalize("NFD", char)) != 1:
            continue
        mask = sum(1 << i for i, cmap in enumerate(cmaps) if cp in cmap)
        block = block_of(cp)
        if bin(mask).count("1") < min_fonts or block is None:
            continue
        first_font = FONTS[(mask & -mask).bit_length() - 1]
        signature = (render_glyph(cp, first_font, 28) * 255).astype(np.uint8)
        if signature.max() == 0 or signature.tobytes() in seen:  # empty, or looks like an earlier letter
            continue
        seen.add(signature.tobytes())
        alphabets.setdefault(block, []).append([cp, mask])
    names = sorted(alphabets)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    total = sum(len(v) for v in alphabets.values())
    splits: dict[str, dict[str, list[list[int]]]] = {"train": {}, "validation": {}, "test": {}}
    counts = dict.fromkeys(splits, 0)
    targets = dict(zip(splits, fractions))
    for name in order:  # the split furthest below its target share takes the next alphabet
        split = min(splits, key=lambda s: counts[s] / total - targets[s])
        splits[split][name] = alphabets[name]
        counts[split] += len(alphabets[name])
    return {
        "description": "DejaVu glyph few-shot splits: class = code point, alphabet = Unicode block, "
                       "drawer = font in font_mask (bit i = fonts[i]) + affine distortion",
        "generator": f"metafit.data.glyphs.generate_splits(min_fonts={min_fonts}, fractions={list(fractions)}, "
                     f"seed={seed})",
        "fonts": list(FONTS),
        "splits": splits,
    }


@functools.lru_cache(maxsize=1)
def load_splits() -> dict[str, Any]:
    """The committed split file (see :func:`generate_splits`)."""
    if not SPLITS_FILE.is_file():
        raise FileNotFoundError(
            f"{SPLITS_FILE} is missing; regenerate it with `python -m metafit.data.glyphs --write-splits`"
        )
    return json.loads(SPLITS_FILE.read_text())


def split_classes(split: str) -> list[tuple[int, int, str]]:
    """``[(code_point, font_mask, alphabet), ...]`` of one split, in file order."""
    data = load_splits()["splits"][split]
    return [(cp, mask, alphabet) for alphabet, items in data.items() for cp, mask in items]


# ----------------------------------------------------------------------------- rendering pools


def build_pool(split: str, image_size: int = 28, instances: int = 20) -> np.ndarray:
    """Rendered drawings of one split: ``uint8 [classes, instances, image_size, image_size, 1]``.

    Drawing ``r`` of a class uses its ``r mod n``-th font (of the ``n`` that have the
    glyph) and an affine distortion seeded by ``(code_point, r)``, so the pool is
    the same on every machine with the same matplotlib fonts.
    """
    path = _cache_path(split, image_size, instances)
    if path is not None and path.is_file():
        try:
            return np.load(path)["pool"]
        except Exception:  # a partial or stale cache file is rebuilt, never trusted
            pass
    fonts = load_splits()["fonts"]
    canvas = image_size * SUPERSAMPLE
    classes = split_classes(split)
    pool = np.zeros((len(classes), instances, image_size, image_size, 1), np.uint8)
    for c, (cp, mask, _) in enumerate(classes):
        faces = [fonts[i] for i in range(len(fonts)) if mask >> i & 1]
        # only the faces some drawing uses: rendering is most of the cost, and with fewer
        # instances than faces (small test pools) most faces would be rendered for nothing
        renders = {face: render_glyph(cp, face, canvas) for face in dict.fromkeys(
            faces[r % len(faces)] for r in range(instances))}
        for r in range(instances):
            rng = np.random.default_rng([cp, r])
            drawn = distort(renders[faces[r % len(faces)]], rng)
            pool[c, r, :, :, 0] = np.round(downsample(drawn, SUPERSAMPLE) * 255)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, pool=pool)  # glyph images compress about 5x
        os.replace(tmp, path)
    return pool


def _cache_path(split: str, image_size: int, instances: int) -> Path | None:
    import matplotlib

    folder = cache_dir("glyphs")
    if folder is None:
        return None
    digest = hashlib.sha256(SPLITS_FILE.read_bytes() + f"{matplotlib.__version__}|{EM_PIXELS}|{SUPERSAMPLE}".encode())
    return folder / f"{split}-{image_size}px-{instances}-{digest.hexdigest()[:12]}.npz"


@TASKSETS.register("glyphs")
def glyphs(*, ways: int | None, shots: int, queries: int, image_size: int = 28, instances: int = 20) -> TaskSet:
    """N-way K-shot glyph classification; classes from the split's alphabets, images ``(S, S, 1)``."""
    ways = 5 if ways is None else ways
    if image_size < 8 or image_size % 2:
        raise ValueError(f"glyphs: image_size must be an even number >= 8, got {image_size}")
    for split in ("train", "validation", "test"):  # validate every split before rendering any
        check_class_pool("glyphs", split, len(split_classes(split)), instances, ways, shots, queries)
    splits = load_splits()["splits"]
    info = {"alphabets": {s: len(splits[s]) for s in splits}, "classes": {s: len(split_classes(s)) for s in splits},
            "instances": instances}
    pools = {split: build_pool(split, image_size, instances) for split in ("train", "validation", "test")}
    return pooled_taskset("glyphs", pools, ways=ways, shots=shots, queries=queries, info=info)


def _main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Glyph few-shot splits")
    parser.add_argument("--write-splits", action="store_true", help=f"regenerate {SPLITS_FILE.name}")
    args = parser.parse_args(argv)
    if args.write_splits:
        data = generate_splits()
        # one class per line keeps the file small and diffable
        lines = ['{', f'  "description": {json.dumps(data["description"])},',
                 f'  "generator": {json.dumps(data["generator"])},', f'  "fonts": {json.dumps(data["fonts"])},',
                 '  "splits": {']
        split_items = list(data["splits"].items())
        for si, (split, alphabets) in enumerate(split_items):
            lines.append(f'    "{split}": {{')
            for ai, (alphabet, items) in enumerate(alphabets.items()):
                comma = "," if ai < len(alphabets) - 1 else ""
                lines.append(f'      {json.dumps(alphabet)}: {json.dumps(items, separators=(",", ":"))}{comma}')
            lines.append("    }" + ("," if si < len(split_items) - 1 else ""))
        lines += ["  }", "}"]
        SPLITS_FILE.write_text("\n".join(lines) + "\n")
    for split in ("train", "validation", "test"):
        alphabets = load_splits.__wrapped__()["splits"][split]
        print(f"{split}: {len(alphabets)} alphabets, {sum(len(v) for v in alphabets.values())} classes")


if __name__ == "__main__":
    _main()
