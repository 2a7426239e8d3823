"""Reading the PNG files that the preview and view renderers write, for the picture tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def read(path: Path) -> np.ndarray:
    """The pixels of an RGB PNG file, [H, W, 3] uint8 (asserting it is one)."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)
