"""Inputs that must neither hang a build, nor cost memory without bound, nor stop it: FIFOs and devices,
files over the size cap, tar members that are not files, damaged shards, names that are not UTF-8, and
huge images decoded ahead. Each is skipped and counted by reason; the memory promises run in a fresh
interpreter under an address-space cap (RLIMIT_AS), where breaking one is a MemoryError."""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from image_zoo import encode, halves, noise, write_damaged_shard, write_shard

from cmcaug.builder import images
from cmcaug.builder.images import (
    DEFAULT_PREFETCH_BYTES,
    ImageDecodeError,
    ImageRef,
    decode_stream,
    list_images,
    load_image,
)
from cmcaug.errors import InputError

GOOD = encode(halves(8, 8), "PNG")


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fails (instead of hanging) a test whose main thread waits 30 s, e.g. on a FIFO nobody writes."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("reading the inputs waited 30 s: a build would hang here")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def outcomes(inputs: list[Path], **kwargs: int) -> dict[str, str | None]:
    """key -> failure reason (None: decoded) for every image of `inputs`, read in the calling thread."""
    return {d.key: d.failure for d in decode_stream(list_images(inputs), workers=0, **kwargs)}


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), link
    return info, data


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", encoding="utf-8", errors="surrogateescape") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


# -- what is read ----------------------------------------------------------------------------------
def test_only_regular_files_are_opened(tmp_path: Path, deadline: None) -> None:
    (tmp_path / "ok.png").write_bytes(GOOD)
    os.mkfifo(tmp_path / "pipe.jpg")
    os.mkfifo(tmp_path / "pipe.tar")  # found in a folder: tarfile would wait on it forever
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "list.txt").write_text("/dev/zero\npipe.jpg\nfolder.jpg\nok.png\n")
    assert outcomes([tmp_path / "list.txt"]) == {
        "/dev/zero": "not_regular_file", "pipe.jpg": "not_regular_file", "folder.jpg": "not_regular_file", "ok.png": None}
    found = outcomes([tmp_path / "pipe.tar", tmp_path / "pipe.jpg"])  # given directly
    assert found == {"pipe.tar": "not_regular_file", "pipe.jpg": "not_regular_file"}


def test_a_path_that_turns_into_a_fifo_after_its_check_is_not_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                         deadline: None) -> None:
    (tmp_path / "ok.png").write_bytes(GOOD)
    os.mkfifo(tmp_path / "pipe.jpg")

    class Racing:  # `os`, but its stat still sees the regular file that the FIFO has replaced meanwhile
        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

        @staticmethod
        def stat(path: str) -> os.stat_result:
            return os.stat(tmp_path / "ok.png")

    monkeypatch.setattr(images, "os", Racing())
    assert load_image(ImageRef("pipe.jpg", str(tmp_path / "pipe.jpg"))).failure == "not_regular_file"


def test_the_size_cap_is_checked_before_a_byte_is_read(tmp_path: Path) -> None:
    (tmp_path / "fits.png").write_bytes(GOOD)
    (tmp_path / "over.png").write_bytes(GOOD + b"\0")
    write_tar(tmp_path / "s.tar", [tar_member("fits.png", data=GOOD), tar_member("over.png", data=GOOD + b"\0")])
    with open(tmp_path / "sparse.jpg", "wb") as f:
        f.truncate(3 * 2**30)  # 3 GiB that take no disk; reading it would take 3 GiB of memory
    assert outcomes([tmp_path], max_file_bytes=len(GOOD)) == {
        "fits.png": None, "over.png": "file_too_big", "s.tar/fits.png": None, "s.tar/over.png": "file_too_big",
        "sparse.jpg": "file_too_big"}
    assert outcomes([tmp_path / "sparse.jpg"]) == {"sparse.jpg": "file_too_big"}  # the default cap: 256 MiB


def test_a_list_file_without_line_ends_is_refused_not_read_whole(tmp_path: Path, deadline: None) -> None:
    with pytest.raises(InputError, match="line 1 is longer than 65,536 characters"):
        list_images(["/dev/zero"])
    (tmp_path / "list.txt").write_text("x" * 70_000)
    with pytest.raises(InputError, match=r"list.txt: line 1 is longer"):
        list_images([tmp_path / "list.txt"])


# -- what is listed --------------------------------------------------------------------------------
def test_tar_members_that_are_not_files_are_counted(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "s.tar", [
        tar_member("a.jpg", data=GOOD), tar_member("hard.jpg", tarfile.LNKTYPE, link="a.jpg"),
        tar_member("soft.jpg", tarfile.SYMTYPE, link="a.jpg"), tar_member("dev.jpg", tarfile.CHRTYPE),
        tar_member("fifo.jpg", tarfile.FIFOTYPE), tar_member("dir.jpg", tarfile.DIRTYPE),
        tar_member("soft.json", tarfile.SYMTYPE, link="a.json")])  # not an image: not counted, as a .json file is not
    assert outcomes([shard]) == {"s.tar/a.jpg": None} | {
        f"s.tar/{n}.jpg": "not_regular_file" for n in ("hard", "soft", "dev", "fifo", "dir")}


