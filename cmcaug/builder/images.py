"""Image sources and robust decoding: every input becomes upright RGB uint8 or a counted failure.

A bank build reads folders (recursive, symlinked folders followed), files that list image paths, image
files, and webdataset `.tar` shards as img2dataset writes them (`key.jpg` next to `key.json` /
`key.txt`), alone or inside a folder (img2dataset's output folder). Every image gets a *key* (a relative
path), and everything downstream is ordered by key, so the bank does not depend on the file system's
listing order or on which decode worker finished first.

Real corpora hold broken files. No input stops a build, hangs it or costs memory beyond a bound; each
bad one is skipped with a short `reason` (`FAILURE_REASONS`), which the build counts:

- listing (`list_images`): a key that is not valid UTF-8 is skipped before any work is spent on it, as
  a bank stores keys as UTF-8 ("name_not_utf8"); a tar member that is a link or a device is counted as
  "not_regular_file"; a shard that ends early or holds a broken header keeps its whole members before
  the damage and is counted once ("damaged_shard"): what came after cannot be known;
- reading (`ImageRef.read`): only regular files are opened (a FIFO would wait forever, `/dev/zero`
  never ends), and no file or tar member over `max_file_bytes` is read ("not_regular_file",
  "file_too_big"); a file that cannot be read is "unreadable";
- decoding (`decode_image`): CMYK, 16-bit, grayscale, palette and alpha images become RGB (transparency
  composited over white), the EXIF orientation is applied, and what cannot be used raises
  `ImageDecodeError` ("empty", "not_image", "truncated", "too_large", "corrupt").

`decode_stream` decodes ahead of its consumer in threads, bounded in bytes of pixels, not in images.
"""
from __future__ import annotations

import io
import logging
import os
import stat
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError
from ._budget import ByteBudget
from ._tar import complete_members
from .options import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Decoded pixels `decode_stream` holds ahead of its consumer: one image at DEFAULT_MAX_PIXELS fits, and
# about 85 of a megapixel each, plenty to keep the decode threads busy.
DEFAULT_PREFETCH_BYTES = 256 * 2**20
FAILURE_REASONS = ("unreadable", "empty", "not_image", "truncated", "too_large", "corrupt",
                   "not_regular_file", "file_too_big", "damaged_shard", "name_not_utf8")
_WHITE = (255, 255, 255, 255)
_MAX_LIST_LINE = 65_536  # characters; a longer line is not a path (a list file that is /dev/zero has no newline)


class ImageDecodeError(InputError):
    """One image could not be used; `reason` is one of `FAILURE_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _open_regular(path: str | Path) -> BinaryIO:
    """`path` opened for reading when it is a regular file, else `ImageDecodeError("not_regular_file")`.
    Checked before opening (opening a device can block or act) and again on the open descriptor (the path
    may have become a FIFO meanwhile; O_NONBLOCK keeps that open from waiting for a writer)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ImageDecodeError("not_regular_file", f"{path} is not a regular file (a FIFO, device or folder)")
    f = open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise ImageDecodeError("not_regular_file", f"{path} stopped being a regular file while it was opened")
    return f


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes live: a file, or a member of an uncompressed tar (`offset`, `size`).
    `failure`: the reason it is skipped unread, decided when it was listed (a name that is not UTF-8, a
    tar member that is a link, a damaged shard); such a ref still counts as an image read."""

    key: str
    path: str
    offset: int = -1
    size: int = -1
    failure: str | None = None

    def read(self, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
        """The encoded bytes; `ImageDecodeError` for a ref skipped when listed (its `failure`), a file that is
        not regular or one over `max_bytes` ("not_regular_file", "file_too_big"), before a byte is read;
        `OSError` when reading fails."""
        if self.failure is not None:
            raise ImageDecodeError(self.failure, "skipped when it was listed")
        with _open_regular(self.path) as f:  # one handle per read: safe from any number of decode threads
            size = os.fstat(f.fileno()).st_size if self.offset < 0 else self.size
            if size > max_bytes:
                raise ImageDecodeError("file_too_big", f"{size:,} bytes exceeds the limit of {max_bytes:,} (max_file_bytes)")
            f.seek(max(self.offset, 0))
            data = f.read(size)  # a file that grows meanwhile is read up to the size checked
        if self.offset >= 0 and len(data) != self.size:
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


def _printable(text: str) -> str:
    """`text` as valid UTF-8: the undecodable bytes of a file name (surrogates in Python) as `\\udcff`."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _skipped(key: str, path: str | Path, reason: str, why: str) -> ImageRef:
    """A ref that is counted as `reason` without being read; logs `why` once, here."""
    key, path = _printable(key), _printable(str(path))
    log.warning("skipping %s (%s): %s", key, reason, why)
    return ImageRef(key, path, failure=reason)


