"""The corrupt-image zoo: one small file for every kind of image a real corpus holds, good or broken.

File names say the expected outcome: `ok_*` decodes to upright RGB, `bad_<reason>*` fails with that
reason (`cmcaug.builder.images.FAILURE_REASONS`). Used by the decoding tests and by the build tests, which
check that none of them stops a build. `write_zoo` adds what only a file system holds: a dangling link,
a FIFO, a file over the size cap, a name that is not UTF-8 and a damaged shard with a link member.
"""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from cmcaug.builder.options import DEFAULT_MAX_FILE_BYTES


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def halves(width: int = 40, height: int = 20) -> Image.Image:
    """Left half red, right half blue: shows both orientation and colour."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2] = (220, 20, 20)
    a[:, width // 2 :] = (20, 20, 220)
    return Image.fromarray(a)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return encode(halves(), "JPEG", quality=95, exif=exif.tobytes())


def palette_with_transparency() -> bytes:
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    p.paste(1, (0, 0, 4, 8))
    return encode(p, "PNG", transparency=0)  # palette index 0 is transparent


def sixteen_bit_png() -> bytes:
    a = np.array([[0, 257 * 128, 65535]], np.uint16)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    return encode(im, "PNG")


def png_bomb(side: int) -> bytes:
    """A valid PNG header declaring a `side` x `side` RGB image, with almost no pixel data: what a
    decompression bomb looks like before anything is decoded (a few hundred bytes, not gigabytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def noise(side: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))


def zoo() -> dict[str, bytes]:
    """name -> encoded bytes; names say the expected outcome."""
    jpeg = encode(noise(), "JPEG", quality=90)
    png = encode(noise(), "PNG")
    return {
        "ok_rgb.jpg": jpeg,
        "ok_cmyk.jpg": encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
        "ok_16bit.png": sixteen_bit_png(),
        "ok_gray.png": encode(Image.new("L", (10, 6), 77), "PNG"),
        "ok_palette.png": palette_with_transparency(),
        "ok_la.png": encode(Image.new("LA", (5, 5), (0, 0)), "PNG"),
        "ok_rgba.webp": encode(Image.new("RGBA", (6, 6), (10, 200, 10, 255)), "WEBP", lossless=True),
        "ok_bmp.bmp": encode(halves(8, 4), "BMP"),
        "ok_exif.jpg": exif_rotated_jpeg(),
        "bad_truncated.jpg": jpeg[: len(jpeg) // 2],
        "bad_truncated.png": png[: len(png) // 2],
        "bad_empty.jpg": b"",
        "bad_not_image.jpg": b"this is not an image, just text with a .jpg name\n",
        "bad_too_large.png": png_bomb(10_000),  # 100 Mpx: over cmcaug's limit, under twice Pillow's
        "bad_too_large_huge.png": png_bomb(60_000),  # 3.6 Gpx: Pillow itself refuses to open it
    }


def write_zoo(folder: Path) -> dict[str, str | None]:
    """Write the zoo into `folder`, plus what only a file system holds: a link to a file that does not exist
    (listed like any image, fails when read), a FIFO (reading it would wait forever), a sparse file one
    byte over the default size cap, a good image whose name is not UTF-8, and a shard with a good member,
    a link member and its end cut off. Returns key -> expected failure reason (None: decodes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in zoo().items():
        (folder / name).write_bytes(data)
    os.symlink(folder / "deleted-meanwhile.jpg", folder / "bad_unreadable.jpg")
    os.mkfifo(folder / "bad_not_regular_file.jpg")
    with open(folder / "bad_file_too_big.jpg", "wb") as f:
        f.truncate(DEFAULT_MAX_FILE_BYTES + 1)
    (folder / os.fsdecode(b"bad_name_not_utf8_\xff.jpg")).write_bytes(zoo()["ok_rgb.jpg"])
    write_damaged_shard(folder / "bad_shard.tar", zoo()["ok_rgb.jpg"])
    expected = {n: None if n.startswith("ok_") else n.removeprefix("bad_").split(".")[0].removesuffix("_huge")
                for n in [*zoo(), "bad_unreadable.jpg", "bad_not_regular_file.jpg", "bad_file_too_big.jpg"]}
    return expected | {"bad_name_not_utf8_\\udcff.jpg": "name_not_utf8", "bad_shard.tar/0.jpg": None,
                       "bad_shard.tar/1.jpg": "not_regular_file", "bad_shard.tar": "damaged_shard"}


def write_damaged_shard(path: Path, image: bytes) -> Path:
    """A shard whose download stopped early: `0.jpg` (whole), `1.jpg` (a symlink to it), then `2.jpg` cut
    off in the middle of its data."""
    whole, link, cut = (tarfile.TarInfo(name) for name in ("0.jpg", "1.jpg", "2.jpg"))
    whole.size = cut.size = len(image)
    link.type, link.linkname = tarfile.SYMTYPE, "0.jpg"
    with tarfile.open(path, "w") as tar:
        tar.addfile(whole, io.BytesIO(image))
        tar.addfile(link)
        tar.addfile(cut, io.BytesIO(image))
    with tarfile.open(path) as tar:
        end = tar.getmember("2.jpg").offset_data + len(image) // 2
    os.truncate(path, end)
    return path


def write_shard(path: Path, images: dict[str, bytes], suffix: str = ".jpg") -> Path:
    """A webdataset shard as img2dataset writes it: per sample `key.jpg`, `key.json` and `key.txt`."""
    with tarfile.open(path, "w") as tar:
        for key, data in images.items():
            for ext, blob in [(suffix, data), (".json", json.dumps({"key": key}).encode()), (".txt", b"a caption")]:
                info = tarfile.TarInfo(key + ext)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return path
