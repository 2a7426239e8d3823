"""Image sources and the corrupt-image zoo: every file decodes to upright RGB or fails with a counted reason."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from image_zoo import encode, exif_rotated_jpeg, halves, write_shard, write_zoo, zoo
from PIL import Image

from cmcaug.builder.images import (
    FAILURE_REASONS,
    ImageDecodeError,
    ImageRef,
    decode_image,
    decode_stream,
    list_images,
    load_image,
)
from cmcaug.errors import InputError


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


@pytest.mark.parametrize("name", sorted(n for n in zoo() if n.startswith("bad_")))
def test_failures_have_reasons(name: str) -> None:
    reason = name.removeprefix("bad_").split(".")[0].removesuffix("_huge")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning, raised as an error, is a failure too
        with pytest.raises(ImageDecodeError) as info:
            decode_image(zoo()[name])
    assert info.value.reason == reason and reason in FAILURE_REASONS


def test_decompression_bomb_is_refused_from_the_header() -> None:
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    assert decode_image(data, max_pixels=64 * 64).shape == (64, 64, 3)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=64 * 64 - 1)
    assert info.value.reason == "too_large"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_zoo_stream_counts_and_keeps_key_order(tmp_path: Path) -> None:
    expected = write_zoo(tmp_path)
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    refs = list_images([tmp_path])
    assert [r.key for r in refs] == sorted(expected)
    inline = list(decode_stream(refs, workers=0))
    pooled = list(decode_stream(refs, workers=3, prefetch=2))
    assert [d.key for d in pooled] == [r.key for r in refs]
    for a, b in zip(inline, pooled):
        assert a.failure == b.failure and (a.pixels is None or np.array_equal(a.pixels, b.pixels))
    assert {d.key: d.failure for d in pooled} == expected
    (tmp_path / "ok_rgb.jpg").unlink()  # listed, then gone: unreadable, not a crash
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

    shard = write_shard(tmp_path / "00000.tar", {"000000001": data, "000000000": data})
    refs = list_images([shard])
    assert [r.key for r in refs] == ["00000.tar/000000000.jpg", "00000.tar/000000001.jpg"]  # .json and .txt skipped
    assert refs[0].read() == data and np.array_equal(load_image(refs[1]).pixels, decode_image(data))
    assert list_images([shard, tmp_path / "a" / "y.jpeg"])[-1] == ImageRef("y.jpeg", str(tmp_path / "a" / "y.jpeg"))


def test_folders_hold_shards_and_follow_symlinks(tmp_path: Path) -> None:
    data = encode(halves(8, 8), "PNG")
    out = tmp_path / "img2dataset-out"  # img2dataset's output folder: shards next to parquet and stats files
    out.mkdir()
    write_shard(out / "00000.tar", {"000000000": data, "000000001": data})
    write_shard(out / "00001.TAR", {"000010000": data}, suffix=".WEBP")
    (out / "00000.parquet").write_bytes(b"PAR1")
    (out / "00000_stats.json").write_text("{}")
    assert [r.key for r in list_images([out])] == [
        "00000.tar/000000000.jpg", "00000.tar/000000001.jpg", "00001.TAR/000010000.WEBP"]

    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "sub" / "a.jpg").write_bytes(data)
    (tmp_path / "top").mkdir()
    os.symlink(tmp_path / "real" / "sub", tmp_path / "top" / "linked")  # a dataset folder linked into the tree
    os.symlink(tmp_path / "real" / "sub" / "a.jpg", tmp_path / "top" / "file.jpg")
    os.symlink(tmp_path / "top", tmp_path / "real" / "sub" / "loop")  # a cycle: followed once
    os.symlink(tmp_path / "real" / "sub", tmp_path / "top" / "zz-again")  # the same folder twice: listed once
    refs = list_images([tmp_path / "top"])
    assert [r.key for r in refs] == ["file.jpg", "linked/a.jpg"]
    assert all(load_image(r).failure is None for r in refs)


def test_list_files_tolerate_a_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(encode(halves(4, 4), "PNG"))
    (tmp_path / "list.txt").write_bytes("x.png\r\n".encode("utf-8-sig"))
    refs = list_images([tmp_path / "list.txt"])
    assert [r.key for r in refs] == ["x.png"] and load_image(refs[0]).failure is None


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