def _ref(key: str, path: str | Path, offset: int = -1, size: int = -1) -> ImageRef:
    """The ref of one listed image, skipped as "name_not_utf8" when its key cannot be stored as UTF-8."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return _skipped(key, path, "name_not_utf8", "its name is not valid UTF-8; rename it to build it into the bank")
    return ImageRef(key, str(path), offset, size)


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
                yield _ref(key, path)
            elif _is_tar(name):
                yield from _from_tar(path, key)


def _from_tar(path: Path, key: str) -> Iterator[ImageRef]:
    """The image members of an uncompressed tar, keyed `<key>/<member name>`; other members (an
    img2dataset sample's .json and .txt) are skipped. An image member that is a link or device is counted
    as "not_regular_file"; a shard that is not a regular file, or the damaged rest of one, is counted once
    under the shard's own `key`."""
    try:
        with _open_regular(path) as f:
            members, damage = complete_members(f, path)
    except ImageDecodeError as exc:
        yield _skipped(key, path, exc.reason, str(exc))
        return
    except OSError as exc:
        yield _skipped(key, path, "unreadable", f"cannot read this tar shard ({exc})")
        return
    for m in members:
        if _is_image(m.name):
            member = f"{key}/{PurePosixPath(m.name).as_posix()}"
            if m.isreg():
                yield _ref(member, path, m.offset_data, m.size)
            else:
                kind = "link" if m.issym() or m.islnk() else "device, FIFO or folder"
                yield _skipped(member, path, "not_regular_file", f"a tar member that is a {kind}, not a file")
    if damage is not None:
        yield _skipped(key, path, "damaged_shard", f"{damage}; the {len(members)} whole members before it are kept")


def _from_list(path: Path) -> Iterator[ImageRef]:
    """The entries of a UTF-8 list file, one path a line, relative to the list's folder; `#` starts a comment.
    Read a line at a time, so a huge list is never held whole and a file with no line ends is refused."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(iter(partial(f.readline, _MAX_LIST_LINE + 1), ""), 1):
                if len(line) > _MAX_LIST_LINE:
                    raise InputError(f"{path}: line {number} is longer than {_MAX_LIST_LINE:,} characters: "
                                     "expected an image, a folder, a .tar shard or a list of image paths, one a line")
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    target = Path(entry) if Path(entry).is_absolute() else path.parent / entry
                    yield ImageRef(PurePosixPath(entry.replace("\\", "/")).as_posix(), str(target))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: expected an image, a folder, a .tar shard or a UTF-8 list of image paths ({exc})") from exc


def _collision(key: str, first: ImageRef, second: ImageRef, inputs: list[Path], where: tuple[int, int]) -> str:
    """What to say when two images have the same `key`: found in inputs number `where[0]` and `where[1]`."""
    one, other = (inputs[i] for i in where)
    if where[0] != where[1]:
        if one == other:
            return f"{one} is given twice as an input: pass it once"
        return (f"image key {key!r} occurs in both {one} and {other}: keys must be unique; "
                "pass a common parent folder instead of the two inputs")
    if first.path == second.path and min(first.offset, second.offset) >= 0:
        return (f"{first.path} holds two members named {key.rsplit('/', 1)[-1]!r} (data at bytes {first.offset:,} and "
                f"{second.offset:,}): a duplicate member of one shard; rewrite the shard with one of them")
    return f"image key {key!r} occurs twice in {one}: keys must be unique; list each image once"


def list_images(inputs: Iterable[str | Path]) -> list[ImageRef]:
    """Every image of `inputs`, sorted by key.

    Keys: the path relative to a folder input, `<shard>.tar/<member>` for tar members (the shard's path
    relative to the folder when found in one), the path as written in a list file, the file name for an
    image given directly. Keys must be unique across inputs. Entries skipped while listing (see the module
    docstring) are refs with a `failure`, keyed with undecodable bytes written as `\\udcff`.
    """
    refs: dict[str, ImageRef] = {}
    sources: dict[str, int] = {}  # key -> the number of the input it was found in
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise InputError("no image inputs given: pass folders, image files, lists of image paths or .tar shards")
    for number, src in enumerate(inputs):
        if src.is_dir():
            found: Iterable[ImageRef] = _from_folder(src)
        elif not src.exists():
            raise InputError(f"image input {src} does not exist")
        elif _is_tar(src.name):
            found = _from_tar(src, src.name)
        elif _is_image(src.name):
            found = [_ref(src.name, src)]
        else:
            found = _from_list(src)
        for ref in found:
            if ref.key in refs:
                raise InputError(_collision(ref.key, refs[ref.key], ref, inputs, (sources[ref.key], number)))
            refs[ref.key] = ref
            sources[ref.key] = number
    if not refs:
        raise InputError(f"no images found in {', '.join(map(str, inputs))} (looked for {', '.join(IMAGE_EXTENSIONS)} files "
                         "and .tar shards)")
    return [refs[k] for k in sorted(refs)]


# -- decoding --------------------------------------------------------------------------------------
def _rgb_array(im: Image.Image) -> np.ndarray:
    """The RGB image `im` as an (H, W, 3) uint8 array, copied a strip of rows at a time: Pillow's `tobytes`
    (what `np.asarray` calls) would hold the whole image twice more while it joins its chunks."""
    out = np.empty((im.height, im.width, 3), np.uint8)
    rows = max(1, 2**22 // (4 * max(1, im.width)))  # strips of about 4 MiB in Pillow's 4 bytes a pixel
    for top in range(0, im.height, rows):
        out[top:top + rows] = np.asarray(im.crop((0, top, im.width, min(top + rows, im.height))), dtype=np.uint8)
    return out


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale (PNG): rescale, don't clip
        gray = (np.asarray(im, dtype=np.float64).clip(0, 65535) / 257.0).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
    return _rgb_array(im if im.mode == "RGB" else im.convert("RGB"))


def _make_upright(im: Image.Image) -> None:
    """Apply the EXIF orientation in place (no copy of an image that is already upright)."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, ZeroDivisionError) as exc:
        log.debug("ignoring unreadable EXIF orientation (%s)", exc)


def _pillow_open() -> Any:
    """Pillow's own `Image.open`. ultralytics replaces it with a wrapper that, on a file Pillow cannot
    identify, pip-installs pi-heif (or fails when it may not): a build must neither install packages nor
    stop at a non-image file."""
    opener = Image.open
    if opener.__module__ != Image.__name__:
        opener = getattr(sys.modules.get(opener.__module__), "_image_open", opener)
    return opener


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 reserve: Callable[[int], None] | None = None) -> np.ndarray:
    """Decode encoded image bytes to upright RGB uint8 (H, W, 3), or raise `ImageDecodeError`.

    Images with more than `max_pixels` pixels are refused from their header, before any pixel is
    decoded (decompression bombs). Pillow's own check (twice `PIL.Image.MAX_IMAGE_PIXELS`) also applies,
    so `max_pixels` can lower the limit but raise it only as far as that global allows. `reserve` is
    called with the result's size in bytes (H * W * 3) once the header is read, before any pixel is
    decoded: `decode_stream` waits there for its memory budget. An RGB image takes about 7 bytes a pixel
    at the peak (Pillow's 4 and the result's 3).
    """
    if not data:
        raise ImageDecodeError("empty", "zero-byte file")
    try:
        with _pillow_open()(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise ImageDecodeError("too_large", f"{im.width}x{im.height} pixels exceeds the limit of {max_pixels:,}")
            if reserve is not None:
                reserve(im.width * im.height * 3)
            im.load()
            _make_upright(im)
            return _to_rgb(im)
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


def load_image(ref: ImageRef, max_pixels: int = DEFAULT_MAX_PIXELS, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
               reserve: Callable[[int], None] | None = None) -> DecodedImage:
    """Read and decode one image; never raises for a bad file (the failure is returned). `reserve`: as
    for `decode_image`."""
    try:
        return DecodedImage(ref.key, decode_image(ref.read(max_file_bytes), max_pixels, reserve))
    except ImageDecodeError as exc:
        log.info("skipping %s: %s (%s)", ref.key, exc.reason, exc)
        return DecodedImage(ref.key, None, exc.reason)
    except (OSError, ValueError) as exc:  # ValueError: a listed path holding a NUL character
        log.warning("skipping %s: cannot read it (%s)", ref.key, exc)
        return DecodedImage(ref.key, None, "unreadable")


def _load_in_turn(budget: ByteBudget, index: int, ref: ImageRef, max_pixels: int, max_file_bytes: int) -> DecodedImage:
    """`load_image` of image number `index`, whose pixels wait for their turn and room in `budget`."""
    try:
        return load_image(ref, max_pixels, max_file_bytes, partial(budget.claim, index))
    finally:
        budget.claim(index, 0)  # an image that failed before its header passes its turn on


def decode_stream(refs: Sequence[ImageRef], *, workers: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, prefetch: int = 64,
                  prefetch_bytes: int = DEFAULT_PREFETCH_BYTES) -> Iterator[DecodedImage]:
    """`load_image` over `refs` in a pool of `workers` threads, yielded in the order of `refs`.

    Pillow releases the GIL while decoding, so threads decode in parallel without pickling pixels between
    processes. Memory is bounded whatever the image sizes: the images decoded or being decoded ahead of
    the consumer hold at most `prefetch_bytes` of pixels (H * W * 3 each; an image larger than that decodes
    alone), and at most `prefetch` images are queued; besides, each thread holds one file's bytes (at most
    `max_file_bytes`) and about 4 bytes a pixel while it decodes. The results do not depend on `workers`,
    `prefetch` or `prefetch_bytes`. `workers=0` decodes in the calling thread.
    """
    if workers <= 0:
        yield from (load_image(r, max_pixels, max_file_bytes) for r in refs)
        return
    budget = ByteBudget(prefetch_bytes)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="cmcaug-decode")
    try:
        todo = enumerate(refs)
        pending: deque[Future[DecodedImage]] = deque(
            pool.submit(_load_in_turn, budget, i, r, max_pixels, max_file_bytes) for i, r in islice(todo, max(prefetch, workers)))
        done = 0
        while pending:
            result = pending.popleft().result()
            budget.release(done)
            done += 1
            for i, r in islice(todo, 1):
                pending.append(pool.submit(_load_in_turn, budget, i, r, max_pixels, max_file_bytes))
            yield result
    finally:
        budget.close()
        pool.shutdown(wait=True, cancel_futures=True)