def damaged(path: Path, how: str) -> Path:
    """A shard of 0.jpg, 1.jpg, 2.jpg damaged `how`."""
    write_tar(path, [tar_member(f"{i}.jpg", data=GOOD) for i in range(3)])
    with tarfile.open(path) as tar:
        third = tar.getmember("2.jpg").offset_data - tarfile.BLOCKSIZE  # where its header starts
    data = path.read_bytes()
    cut = {"in a header": data[:third + 100], "in data": data[:third + tarfile.BLOCKSIZE + 10], "no end marker": data[:third],
           "bad header": data[:third] + b"not a tar header".ljust(tarfile.BLOCKSIZE, b"!") + data[third + tarfile.BLOCKSIZE:]}
    path.write_bytes(cut[how])
    return path


@pytest.mark.parametrize("how", ["in a header", "in data", "bad header"])
def test_a_damaged_shard_keeps_its_members_before_the_damage(tmp_path: Path, how: str) -> None:
    assert outcomes([damaged(tmp_path / "s.tar", how)]) == {"s.tar": "damaged_shard", "s.tar/0.jpg": None, "s.tar/1.jpg": None}


def test_shards_cut_at_a_member_boundary_or_empty(tmp_path: Path) -> None:
    shard = damaged(tmp_path / "s.tar", "no end marker")  # nothing lost: not counted
    assert outcomes([shard]) == {"s.tar/0.jpg": None, "s.tar/1.jpg": None}
    (tmp_path / "empty.tar").touch()
    (tmp_path / "ok.png").write_bytes(GOOD)
    assert outcomes([tmp_path / "empty.tar", tmp_path / "ok.png"]) == {"empty.tar": "damaged_shard", "ok.png": None}
    shard = write_damaged_shard(tmp_path / "img2dataset.tar", GOOD)
    assert outcomes([shard]) == {"img2dataset.tar": "damaged_shard", "img2dataset.tar/0.jpg": None,
                                 "img2dataset.tar/1.jpg": "not_regular_file"}


@pytest.mark.parametrize(("kind", "compress"), [("gzip", gzip.compress), ("bzip2", bz2.compress), ("xz", lzma.compress)])
def test_a_compressed_shard_is_refused_by_name(tmp_path: Path, kind: str, compress: Callable[[bytes], bytes]) -> None:
    plain = write_shard(tmp_path / "plain.tar", {"0": GOOD}).read_bytes()
    (tmp_path / "s.tar").write_bytes(compress(plain))
    with pytest.raises(InputError, match=rf"s.tar is {kind}-compressed: cannot read it as an uncompressed tar shard"):
        list_images([tmp_path / "s.tar"])


def test_duplicates_are_named_for_what_they_are(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "s.tar", [tar_member("a.jpg", data=GOOD), tar_member("a.jpg", data=GOOD)])
    with pytest.raises(InputError) as info:
        list_images([shard])
    message = str(info.value)
    assert "holds two members named 'a.jpg'" in message and "a duplicate member of one shard" in message
    assert message.count("s.tar") == 1 and "both" not in message
    (tmp_path / "a.png").write_bytes(GOOD)
    (tmp_path / "list.txt").write_text("a.png\n./a.png\n")
    with pytest.raises(InputError, match=r"image key 'a.png' occurs twice in .*list.txt: keys must be unique"):
        list_images([tmp_path / "list.txt"])
    clean = write_tar(tmp_path / "clean.tar", [tar_member("a.jpg", data=GOOD)])
    with pytest.raises(InputError, match=r"clean.tar is given twice as an input: pass it once"):
        list_images([clean, clean])


def test_names_that_are_not_utf8_are_skipped_before_any_work(tmp_path: Path, deadline: None) -> None:
    os.mkfifo(tmp_path / os.fsdecode(b"\xff.jpg"))  # were it read, the test would hang: it is not
    (tmp_path / os.fsdecode(b"sub\xfe")).mkdir()
    (tmp_path / os.fsdecode(b"sub\xfe") / "ok.png").write_bytes(GOOD)
    (tmp_path / "ok.png").write_bytes(GOOD)
    write_tar(tmp_path / "s.tar", [tar_member(os.fsdecode(b"\xe9t\xe9.jpg"), data=GOOD), tar_member("ok.jpg", data=GOOD)])
    refs = list_images([tmp_path])
    assert {r.key: r.failure for r in refs} == {
        "\\udcff.jpg": "name_not_utf8", "sub\\udcfe/ok.png": "name_not_utf8", "ok.png": None,
        "s.tar/\\udce9t\\udce9.jpg": "name_not_utf8", "s.tar/ok.jpg": None}
    pa.array([r.key for r in refs], pa.string())  # what the bank's patches table needs: a finished build wrote these
    assert outcomes([tmp_path]) == {r.key: r.failure for r in refs}
    with pytest.raises(ImageDecodeError, match="skipped when it was listed"):
        refs[0].read()


