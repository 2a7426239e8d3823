"""What a build promises when things go wrong: a failed or killed --overwrite keeps the old bank (readable,
byte for byte) until the new one is published; a full disk is one clear line (exit 7) that --resume gets
past once space is freed; one build per bank folder (exit 6); nothing is written through a symbolic link
planted in the bank folder.

The kills and the real disk limits (RLIMIT_FSIZE, a small tmpfs) hit the CLI in a subprocess; a full disk
at each single write is injected in-process. OLD is the bank already there, NEW the rebuild's options.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from bank_helpers import file_hashes, fill_disk_at, stop_after

from cmcaug.bank import format as fmt
from cmcaug.bank.reader import PatchBank
from cmcaug.builder._state import BUILD_DIR, CRASH_ENV
from cmcaug.builder.pipeline import build_bank, run_local
from cmcaug.cli.main import main
from cmcaug.errors import BankFormatError, BankLockedError, InputError
from cmcaug.synth import make_corpus

CLI = [sys.executable, "-m", "cmcaug.cli.main", "build-bank"]
OLD = {"patch_size": 32, "max_per_concept": 2, "batch_size": 4}
NEW = {"patch_size": 64, "max_per_concept": None, "batch_size": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("faults") / "corpus", 16, seed=5, image_size=128).root


def options(corpus: Path, which: dict) -> dict:
    return {"annotations": str(corpus / "annotations.json"), "vocab": str(corpus / "vocab.json"), "min_box": 4, "workers": 2,
            **which}


def flags(corpus: Path, which: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in options(corpus, which).items() if v is not None]


def cli(corpus: Path, out: Path, which: dict, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    args = [*CLI, str(corpus / "images"), "-o", str(out), *flags(corpus, which), "--no-progress", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=180, **kwargs)


def run_main(corpus: Path, out: Path, which: dict, *extra: str) -> int:
    return main(["build-bank", str(corpus / "images"), "-o", str(out), *flags(corpus, which), "--no-progress", *extra])


def build(corpus: Path, out: Path, which: dict, **kwargs):
    return build_bank([str(corpus / "images")], out, progress=False, **options(corpus, which), **kwargs)


@pytest.fixture(scope="module")
def banks(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The OLD and NEW banks, each built once, undisturbed."""
    root = tmp_path_factory.mktemp("references")
    build(corpus, root / "old", OLD)
    build(corpus, root / "new", NEW)
    return {"old": root / "old", "new": root / "new"}


