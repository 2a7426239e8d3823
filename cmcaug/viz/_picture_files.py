"""Writing a picture in the format its file name asks for: the one rule that every `render_*` and `preview_*`
of `cmcaug.viz` and `cmcaug preview -o` follow.

The extension, in any letter case, names the format (`PICTURE_FORMATS`): .png, .jpg/.jpeg, .webp, or
.html/.htm for a page showing the picture; any other is refused (`InputError` naming the ones accepted), so
no file holds other bytes than its name says. Light on purpose (no Pillow or NumPy import): the CLI imports
it to check `-o` before any work.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from PIL import Image

# Extension (any letter case) -> what is written there: a Pillow format, or "HTML", a page showing the picture.
PICTURE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".html": "HTML", ".htm": "HTML"}
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {
    "JPEG": {"quality": 92, "subsampling": 0},  # 4:4:4, so thin coloured text and outlines keep their colour
    "WEBP": {"lossless": True},  # exact pixels, as in a PNG
}


def picture_format(path: str | Path) -> str:
    """What a picture at `path` is written as, from its extension: "PNG", "JPEG", "WEBP" or "HTML";
    `InputError` naming the extensions accepted for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in PICTURE_FORMATS:
        found = f"the extension {suffix!r} names no picture format" if suffix else "no extension names the format"
        raise InputError(f"{path}: {found}; end the file name in one of {', '.join(PICTURE_FORMATS)}")
    return PICTURE_FORMATS[suffix]


def data_uri(image: Image.Image) -> str:
    """`image` as a PNG `data:` URI, for a page that must hold its pictures."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def save_picture(sheet: Image.Image, path: str | Path, title: str) -> Path:
    """Write `sheet` at `path`, creating its folder, in the format its extension names (`picture_format`):
    PNG, JPEG (quality 92, no chroma subsampling), lossless WebP, or an HTML page titled `title` that shows
    it as an inlined PNG."""
    kind = picture_format(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind != "HTML":
        sheet.save(path, format=kind, **_SAVE_OPTIONS.get(kind, {}))
        return path
    name = html.escape(title)
    path.write_text(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/><title>{name}</title></head>\n'
                    f'<body><img src="{data_uri(sheet)}" width="{sheet.width}" height="{sheet.height}" alt="{name}"/>'
                    "</body></html>\n", encoding="utf-8")
    return path
