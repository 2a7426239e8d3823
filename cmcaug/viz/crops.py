"""A picture of the crop modes: what each box of an image becomes as a bank patch in each mode.

`render_crop_modes` draws one row per box: the image with the box outlined, then the box's patch in every
mode of `cmcaug.crops` (square, tight, pad-mean), so the choice of `cmcaug build-bank --crop` can be made by
eye: a thin box's square patch shows its neighbours, its tight patch is stretched, its pad-mean patch
shows the object alone. Takes decoded images and boxes in memory; reading a corpus is the caller's job.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..crops import CROP_MODES, crop_patch
from ..errors import InputError
from ._picture_files import picture_format, save_picture
from ._sheets import compose, resized

_OUTLINE = (255, 0, 200)  # a magenta that photos rarely hold, as in the TiMix pictures
_MARGIN = (128, 128, 128)  # around an image drawn into a square tile


def _in_context(image: np.ndarray, box: Sequence[float], side: int) -> np.ndarray:
    """`image` scaled to fit a `side` x `side` tile (centred, grey around it), `box` outlined on it."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    tile = Image.new("RGB", (side, side), _MARGIN)
    left, top = (side - size[0]) // 2, (side - size[1]) // 2
    tile.paste(resized(Image.fromarray(image, "RGB"), size), (left, top))
    x0, y0, x1, y1 = (float(v) for v in box)
    corners = (left + round(x0 * scale), top + round(y0 * scale), left + round(x1 * scale) - 1, top + round(y1 * scale) - 1)
    ImageDraw.Draw(tile).rectangle(corners, outline=_OUTLINE, width=2)
    return np.asarray(tile)


def render_crop_modes(images: Sequence[Any], boxes: Sequence[Any], path: str | Path, *, names: Sequence[str] | None = None,
                      patch_size: int = 64, tile_size: int = 96, max_rows: int = 16) -> Path:
    """Write a picture (PNG, JPEG, WebP or an HTML page, as `path`'s extension says) with one row per box (the
    first `max_rows`, image by image): the image with the box outlined, then its `patch_size` patch in each
    crop mode, every tile drawn at `tile_size` pixels.

    `images`: RGB uint8 arrays `[H, W, 3]`; `boxes`: per image, its boxes `[n, 4]` (x0, y0, x1, y1 in pixels),
    as `cmcaug.builder.detect` gives them; `names`: per image, the row titles' name (default: its number).
    """
    picture_format(path)  # before any work
    if len(images) != len(boxes) or (names is not None and len(names) != len(images)):
        raise InputError(f"got {len(images)} images, {len(boxes)} box lists and {'no' if names is None else len(names)} names; "
                         "pass one box list (and name) per image")
    if min(patch_size, tile_size, max_rows) < 1:
        raise InputError(f"patch_size, tile_size and max_rows must be at least 1, got {patch_size}, {tile_size}, {max_rows}")
    rows, titles = [], []
    for i, (pixels, found) in enumerate(zip(images, boxes)):
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise InputError(f"image {i} must be RGB uint8 [H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
        image = Image.fromarray(pixels, "RGB")
        for j, box in enumerate(np.asarray(found, dtype=np.float64).reshape(-1, 4)):
            if len(rows) == max_rows:
                break
            crops = [(crop_patch(image, box, patch_size, mode), mode) for mode in CROP_MODES]
            rows.append([(_in_context(pixels, box, tile_size), "box"), *crops])
            titles.append(f"{names[i] if names is not None else f'image {i}'} #{j}")
    if not rows:
        raise InputError("render_crop_modes needs at least one box, got none")
    heading = (f"{patch_size}x{patch_size} patches. square: the box's longer side, black outside the image; tight: the box, "
               "stretched; pad-mean: the box, padded with its mean colour")
    return save_picture(compose(rows, (tile_size, tile_size), titles=titles, heading=heading), path, "crop modes")