@pytest.fixture
def old(banks: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the OLD bank, about to be rebuilt with NEW's options."""
    return Path(shutil.copytree(banks["old"], tmp_path / "bank"))


def assert_old_bank(out: Path, banks: dict[str, Path]) -> None:
    """`out` still holds the OLD bank, byte for byte, and it opens with every check."""
    assert file_hashes(out, hidden=False) == file_hashes(banks["old"])
    assert PatchBank.open(out, validate=True).patch_size == OLD["patch_size"]


# -- --overwrite keeps the old bank until the new one is published -----------------------------------
@pytest.mark.parametrize("point", ["shard:2", "finalize:before", "finalize:staged"])
def test_overwrite_killed_before_the_publish_keeps_the_old_bank(point: str, corpus: Path, banks, old: Path) -> None:
    killed = cli(corpus, old, NEW, "--overwrite", env={**os.environ, CRASH_ENV: point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert_old_bank(old, banks)
    assert (old / ".lock").is_file()  # left by the killed build: the kernel dropped its lock, so it blocks no one
    resumed = cli(corpus, old, NEW, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert file_hashes(old) == file_hashes(banks["new"])  # no .build/, no .lock


@pytest.mark.parametrize(("point", "then"), [("publish:unpublished", "--resume"), ("publish:moved", "--overwrite")])
def test_killed_while_publishing_the_next_build_finishes_the_publish(point: str, then: str, corpus: Path, banks, old: Path) -> None:
    killed = cli(corpus, old, NEW, "--overwrite", env={**os.environ, CRASH_ENV: point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with pytest.raises(BankFormatError, match="manifest.json: missing"):  # unpublished: refused, never a mix
        PatchBank.open(old)
    finished = cli(corpus, old, NEW, then)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert file_hashes(old) == file_hashes(banks["new"])


@pytest.mark.parametrize("error", [InputError("a box lies outside its image"), KeyboardInterrupt()], ids=["bad input", "Ctrl-C"])
def test_overwrite_that_fails_late_keeps_the_old_bank(error: BaseException, corpus: Path, banks, old: Path) -> None:
    with pytest.raises(type(error)):
        build(corpus, old, NEW, overwrite=True, runner=stop_after(3, run_local, error))
    assert_old_bank(old, banks)
    assert not (old / ".lock").exists()
    assert build(corpus, old, NEW, resume=True).resumed_batches == 3
    assert file_hashes(old) == file_hashes(banks["new"])


# -- a full disk -------------------------------------------------------------------------------------
WRITES = [(".build", ".state.json.tmp"), ("shards", ".00000002.npz.tmp"), (".build", "pixels.npy"), (".build", "embeddings.npy"),
          *(("staged", name) for name in fmt.DATA_FILES), ("staged", ".manifest.json.tmp")]


@pytest.mark.parametrize("write", WRITES, ids=["/".join(w) for w in WRITES])
def test_disk_full_at_any_write_is_one_line_and_resume_continues(write: tuple[str, str], corpus: Path, banks, old: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fill_disk_at(monkeypatch, *write)
    assert run_main(corpus, old, NEW, "--overwrite") == 7
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cmcaug build-bank: error: cannot write {old}")
    assert f"{write[1]}: No space left on device" in err and "rerun with --resume" in err, err
    assert f"{old} still holds a whole bank" in err
    assert_old_bank(old, banks)
    assert {p.name for p in (old / BUILD_DIR).iterdir()} <= {"shards", "state.json"}  # what finalize wrote is gone: its space is free
    monkeypatch.undo()
    assert run_main(corpus, old, NEW, "--resume") == 0
    assert file_hashes(old) == file_hashes(banks["new"])


def test_file_size_limit_mid_finalize_is_a_clear_error(corpus: Path, banks, old: Path) -> None:
    """RLIMIT_FSIZE makes every write past the limit fail (EFBIG; Python ignores SIGXFSZ): a real OS failure,
    no root needed. The limit lets every shard through but not the gathered pixels."""
    limit = (banks["new"] / fmt.PIXELS).stat().st_size // 2

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = cli(corpus, old, NEW, "--overwrite", preexec_fn=limited)
    assert done.returncode == 7, done.stderr[-2000:]
    assert done.stderr == (f"cmcaug build-bank: error: cannot write {old / BUILD_DIR / fmt.PIXELS}: File too large; the finished "
                           f"batches are kept in {old / BUILD_DIR}: free space (or fix the cause) and rerun with --resume; {old} "
                           "still holds a whole bank (the last one published)\n")
    assert_old_bank(old, banks)
    resumed = cli(corpus, old, NEW, "--resume")
    assert resumed.returncode == 0 and "batches resumed: 8" in resumed.stdout, resumed.stderr[-2000:]
    assert file_hashes(old) == file_hashes(banks["new"])


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs (needs root and a kernel that lets this process mount; skipped elsewhere)."""
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root on Linux")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_during_finalize_on_a_real_small_disk(corpus: Path, banks, small_disk: Path) -> None:
    """Once a SIGBUS (exit 135, no message) or a traceback: now exit 7 with one line, the old bank intact,
    and --resume finishing the bank once space is freed."""
    out = Path(shutil.copytree(banks["old"], small_disk / "bank"))
    killed = cli(corpus, out, NEW, "--overwrite", env={**os.environ, CRASH_ENV: "finalize:before"})  # every shard written
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    free = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(bytes(free.f_bavail * free.f_frsize - 100_000))  # room for ~8 patches, not the bank
    done = cli(corpus, out, NEW, "--resume")
    assert done.returncode == 7, (done.returncode, done.stderr[-2000:])
    assert done.stderr.count("\n") == 1 and ": No space left on device; the finished batches are kept in" in done.stderr
    assert_old_bank(out, banks)
    (small_disk / "filler").unlink()
    resumed = cli(corpus, out, NEW, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert file_hashes(out) == file_hashes(banks["new"])


# -- one build per bank folder -----------------------------------------------------------------------
def test_a_second_build_of_the_same_bank_is_refused_and_names_the_first(corpus: Path, banks, tmp_path: Path) -> None:
    out, seen = tmp_path / "bank", {}

    def first_build(job, batches):
        results = run_local(job, batches)
        yield next(results)  # this build holds out/.lock now: another process tries the same bank
        seen["cli"] = cli(corpus, out, NEW, "--resume")
        with pytest.raises(BankLockedError, match=f"pid {os.getpid()} on"):  # and this process, a second time
            build(corpus, out, NEW, overwrite=True)
        yield from results

    build(corpus, out, NEW, runner=first_build)
    second = seen["cli"]
    assert second.returncode == 6 and second.stderr.count("\n") == 1, second.stderr[-2000:]
    assert second.stderr.startswith(f"cmcaug build-bank: error: {out} is being written by another process (cmcaug build-bank, "
                                    f"pid {os.getpid()} on {socket.gethostname()}, started ")
    assert "wait for it to finish" in second.stderr
    assert file_hashes(out) == file_hashes(banks["new"])  # the first build went on undisturbed, and left no lock


# -- symbolic links planted in the bank folder ------------------------------------------------------
@pytest.fixture
def victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("file", "state.json", "pixels.npy", "00000003.npz", fmt.MANIFEST):
        (victim / name).write_bytes(b"precious " + name.encode())
    return victim


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


PLANTED = [".build/state.json", ".build/shards/00000003.npz", ".build/shards/.00000003.npz.tmp", ".build/.state.json.tmp",
           ".build/pixels.npy", ".build/staged", ".lock", fmt.PIXELS, fmt.MANIFEST, ".build"]


@pytest.mark.parametrize("planted", PLANTED)
def test_a_planted_link_is_refused_and_its_target_untouched(planted: str, corpus: Path, banks, old: Path, victim: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(KeyboardInterrupt):  # a rebuild interrupted after 2 of its 8 batches, to be resumed
        build(corpus, old, NEW, overwrite=True, runner=stop_after(2, run_local))
    link = old / planted
    if link.is_dir():
        shutil.rmtree(link)
    link.unlink(missing_ok=True)
    link.symlink_to(victim if planted in (".build", ".build/staged") else victim / "file")
    before = snapshot(victim)
    for mode in ("--resume", "--overwrite"):
        assert run_main(corpus, old, NEW, mode) == 4
        err = capsys.readouterr().err
        assert err.startswith(f"cmcaug build-bank: error: {link} is a symbolic link; cmcaug never reads or writes a bank through one")
    assert snapshot(victim) == before
    link.unlink()
    assert run_main(corpus, old, NEW, "--overwrite") == 0 and snapshot(victim) == before
    assert file_hashes(old) == file_hashes(banks["new"])


def test_a_link_swapped_in_while_building_is_never_followed(corpus: Path, banks, tmp_path: Path, victim: Path) -> None:
    """The build holds its folders open: .build/ replaced by a link mid-build still gets nothing written through it."""
    out = tmp_path / "bank"
    before = snapshot(victim)

    def swapping(job, batches):
        results = run_local(job, batches)
        yield next(results)
        os.rename(out / BUILD_DIR, tmp_path / "moved")
        (out / BUILD_DIR).symlink_to(victim)
        yield from results

    build(corpus, out, NEW, runner=swapping)
    assert snapshot(victim) == before and not (out / BUILD_DIR).exists()
    assert file_hashes(out) == file_hashes(banks["new"])
