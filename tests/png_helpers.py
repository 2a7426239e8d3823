"""Reading the picture files that the preview and view renderers write, for the picture tests: PNG pixels,
the format a file's first bytes show, and the pixels of any picture file (an HTML page's inlined PNG too)."""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

# What each format's files start with (WebP: "RIFF", 4 bytes of size, then "WEBP").
MAGIC = {"PNG": re.compile(rb"\x89PNG\r\n\x1a\n"), "JPEG": re.compile(rb"\xff\xd8\xff"),
         "WEBP": re.compile(rb"RIFF....WEBP", re.DOTALL), "HTML": re.compile(rb"<!DOCTYPE html>", re.IGNORECASE)}
INLINE_PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def read(path: Path) -> np.ndarray:
    """The pixels of an RGB PNG file, [H, W, 3] uint8 (asserting it is one)."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def file_format(path: Path) -> str | None:
    """The format that `path`'s first bytes show: "PNG", "JPEG", "WEBP", "HTML", or None."""
    head = Path(path).read_bytes()[:16]
    return next((name for name, magic in MAGIC.items() if magic.match(head)), None)


def picture(path: Path) -> np.ndarray:
    """[H, W, 3] uint8 pixels of a PNG, JPEG or WebP file, or of the one PNG that an HTML page inlines."""
    if file_format(path) == "HTML":
        inlined = INLINE_PNG.findall(Path(path).read_text(encoding="utf-8"))
        assert len(inlined) == 1, f"{path} inlines {len(inlined)} PNG pictures, not one"
        source: Path | io.BytesIO = io.BytesIO(base64.b64decode(inlined[0]))
    else:
        source = path
    with Image.open(source) as image:
        assert image.mode == "RGB"
        return np.asarray(image)
