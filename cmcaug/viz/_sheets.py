"""The drawing kit that the pictures share: checked pixel inputs, a font, text that fits, and sheets of
labelled tiles (written to files by `cmcaug.viz._picture_files`).

A sheet is rows of equal tiles, each with an optional label under it, optional row titles on the left and
a heading above. Text is drawn in DejaVu Sans, which ships inside matplotlib (a core dependency), so accented
Latin, Greek and Cyrillic draw as letters and drawing never needs the network.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError

PAD = 4
LABEL_HEIGHT = 13
LABEL_FONT_SIZE = 10  # pixels: DejaVu Sans's ascent and descent at this size fill LABEL_HEIGHT
_INK = (20, 20, 20)
_BACKGROUND = (255, 255, 255)
_EMPTY = (225, 225, 225)  # the first tile of a titled row that holds no tiles

Cell = tuple[np.ndarray, str | None]  # a tile's uint8 [H, W, 3] pixels and its label


def as_patches(pixels: Any) -> np.ndarray:
    """uint8 `[M, P, P, 3]` numpy view of a numpy array or a (CPU or GPU) tensor."""
    if hasattr(pixels, "detach"):
        pixels = pixels.detach().cpu().numpy()
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[1] != pixels.shape[2]:
        raise InputError(f"patches must be uint8 [M, P, P, 3], got {pixels.dtype} {list(pixels.shape)}")
    return pixels


def as_images(images: Any, name: str) -> np.ndarray:
    """uint8 `[B, H, W, 3]` from images `[B, C, H, W]` (C = 1 or 3): uint8, or float in [0, 1] (clipped)."""
    if hasattr(images, "detach"):
        images = images.detach()
        images = (images.float() if images.is_floating_point() else images).cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"{name} must be [B, C, H, W] with C = 1 or 3, got shape {list(images.shape)}")
    if images.dtype.kind == "f":
        images = (np.clip(np.nan_to_num(images), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    elif images.dtype != np.uint8:
        raise InputError(f"{name} must be uint8 or float in [0, 1] (undo any normalization first), got {images.dtype}")
    images = images.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images)


def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans at `size` pixels, from matplotlib's own fonts (found without importing matplotlib, which
    costs half a second); Pillow's default font (basic Latin only: "marrón" draws as "marr□n") when
    matplotlib is not installed.

    DejaVu covers Latin with its accents, Greek and Cyrillic, among others, but not CJK, and no font among
    cmcaug's dependencies does: Chinese, Japanese and Korean text draws as boxes (a CJK font would be
    needed). The CMC views' HTML page, which the browser draws with the system's fonts, shows it.
    """
    spec = importlib.util.find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)


def _fit(font: ImageFont.ImageFont, text: str, width: int) -> str:
    """`text` cut (with '..') to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "..") > width:
        text = text[:-1]
    return text + ".."


def _wrap(font: ImageFont.ImageFont, text: str, width: int) -> list[str]:
    """`text` broken at spaces into lines of at most `width` pixels (a longer word gets a line of its own, cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += " " + word
        else:
            lines.append(_fit(font, word, width))
    return lines


def resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` at `size`: nearest-neighbour when enlarging (pixels stay crisp), box filter when shrinking."""
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.NEAREST if size[0] > image.width else Image.Resampling.BOX)


def compose(rows: Sequence[Sequence[Cell]], tile: tuple[int, int], *, titles: Sequence[str] | None = None,
            heading: str | None = None) -> Image.Image:
    """Rows of (pixels, label) cells drawn at `tile` = (width, height) pixels on a white sheet, `PAD` apart,
    each label in `LABEL_HEIGHT` pixels under its tile; optional row titles on the left and a `heading`
    above, wrapped to the sheet's width.

    Pasted with Pillow, not laid out by torchvision's `make_grid`: importing torchvision imports torch._dynamo,
    seconds that made `cmcaug preview BANK` 50-70% slower, and rendering was no faster (PNG encoding dominates).
    """
    font = load_font(LABEL_FONT_SIZE)
    width, height = tile
    labelled = any(label for row in rows for _, label in row)
    cell_w, cell_h = width + PAD, height + PAD + (LABEL_HEIGHT if labelled else 0)
    title_w = int(max(font.getlength(t) for t in titles)) + 2 * PAD if titles else 0
    columns = max(1, max(len(row) for row in rows))
    sheet_w = title_w + columns * cell_w + PAD
    lines = _wrap(font, heading, sheet_w - 2 * PAD) if heading else []
    head_h = len(lines) * LABEL_HEIGHT + (PAD if lines else 0)
    sheet = Image.new("RGB", (sheet_w, head_h + len(rows) * cell_h + PAD), _BACKGROUND)
    draw = ImageDraw.Draw(sheet, "RGB")
    for k, line in enumerate(lines):
        draw.text((PAD, PAD + k * LABEL_HEIGHT), line, fill=_INK, font=font)
    for r, row in enumerate(rows):
        top = head_h + PAD + r * cell_h
        if titles:
            draw.text((PAD, top + max(0, (height - LABEL_HEIGHT) // 2)), titles[r], fill=_INK, font=font)
            if not row:
                draw.rectangle((title_w + PAD, top, title_w + PAD + width - 1, top + height - 1), fill=_EMPTY)
        for c, (pixels, label) in enumerate(row):
            left = title_w + PAD + c * cell_w
            sheet.paste(resized(Image.fromarray(pixels, "RGB"), tile), (left, top))
            if label:
                draw.text((left, top + height + 1), _fit(font, label, width), fill=_INK, font=font)
    return sheet
