"""Pictures of bank patches: a grid of any patches, and a bank's preview, one row of sampled patches per concept.

A bank is only as good as its patches, and the fastest check is to look at them: `preview_bank` draws
one row per concept with a few sampled patches, `render_patch_grid` any stack of patches with labels.
TiMix mixes are drawn by `cmcaug.viz.mixes`, CMC views by `cmcaug.viz.cmc_views`. Each writes PNG, JPEG,
WebP or an HTML page showing the picture, as the path's extension says (`cmcaug.viz._picture_files`).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ._picture_files import picture_format, save_picture
from ._sheets import as_patches, compose

if TYPE_CHECKING:
    from ..bank.reader import PatchBank


def render_patch_grid(
    pixels: Any, labels: Sequence[str] | None, path: str | Path, columns: int = 8, *, tile_size: int | None = None
) -> Path:
    """Write patches `[M, P, P, 3]` (uint8 array or tensor) as a grid picture, each tile with its label, in
    the format `path`'s extension names (.png, .jpg/.jpeg, .webp, .html/.htm; `InputError` for another).

    `tile_size` rescales tiles (nearest-neighbour when enlarging), so small patches stay visible.
    """
    picture_format(path)
    _check_tile_size(tile_size)
    patches = as_patches(pixels)
    if len(patches) == 0:
        raise InputError("render_patch_grid needs at least one patch, got none")
    if labels is not None and len(labels) != len(patches):
        raise InputError(f"got {len(labels)} labels for {len(patches)} patches; pass one label per patch or None")
    if columns < 1:
        raise InputError(f"columns must be at least 1, got {columns}")
    cells = [(patch, None if labels is None else str(labels[i])) for i, patch in enumerate(patches)]
    rows = [cells[i : i + columns] for i in range(0, len(cells), columns)]
    side = tile_size or patches.shape[1]
    return save_picture(compose(rows, (side, side)), path, f"{len(patches)} patches")


def preview_bank(
    bank: PatchBank,
    path: str | Path,
    concepts: Sequence[str | int] | None = None,
    per_concept: int = 8,
    seed: int = 0,
    *,
    tile_size: int | None = None,
) -> Path:
    """Write a picture with one row per concept: its name and patch count, then up to `per_concept`
    distinct patches drawn at random (all of them when it has fewer), each labelled with its source image;
    its format is the one `path`'s extension names, as in `render_patch_grid`.

    `concepts` (names or ids) defaults to every concept that has patches; a requested concept with
    none gets an empty row, so a preview also shows what is missing.
    """
    picture_format(path)
    _check_tile_size(tile_size)
    if per_concept < 1 or seed < 0:
        raise InputError(f"per_concept must be at least 1 and seed at least 0, got {per_concept} and {seed}")
    vocab = bank.vocab
    counts, offsets = bank.counts, bank.offsets
    if concepts is None:
        ids = [int(i) for i in np.flatnonzero(counts)]
        if not ids:
            raise InputError("the bank has no patches to preview")
    else:
        ids = [vocab.resolve(c) for c in concepts]
    rng = np.random.default_rng(seed)
    chosen = [offsets[i] + rng.choice(counts[i], size=min(counts[i], per_concept), replace=False) for i in ids]
    flat = np.concatenate(chosen).astype(np.int64)
    pixels = as_patches(bank.pixels(flat))
    labels = [Path(str(record["image"])).name for record in bank.records(flat)]
    cells = list(zip(pixels, labels))
    bounds = np.cumsum([0, *(len(c) for c in chosen)])
    rows = [cells[bounds[r] : bounds[r + 1]] for r in range(len(ids))]
    titles = [f"{vocab.name(i)} ({counts[i]})" for i in ids]
    side = tile_size or bank.patch_size
    return save_picture(compose(rows, (side, side), titles=titles), path, f"patches of {bank.path}")


def _check_tile_size(tile_size: int | None) -> None:
    if tile_size is not None and tile_size < 1:
        raise InputError(f"tile_size must be at least 1 (or None: the patches' own size), got {tile_size}")