# -- decoding ahead --------------------------------------------------------------------------------
def mixed_images(folder: Path) -> list[ImageRef]:
    """Images of very different sizes, a few bad ones among them."""
    folder.mkdir()
    for i, side in enumerate([40, 300, 8, 120, 500, 16, 260, 64]):
        (folder / f"{i}.png").write_bytes(encode(noise(side), "PNG"))
    (folder / "3b.jpg").write_bytes(b"not an image")
    os.mkfifo(folder / "5b.jpg")
    return list_images([folder])


def test_decoding_ahead_changes_no_result(tmp_path: Path) -> None:
    refs = mixed_images(tmp_path / "images")
    expected = list(decode_stream(refs, workers=0))
    for workers, prefetch, prefetch_bytes in [(1, 1, 1), (4, 64, 1), (4, 2, 300 * 300 * 3), (3, 64, DEFAULT_PREFETCH_BYTES)]:
        got = list(decode_stream(refs, workers=workers, prefetch=prefetch, prefetch_bytes=prefetch_bytes))
        assert [(d.key, d.failure) for d in got] == [(d.key, d.failure) for d in expected]
        assert all(d.pixels is None or (np.array_equal(d.pixels, e.pixels) and d.pixels.flags.writeable)
                   for d, e in zip(got, expected))


def test_the_pixels_held_ahead_stay_within_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refs = mixed_images(tmp_path / "images")
    budget = 300 * 300 * 3 + 1  # the 500-pixel image is larger than the whole budget: it decodes alone
    held: list[tuple[int, int]] = []  # (bytes held, images held) after each claim

    class Watched(images.ByteBudget):
        def claim(self, index: int, nbytes: int) -> None:
            with self._changed:  # re-entrant: waiting inside releases it
                super().claim(index, nbytes)
                held.append((self._total, sum(n > 0 for n in self._held.values())))

    monkeypatch.setattr(images, "ByteBudget", Watched)
    for _ in decode_stream(refs, workers=4, prefetch_bytes=budget):
        time.sleep(0.05)  # a slow consumer: the threads run ahead as far as they may
    assert len(held) >= len(refs) and max(n for n, _ in held) == 500 * 500 * 3
    assert all(n <= budget or count == 1 for n, count in held)


def test_closing_a_stream_releases_threads_waiting_for_the_budget(tmp_path: Path, deadline: None) -> None:
    refs = mixed_images(tmp_path / "images")
    stream = decode_stream(refs, workers=4, prefetch_bytes=1)
    next(stream)
    stream.close()  # the other three threads wait for their turn: close must not wait for them forever


# -- memory, measured in a fresh interpreter under an address-space cap ------------------------------
def run_capped(code: str, headroom_mib: int) -> str:
    """Run `code` after importing the decoder, with the address space capped at what the interpreter
    holds then plus `headroom_mib`; return its stdout (the test fails on its error, e.g. MemoryError)."""
    prelude = textwrap.dedent(f"""
        import resource, sys
        from cmcaug.builder.images import decode_stream, list_images, load_image
        size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (size + {headroom_mib} * 2**20, resource.RLIM_INFINITY))
    """)
    env = os.environ | {"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_endless_and_huge_files_cost_no_memory(tmp_path: Path) -> None:
    with open(tmp_path / "big.jpg", "wb") as f:
        f.truncate(3 * 2**30)  # read whole, as before, it needs 3 GiB
    (tmp_path / "list.txt").write_text(f"/dev/zero\n{tmp_path / 'big.jpg'}\n")
    out = run_capped(f"print([load_image(r).failure for r in list_images([{str(tmp_path / 'list.txt')!r}])])", 200)
    assert out.strip() == "['not_regular_file', 'file_too_big']"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_decoding_ahead_is_bounded_in_bytes_not_images(tmp_path: Path) -> None:
    """Eight 9-megapixel images (27 MB of pixels each) decoded by eight threads for a slow consumer: with a
    64 MiB budget the stream holds two of them ahead, not all eight (measured: 1.1 GiB resident before,
    0.16 GiB now; the address space grows by 1.3 GiB before, 0.35 GiB now)."""
    from PIL import Image

    for i in range(8):
        Image.new("RGB", (3000, 3000), (i, 2 * i, 3 * i)).save(tmp_path / f"{i}.png")
    out = run_capped(f"""
        import time
        for d in decode_stream(list_images([{str(tmp_path)!r}]), workers=8, prefetch_bytes=64 * 2**20):
            print(d.failure, d.pixels.shape)
            time.sleep(0.2)
    """, 600)
    assert out.splitlines() == ["None (3000, 3000, 3)"] * 8
