"""How a bank patch is cut from its image: one box becomes one `size` x `size` uint8 RGB patch.

Three modes (`CROP_MODES`; `cmcaug build-bank --crop`):

- `square` (the default, and the crop of every bank built before there was a choice): a square centred on
  the box, its side the box's longer side, the part outside the image black. The object with its
  surroundings: a thin box brings its neighbours in (a tie's patch is mostly the hand holding it, a
  standing person's shows the people and the bus beside them).
- `tight`: exactly the box, stretched to `size` x `size`: only the object, its aspect ratio not kept (a
  standing person becomes wide).
- `pad-mean`: exactly the box, centred in a square of the box's longer side whose rest (above and below a
  wide box, left and right of a tall one) is the box's mean colour: only the object, aspect ratio kept; no
  pixel of the image outside the box enters the patch.

Box edges are rounded to whole pixels (`square`: the square's, centred on the box; the others: each edge,
halves up); a part outside the image is black in every mode (the detectors clip their boxes to the image,
so only `square` usually has one); the crop is resized with Pillow's antialiased bicubic filter. Shared by the offline stage
(`cmcaug.builder` cuts every patch with `crop_patch`) and the pictures (`cmcaug.viz.crops` draws the modes
side by side), so it imports neither.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from .errors import InputError


def _pixel(v: float) -> int:
    return math.floor(v + 0.5)


def _box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The pixels of `box` (x0, y0, x1, y1), edges rounded, at least one pixel wide and high; black outside the image."""
    left, top = _pixel(box[0]), _pixel(box[1])
    return image.crop((left, top, max(left + 1, _pixel(box[2])), max(top + 1, _pixel(box[3]))))


def _square(image: Image.Image, box: Sequence[float]) -> Image.Image:
    x0, y0, x1, y1 = box
    side = max(1, round(max(x1 - x0, y1 - y0)))
    left, top = _pixel((x0 + x1 - side) / 2), _pixel((y0 + y1 - side) / 2)
    return image.crop((left, top, left + side, top + side))


def _pad_mean(image: Image.Image, box: Sequence[float]) -> Image.Image:
    crop = _box(image, box)
    width, height = crop.size
    mean = np.asarray(crop, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    square = Image.new("RGB", (max(width, height),) * 2, tuple(int(c + 0.5) for c in mean))
    square.paste(crop, ((square.width - width) // 2, (square.height - height) // 2))
    return square


_CROPS: dict[str, Callable[[Image.Image, Sequence[float]], Image.Image]] = {
    "square": _square, "tight": _box, "pad-mean": _pad_mean}
CROP_MODES = tuple(_CROPS)


def crop_patch(image: Image.Image, box: Sequence[float], size: int, mode: str = "square") -> np.ndarray:
    """The patch of `box` (x0, y0, x1, y1, source pixels) in RGB `image`: uint8 [size, size, 3], cut as `mode`
    says (the module docstring defines the modes)."""
    cut = _CROPS.get(mode)
    if cut is None:
        raise InputError(f"unknown crop mode {mode!r}; choose one of {', '.join(CROP_MODES)}")
    crop = cut(image, [float(v) for v in box])
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
