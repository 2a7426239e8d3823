"""Pictures of what cmcaug works with, for eyes rather than models: patch grids and bank previews.

A bank is only as good as its patches, and the fastest check is to look at them: `preview_bank` draws
one row per concept with a few sampled patches, `render_patch_grid` any stack of patches with labels.
Text uses Pillow's built-in bitmap font, so rendering never needs a font file or the network.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import InputError

if TYPE_CHECKING:
    from .bank import PatchBank

_PAD = 4
_LABEL_HEIGHT = 13
_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_EMPTY = (225, 225, 225)

Cell = tuple[np.ndarray, str | None]


def _as_patches(pixels: Any) -> np.ndarray:
    """uint8 `[M, P, P, 3]` numpy view of a numpy array or a (CPU or GPU) tensor."""
    if hasattr(pixels, "detach"):
        pixels = pixels.detach().cpu().numpy()
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[1] != pixels.shape[2]:
        raise InputError(f"patches must be uint8 [M, P, P, 3], got {pixels.dtype} {list(pixels.shape)}")
    return pixels


def _fit(font: ImageFont.ImageFont, text: str, width: int) -> str:
    """`text` cut (with '..') to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "..") > width:
        text = text[:-1]
    return text + ".."


def _compose(rows: Sequence[Sequence[Cell]], titles: Sequence[str] | None, side: int) -> Image.Image:
    """Rows of (patch, label) cells drawn `side` pixels wide on a white sheet; optional row titles on the left."""
    font = ImageFont.load_default_imagefont()
    labelled = any(label for row in rows for _, label in row)
    cell_w, cell_h = side + _PAD, side + _PAD + (_LABEL_HEIGHT if labelled else 0)
    title_w = int(max(font.getlength(t) for t in titles)) + 2 * _PAD if titles else 0
    columns = max(1, max(len(row) for row in rows))
    sheet = Image.new("RGB", (title_w + columns * cell_w + _PAD, len(rows) * cell_h + _PAD), _BACKGROUND)
    draw = ImageDraw.Draw(sheet, "RGB")
    for r, row in enumerate(rows):
        top = _PAD + r * cell_h
        if titles:
            draw.text((_PAD, top + max(0, (side - _LABEL_HEIGHT) // 2)), titles[r], fill=_INK, font=font)
            if not row:
                draw.rectangle((title_w + _PAD, top, title_w + _PAD + side - 1, top + side - 1), fill=_EMPTY)
        for c, (patch, label) in enumerate(row):
            left = title_w + _PAD + c * cell_w
            image = Image.fromarray(patch, "RGB")
            if image.width != side:
                resample = Image.Resampling.NEAREST if side > image.width else Image.Resampling.BOX
                image = image.resize((side, side), resample)
            sheet.paste(image, (left, top))
            if label:
                draw.text((left, top + side + 1), _fit(font, label, side), fill=_INK, font=font)
    return sheet


def _save(sheet: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def render_patch_grid(
    pixels: Any, labels: Sequence[str] | None, path: str | Path, columns: int = 8, *, tile_size: int | None = None
) -> Path:
    """Write patches `[M, P, P, 3]` (uint8 array or tensor) as a PNG grid, each tile with its label.

    `tile_size` rescales tiles (nearest-neighbour when enlarging), so small patches stay visible.
    """
    patches = _as_patches(pixels)
    if len(patches) == 0:
        raise InputError("render_patch_grid needs at least one patch, got none")
    if labels is not None and len(labels) != len(patches):
        raise InputError(f"got {len(labels)} labels for {len(patches)} patches; pass one label per patch or None")
    if columns < 1:
        raise InputError(f"columns must be at least 1, got {columns}")
    cells = [(patch, None if labels is None else str(labels[i])) for i, patch in enumerate(patches)]
    rows = [cells[i : i + columns] for i in range(0, len(cells), columns)]
    return _save(_compose(rows, None, tile_size or patches.shape[1]), path)


def preview_bank(
    bank: PatchBank,
    path: str | Path,
    concepts: Sequence[str | int] | None = None,
    per_concept: int = 8,
    seed: int = 0,
    *,
    tile_size: int | None = None,
) -> Path:
    """Write a PNG with one row per concept: its name and patch count, then up to `per_concept`
    distinct patches drawn at random (all of them when it has fewer), each labelled with its source image.

    `concepts` (names or ids) defaults to every concept that has patches; a requested concept with
    none gets an empty row, so a preview also shows what is missing.
    """
    if per_concept < 1:
        raise InputError(f"per_concept must be at least 1, got {per_concept}")
    vocab = bank.vocab
    counts, offsets = bank.counts, bank.offsets
    if concepts is None:
        ids = [int(i) for i in np.flatnonzero(counts)]
        if not ids:
            raise InputError("the bank has no patches to preview")
    else:
        ids = [vocab.id(c if isinstance(c, str) else vocab.name(c)) for c in concepts]
    rng = np.random.default_rng(seed)
    chosen = [offsets[i] + rng.choice(counts[i], size=min(counts[i], per_concept), replace=False) for i in ids]
    flat = np.concatenate(chosen).astype(np.int64)
    pixels = _as_patches(bank.pixels(flat))
    labels = [Path(str(record["image"])).name for record in bank.records(flat)]
    cells = list(zip(pixels, labels))
    bounds = np.cumsum([0, *(len(c) for c in chosen)])
    rows = [cells[bounds[r] : bounds[r + 1]] for r in range(len(ids))]
    titles = [f"{vocab.name(i)} ({counts[i]})" for i in ids]
    return _save(_compose(rows, titles, tile_size or bank.patch_size), path)
