"""Image sources and robust decoding: every input becomes upright RGB uint8 or a counted failure.

A bank build reads folders (recursive, symlinked folders followed), files that list image paths, image
files, and webdataset `.tar` shards as img2dataset writes them (`key.jpg` next to `key.json` /
`key.txt`), alone or inside a folder (img2dataset's output folder). Every image gets a *key* (a relative
path), and everything downstream is ordered by key, so the bank does not depend on the file system's
listing order or on which decode worker finished first.

Real corpora hold broken files. `decode_image` never lets one stop a build: it converts CMYK, 16-bit,
grayscale, palette and alpha images to RGB (transparency composited over white), applies the EXIF
orientation, and raises `ImageDecodeError` with a short `reason` for everything it cannot use
(`FAILURE_REASONS`), which the build counts.
"""
from __future__ import annotations

import io
import logging
import os
import sys
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Pillow's own decompression-bomb threshold (about 89 megapixels); larger images are skipped as "too_large".
DEFAULT_MAX_PIXELS = 89_478_485
FAILURE_REASONS = ("unreadable", "empty", "not_image", "truncated", "too_large", "corrupt")
_WHITE = (255, 255, 255, 255)


class ImageDecodeError(InputError):
    """One image could not be used; `reason` is one of `FAILURE_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes live: a file, or a member of an uncompressed tar (`offset`, `size`)."""

    key: str
    path: str
    offset: int = -1
    size: int = -1

    def read(self) -> bytes:
        if self.offset < 0:
            return Path(self.path).read_bytes()
        with open(self.path, "rb") as f:  # one handle per read: safe from any number of decode threads
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path}: tar member {self.key} ends early ({len(data)} of {self.size} bytes)")
        return data


@dataclass(frozen=True)
class DecodedImage:
    """The outcome of reading one image: `pixels` (H, W, 3) uint8, or `failure` (a reason)."""

    key: str
    pixels: np.ndarray | None
    failure: str | None = None


# -- sources ---------------------------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_tar(name: str) -> bool:
    return name.lower().endswith(".tar")


def _from_folder(root: Path) -> Iterator[ImageRef]:
    """Images and tar shards under `root`. Symlinked folders are followed, each real folder once, so
    links that form a cycle or point into the tree again add nothing twice."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            key = path.relative_to(root).as_posix()
            if _is_image(name):
                yield ImageRef(key, str(path))
            elif _is_tar(name):
                yield from _from_tar(path, key)


def _from_tar(path: Path, key: str) -> Iterator[ImageRef]:
    """The image members of an uncompressed tar, keyed `<key>/<member name>`; other members (an
    img2dataset sample's .json and .txt) are skipped."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and _is_image(m.name)]
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{path}: cannot read it as an uncompressed tar shard ({exc}); img2dataset writes plain .tar files") from exc
    for m in members:
        yield ImageRef(f"{key}/{PurePosixPath(m.name).as_posix()}", str(path), m.offset_data, m.size)


def _from_list(path: Path) -> Iterator[ImageRef]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: expected an image, a folder, a .tar shard or a UTF-8 list of image paths ({exc})") from exc
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            target = Path(entry) if Path(entry).is_absolute() else path.parent / entry
            yield ImageRef(PurePosixPath(entry.replace("\\", "/")).as_posix(), str(target))


def list_images(inputs: Iterable[str | Path]) -> list[ImageRef]:
    """Every image of `inputs`, sorted by key.

    Keys: the path relative to a folder input, `<shard>.tar/<member>` for tar members (the shard's path
    relative to the folder when found in one), the path as written in a list file, the file name for an
    image given directly. Keys must be unique across inputs.
    """
    refs: dict[str, ImageRef] = {}
    sources: dict[str, Path] = {}
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise InputError("no image inputs given: pass folders, image files, lists of image paths or .tar shards")
    for src in inputs:
        if src.is_dir():
            found: Iterable[ImageRef] = _from_folder(src)
        elif not src.exists():
            raise InputError(f"image input {src} does not exist")
        elif _is_tar(src.name):
            found = _from_tar(src, src.name)
        elif _is_image(src.name):
            found = [ImageRef(src.name, str(src))]
        else:
            found = _from_list(src)
        for ref in found:
            if ref.key in refs:
                raise InputError(
                    f"image key {ref.key!r} occurs in both {sources[ref.key]} and {src}: keys must be unique; "
                    "pass a common parent folder instead of the two inputs"
                )
            refs[ref.key] = ref
            sources[ref.key] = src
    if not refs:
        raise InputError(f"no images found in {', '.join(map(str, inputs))} (looked for {', '.join(IMAGE_EXTENSIONS)} files "
                         "and .tar shards)")
    return [refs[k] for k in sorted(refs)]


# -- decoding --------------------------------------------------------------------------------------
def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale (PNG): rescale, don't clip
        gray = (np.asarray(im, dtype=np.float64).clip(0, 65535) / 257.0).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, ZeroDivisionError) as exc:
        log.debug("ignoring unreadable EXIF orientation (%s)", exc)
        return im


