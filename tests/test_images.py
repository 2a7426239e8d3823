"""Image sources and the corrupt-image zoo: every file decodes to upright RGB or fails with a counted reason."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmcaug.errors import InputError
from cmcaug.images import (
    FAILURE_REASONS,
    ImageDecodeError,
    ImageRef,
    decode_image,
    decode_stream,
    list_images,
    load_image,
)


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
        "bad_empty.jpg": b"",
        "bad_text.jpg": b"this is not an image, just text with a .jpg name\n",
        "bad_truncated.png": png[: len(png) // 2],
    }


@pytest.fixture
def zoo_dir(tmp_path: Path) -> Path:
    for name, data in zoo().items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_conversions_to_upright_rgb() -> None:
    z = zoo()
    cmyk = decode_image(z["ok_cmyk.jpg"])
    assert cmyk.shape == (16, 16, 3) and cmyk.dtype == np.uint8
    assert cmyk[8, 8, 0] > 200 and cmyk[8, 8, 1:].max() < 60  # CMYK (0, 255, 255, 0) is red
    assert decode_image(z["ok_16bit.png"]).tolist() == [[[0] * 3, [128] * 3, [255] * 3]]  # rescaled, not clipped
    gray = decode_image(z["ok_gray.png"])
    assert gray.shape == (6, 10, 3) and (gray == 77).all()
    pal = decode_image(z["ok_palette.png"])
    assert (pal[:, :4] == (200, 30, 30)).all() and (pal[:, 4:] == 255).all()  # transparent -> white
    assert (decode_image(z["ok_la.png"]) == 255).all()
    assert (decode_image(z["ok_rgba.webp"]) == (10, 200, 10)).all()
    assert decode_image(z["ok_bmp.bmp"]).shape == (4, 8, 3)


def test_exif_orientation_6_is_made_upright() -> None:
    up = decode_image(exif_rotated_jpeg())
    assert up.shape == (40, 20, 3)  # stored 40 wide x 20 high, displayed rotated
    top, bottom = up[:15].reshape(-1, 3).mean(0), up[25:].reshape(-1, 3).mean(0)
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # the red left half is now on top


@pytest.mark.parametrize(
    ("name", "reason"),
    [("bad_truncated.jpg", "truncated"), ("bad_empty.jpg", "empty"), ("bad_text.jpg", "not_image"), ("bad_truncated.png", "truncated")],
)
def test_failures_have_reasons(name: str, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(zoo()[name])
    assert info.value.reason == reason and reason in FAILURE_REASONS


def test_decompression_bomb_is_refused_from_the_header() -> None:
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    assert decode_image(data, max_pixels=64 * 64).shape == (64, 64, 3)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=64 * 64 - 1)
    assert info.value.reason == "too_large"


def test_zoo_stream_counts_and_keeps_key_order(zoo_dir: Path) -> None:
    (zoo_dir / "notes.txt").write_text("ignored: not an image extension")
    refs = list_images([zoo_dir])
    assert [r.key for r in refs] == sorted(zoo())
    inline = list(decode_stream(refs, workers=0))
    pooled = list(decode_stream(refs, workers=3, prefetch=2))
    assert [d.key for d in pooled] == [r.key for r in refs]
    for a, b in zip(inline, pooled):
        assert a.failure == b.failure and (a.pixels is None or np.array_equal(a.pixels, b.pixels))
    assert {d.key for d in pooled if d.failure} == {k for k in zoo() if k.startswith("bad_")}
    (zoo_dir / "ok_rgb.jpg").unlink()  # listed, then gone: unreadable, not a crash
    assert load_image(refs[[r.key for r in refs].index("ok_rgb.jpg")]).failure == "unreadable"


def test_sources_folder_list_and_tar(tmp_path: Path) -> None:
    data = encode(halves(8, 8), "PNG")
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / "deep" / "x.PNG").write_bytes(data)
    (tmp_path / "a" / "y.jpeg").write_bytes(encode(halves(8, 8), "JPEG"))
    assert [r.key for r in list_images([tmp_path / "a"])] == ["deep/x.PNG", "y.jpeg"]

    (tmp_path / "list.txt").write_text("# one path a line\na/deep/x.PNG\n\n" + str(tmp_path / "a" / "y.jpeg") + "\n")
    refs = list_images([tmp_path / "list.txt"])
    assert [r.key for r in refs] == sorted(["a/deep/x.PNG", (tmp_path / "a" / "y.jpeg").as_posix()])
    assert all(load_image(r).failure is None for r in refs)

    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:  # the img2dataset layout: key.jpg + key.json + key.txt
        for key, payload in [("000000001", data), ("000000000", data)]:
            for suffix, blob in [(".jpg", payload), (".json", json.dumps({"key": key}).encode()), (".txt", b"a caption")]:
                info = tarfile.TarInfo(key + suffix)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    refs = list_images([shard])
    assert [r.key for r in refs] == ["00000.tar/000000000.jpg", "00000.tar/000000001.jpg"]
    assert refs[0].read() == data and np.array_equal(load_image(refs[1]).pixels, decode_image(data))
    assert list_images([shard, tmp_path / "a" / "y.jpeg"])[-1] == ImageRef("y.jpeg", str(tmp_path / "a" / "y.jpeg"))


def test_source_errors(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    for d in ("one", "two"):
        (tmp_path / d / "same.png").write_bytes(encode(halves(4, 4), "PNG"))
    with pytest.raises(InputError, match="occurs in both"):
        list_images([tmp_path / "one", tmp_path / "two"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        list_images([tmp_path / "empty"])
    with pytest.raises(InputError, match="does not exist"):
        list_images([tmp_path / "missing"])
    (tmp_path / "bad.tar").write_bytes(b"\x1f\x8b not a plain tar")
    with pytest.raises(InputError, match="uncompressed tar"):
        list_images([tmp_path / "bad.tar"])