def _pillow_open() -> Any:
    """Pillow's own `Image.open`. ultralytics replaces it with a wrapper that, on a file Pillow cannot
    identify, pip-installs pi-heif (or fails when it may not): a build must neither install packages nor
    stop at a non-image file."""
    opener = Image.open
    if opener.__module__ != Image.__name__:
        opener = getattr(sys.modules.get(opener.__module__), "_image_open", opener)
    return opener


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to upright RGB uint8 (H, W, 3), or raise `ImageDecodeError`.

    Images with more than `max_pixels` pixels are refused from their header, before any pixel is
    decoded (decompression bombs). Pillow's own check (twice `PIL.Image.MAX_IMAGE_PIXELS`) also applies,
    so `max_pixels` can lower the limit but raise it only as far as that global allows.
    """
    if not data:
        raise ImageDecodeError("empty", "zero-byte file")
    try:
        with _pillow_open()(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise ImageDecodeError("too_large", f"{im.width}x{im.height} pixels exceeds the limit of {max_pixels:,}")
            im.load()
            return _to_rgb(_upright(im))
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not_image", f"not a recognised image format ({exc})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning: under -W error
        raise ImageDecodeError("too_large", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError) as exc:
        text = str(exc).lower()
        truncated = isinstance(exc, EOFError) or "truncat" in text or "broken data stream" in text
        raise ImageDecodeError("truncated" if truncated else "corrupt", f"{type(exc).__name__}: {exc}") from exc


def load_image(ref: ImageRef, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Read and decode one image; never raises for a bad file (the failure is returned)."""
    try:
        data = ref.read()
    except OSError as exc:
        log.warning("skipping %s: cannot read it (%s)", ref.key, exc)
        return DecodedImage(ref.key, None, "unreadable")
    try:
        return DecodedImage(ref.key, decode_image(data, max_pixels))
    except ImageDecodeError as exc:
        log.info("skipping %s: %s (%s)", ref.key, exc.reason, exc)
        return DecodedImage(ref.key, None, exc.reason)


def decode_stream(refs: Sequence[ImageRef], *, workers: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                  prefetch: int = 64) -> Iterator[DecodedImage]:
    """`load_image` over `refs` in a pool of `workers` threads, yielded in the order of `refs`.

    Pillow releases the GIL while decoding, so threads decode in parallel without pickling pixels between
    processes. At most `prefetch` images are decoded ahead of the consumer, which bounds memory.
    `workers=0` decodes in the calling thread.
    """
    if workers <= 0:
        yield from (load_image(r, max_pixels) for r in refs)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="cmcaug-decode")
    try:
        todo = iter(refs)
        pending: deque[Future[DecodedImage]] = deque(
            pool.submit(load_image, r, max_pixels) for r in islice(todo, max(prefetch, workers))
        )
        while pending:
            result = pending.popleft().result()
            for r in islice(todo, 1):
                pending.append(pool.submit(load_image, r, max_pixels))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
