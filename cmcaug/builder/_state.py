"""A bank build's folder: the lock, the resumable state in `BANK/.build/`, and the publish of the new bank.

    BANK/.lock                         held by the build from start to end (`cmcaug.bank._publish.bank_lock`)
    BANK/.build/state.json             the fingerprint (sha256) and description of the inputs and options
    BANK/.build/shards/NNNNNNNN.npz    one finished batch: its patch rows, pixels, embeddings and stats
    BANK/.build/pixels.npy, ...        the kept rows of every shard, gathered by the finalize step
    BANK/.build/staged/                the new bank, staged whole, then published into BANK

A shard is written to a temporary name and renamed into place, so a shard file exists only when its
batch is complete; `state.json` pins the inputs and options. A resume (or a finished bank's manifest) is
checked against them by their description: paths are compared resolved, so `corpus/images`,
`./corpus/images/` and the absolute path are one input, and a path an earlier version stored as typed
counts as the same when it resolves, from here, to this build's; the message of a refusal names each
difference with both values. A build killed at any point (SIGKILL
included) and re-run with `resume=True` redoes only the missing batches, then finalizes from scratch.
Until the new bank is published, the build writes nothing in BANK but `.lock` and `.build/`: a bank that
was there (an --overwrite) stays readable and byte for byte the same, whatever happens to the build (bad
input, a full disk, SIGKILL). The publish (`cmcaug.bank._publish`) unpublishes the old bank, renames the
staged files in and the manifest last; a build killed in the middle of it is finished by the next
--resume or --overwrite. `.build/` is then renamed away before it is deleted, so it is either whole or gone.

Everything here goes through `cmcaug.bank._folder.Folder`: no file is reached through a symbolic link,
and `open_build` refuses a bank folder or build state holding one. `CRASH_ENV` kills the process at a
named point, so tests can check each of these steps.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..bank import format as fmt
from ..bank._folder import Folder, not_plain
from ..bank._publish import LOCK, bank_lock, finish_publish, publish
from ..bank.writer import STAGING, map_npy, write_npy
from ..errors import BankFormatError, InputError, StorageError

log = logging.getLogger(__name__)

BUILD_DIR = ".build"
# test hook: "shard:N", "finalize:before", "finalize:staged", "publish:unpublished", "publish:moved",
# "finalize:written", "finalize:renamed"
CRASH_ENV = "CMCAUG_BUILD_CRASH_AT"
_TRASH = ".build.trash"
_STATE = "state.json"
_SHARDS = "shards"
_STAGED = "staged"
_GATHERED = {"pixels": fmt.PIXELS, "embeddings": fmt.EMBEDDINGS}  # the finalize step's gathered rows, in .build/
_BANK_NAMES = {fmt.MANIFEST, *fmt.DATA_FILES, BUILD_DIR}


def crash_point(name: str) -> None:
    """Kill this process here when `CRASH_ENV` names this point (the resume tests' hook)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def digest(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON: the fingerprint that decides whether a build can be resumed."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# -- the output directory --------------------------------------------------------------------------
@contextlib.contextmanager
def locked_output(out: Path) -> Iterator[Folder]:
    """`out` (made when missing) opened and locked for one build. A `StorageError` leaving the block says
    what was kept and what to do next."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory; pass a directory path for the bank")
    try:
        with Folder.open(out, create=True) as bank, bank_lock(bank, "cmcaug build-bank"):
            yield bank
    except StorageError as exc:
        hint = (f"the finished batches are kept in {out / BUILD_DIR}: free space (or fix the cause) and rerun with --resume"
                if (out / BUILD_DIR).is_dir() else "fix the cause and run again")
        if (out / fmt.MANIFEST).is_file():
            hint += f"; {out} still holds a whole bank (the last one published)"
        raise StorageError(f"{exc}; {hint}") from exc.__cause__


def open_build(bank: Folder, state: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Make `bank/.build/` ready for `state`; return the finished bank's manifest when resuming one. The
    bank already in `bank` is left alone: it is replaced when the new one is published."""
    entries = _bank_entries(bank)
    if (resume or overwrite) and bank.kind(BUILD_DIR) is not None:
        _finish_publish(bank)
    build, has_build = bank.path / BUILD_DIR, bank.kind(BUILD_DIR) is not None
    if overwrite:
        bank.remove(BUILD_DIR)
    elif resume and has_build:
        with bank.folder(BUILD_DIR) as folder:
            old, done = _read_state(folder), _finished_shards(folder)
        if old is None:
            bank.remove(BUILD_DIR)  # killed before its state was written: nothing to keep
        elif changed := _changes(old, state):
            raise InputError(f"the unfinished build in {build} was started with other inputs or options (differs in: "
                             f"{changed}); rerun with the ones it was started with to resume its {done} finished "
                             "batch(es), or pass --overwrite to start over, discarding them")
    elif resume and bank.kind(fmt.MANIFEST) == "file":
        manifest = bank.path / fmt.MANIFEST
        try:
            with bank.reading(fmt.MANIFEST) as file:
                finished = json.loads(file.read())
        except (OSError, ValueError, RecursionError) as exc:
            raise BankFormatError(f"{manifest}: unreadable manifest ({exc}); pass --overwrite to rebuild the bank") from exc
        fmt.check_manifest(finished, manifest)  # a tampered one is refused naming it, not met with a raw error
        provenance = finished.get("provenance")
        provenance = provenance if isinstance(provenance, dict) else {}
        description = {k: v for k, v in provenance.items() if k != "fingerprint"}
        changed = _changes({"fingerprint": provenance.get("fingerprint"), "description": description}, state)
        if not changed:
            return finished
        raise InputError(f"{bank.path} is a finished bank built from other inputs or options (differs in: {changed}); "
                         "pass --overwrite to replace it with a bank of these, or rerun with the ones it was built from to keep it")
    elif not resume and entries:
        what = ("an unfinished build: pass --resume to continue it or --overwrite to start over" if has_build
                else "a bank: pass --overwrite to replace it, or --resume to keep it if it was built from the same inputs and options")
        raise InputError(f"output '{bank.path}' already holds {what}")
    with bank.folder(BUILD_DIR, create=True) as folder, folder.folder(_SHARDS, create=True) as shards:
        for stale in shards.names():
            if stale.endswith(".tmp"):
                shards.remove(stale)
        if _read_state(folder) is None:
            folder.write(_STATE, json.dumps(state, sort_keys=True, indent=1).encode())
    return None


def _bank_entries(bank: Folder) -> list[str]:
    """The names in `bank` but the lock, after deleting what killed builds and writes left; `InputError` for
    a file that is not a bank's, `BankFormatError` for a link (or FIFO, device) in `bank` or `.build/`."""
    bank.remove(_TRASH)  # the lock is ours: no one is using these
    bank.remove(STAGING)
    entries = [name for name in bank.names() if name != LOCK]
    foreign = [e for e in entries if e not in _BANK_NAMES]
    if foreign:
        raise InputError(f"output {bank.path} holds files that are not part of a cmcaug bank ({', '.join(foreign[:3])}); "
                         "choose a new or empty directory")
    odd = next(bank.odd_entries(), None)
    if odd is not None:
        raise not_plain(*odd)
    return entries


def _finish_publish(bank: Folder) -> None:
    """Finish the publish of a build killed while publishing (its new bank is staged whole), then delete its `.build/`."""
    with bank.folder(BUILD_DIR) as build:
        if build.kind(_STAGED) != "folder":
            return
        with build.folder(_STAGED) as staged:
            if not finish_publish(staged, bank):
                return
    log.info("finished publishing the bank that an interrupted build had staged in %s", bank.path / BUILD_DIR)
    remove_build(bank)


def _finished_shards(build: Folder) -> int:
    if build.kind(_SHARDS) != "folder":
        return 0
    with build.folder(_SHARDS) as shards:
        return sum(name.endswith(".npz") for name in shards.names())


def _read_state(build: Folder) -> dict[str, Any] | None:
    try:
        with build.reading(_STATE) as file:
            return json.loads(file.read())
    except (OSError, BankFormatError, ValueError):
        return None


def publish_build(bank: Folder, build: BuildFolder, stage: Callable[[Folder], dict[str, Any]]) -> dict[str, Any]:
    """Stage the new bank in `.build/staged/` with `stage` (it writes the files, returns the manifest),
    publish it into `bank`, then delete `.build/`."""
    crash_point("finalize:before")
    build.folder.remove(_STAGED)
    with build.folder.folder(_STAGED, create=True) as staged:
        manifest = stage(staged)
        crash_point("finalize:staged")
        publish(staged, bank, lambda step: crash_point(f"publish:{step}"))
    remove_build(bank)
    return manifest


def remove_build(bank: Folder) -> None:
    """Delete `.build/` once the bank is published: renamed away first, so it is either whole or gone."""
    crash_point("finalize:written")
    bank.move(BUILD_DIR, bank, _TRASH)
    crash_point("finalize:renamed")
    bank.remove(_TRASH)


# -- shards ----------------------------------------------------------------------------------------
def encode_shard(arrays: dict[str, np.ndarray], stats: dict[str, Any]) -> bytes:
    """One batch's shard bytes: its arrays and its stats (as JSON) in one .npz, no pickle."""
    shard = io.BytesIO()
    np.savez(shard, stats=np.frombuffer(json.dumps(stats, sort_keys=True).encode(), np.uint8), **arrays)
    return shard.getvalue()


class BuildFolder:
    """`BANK/.build/` of a build `open_build` made ready: its shards, and the rows the finalize step gathers."""

    def __init__(self, bank: Folder) -> None:
        self.folder = bank.folder(BUILD_DIR)
        self.shards = self.folder.folder(_SHARDS)
        self.path = self.folder.path

    def missing(self, n_batches: int) -> list[int]:
        """The batches of 0 .. n_batches - 1 without a finished shard: the work left to do."""
        done = set(self.shards.names())
        return [b for b in range(n_batches) if _shard_name(b) not in done]

    def save(self, batch: int, shard: bytes) -> None:
        self.shards.write(_shard_name(batch), shard)

    @contextlib.contextmanager
    def shard(self, batch: int) -> Iterator[Any]:
        """Batch `batch`'s shard, opened (a NumPy NpzFile); `BankFormatError` when it cannot be read."""
        path = self.shards.path / _shard_name(batch)
        try:
            with self.shards.reading(_shard_name(batch)) as file, np.load(file, allow_pickle=False) as z:
                yield z
        except (OSError, ValueError, KeyError) as exc:
            raise BankFormatError(f"{path}: unreadable build shard ({exc}); pass --overwrite to start the build over") from exc

    def load(self, batch: int, names: Sequence[str]) -> dict[str, Any]:
        """The arrays `names` and the stats of batch `batch`'s shard."""
        with self.shard(batch) as z:
            out: dict[str, Any] = {n: z[n] for n in names}
            out["stats"] = json.loads(bytes(z["stats"]).decode())
            return out

    def gather(self, name: str, kept: Sequence[np.ndarray], row_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Write the rows `kept[b]` (a mask) of array `name` of every shard b, in batch order, into
        `.build/<name>.npy` (with file writes: a full disk is an error, not a SIGBUS); return it mapped read-only."""
        blocks = (self._kept_rows(b, name, mask) for b, mask in enumerate(kept) if mask.any())
        with self.folder.writing(_GATHERED[name]) as file:
            write_npy(file, (sum(int(m.sum()) for m in kept), *row_shape), dtype, blocks)
            return map_npy(file)

    def _kept_rows(self, batch: int, name: str, mask: np.ndarray) -> np.ndarray:
        with self.shard(batch) as z:
            return z[name][mask]

    def discard_finalize(self) -> None:
        """Delete what a failed finalize step wrote (a resume redoes it from the shards), to free its space;
        not a staged bank whose publish may have begun: the next build finishes that publish."""
        if self.folder.kind(_STAGED) == "folder":
            with self.folder.folder(_STAGED) as staged:
                if staged.kind(fmt.MANIFEST) is not None:
                    return
        for name in (_STAGED, *_GATHERED.values()):
            self.folder.remove(name)

    def close(self) -> None:
        self.shards.close()
        self.folder.close()

    def __enter__(self) -> BuildFolder:
        return self

    def __exit__(self, failed: type[BaseException] | None, *exc: object) -> None:
        try:
            if failed is not None:
                with contextlib.suppress(StorageError, BankFormatError):  # the error that got us here matters more
                    self.discard_finalize()
        finally:
            self.close()


def _shard_name(batch: int) -> str:
    return f"{batch:08d}.npz"


def _changes(old: dict[str, Any], new: dict[str, Any], shown: int = 6) -> str:
    """What differs between the state (fingerprint and description) of a build made before and `new`'s, the
    first `shown` differences with both values; empty when they are the same build (see the module docstring)."""
    if old.get("fingerprint") == new["fingerprint"]:
        return ""
    description = json.loads(json.dumps(new["description"]))  # as stored: lists, not tuples
    found = _differences(_paths_as(old.get("description"), description), description)
    return "; ".join(found[:shown]) + (f"; and {len(found) - shown} more" if len(found) > shown else "")


def _resolved(path: Any) -> str | None:
    """`path` resolved from the working directory (None when it is not a path)."""
    try:
        return str(Path(path).resolve()) if isinstance(path, str) else None
    except (OSError, ValueError):
        return None


def _paths_as(old: Any, new: dict[str, Any]) -> dict[str, Any]:
    """`old` (a description an earlier build stored) with each path (the inputs, the detector's file) that
    resolves here to `new`'s replaced by `new`'s spelling: earlier versions stored paths as typed."""
    if not isinstance(old, dict):
        return {}
    old = dict(old)
    inputs, now = old.get("inputs"), new.get("inputs")
    if isinstance(inputs, list) and isinstance(now, list) and len(inputs) == len(now) and all(
            _resolved(a) == b for a, b in zip(inputs, now)):
        old["inputs"] = now
    detector, now_detector = old.get("detector"), new.get("detector")
    if isinstance(detector, dict) and isinstance(now_detector, dict):
        old["detector"] = {k: now_detector[k] if k in ("path", "weights") and k in now_detector and isinstance(v, str)
                           and _resolved(v) == _resolved(now_detector[k]) else v for k, v in detector.items()}
    return old


_MISSING = object()  # a key one description lacks


def _shown(value: Any) -> str:
    """`value` for a message: its repr, cut to 120 characters; for a key not recorded, the words saying so (it is
    an option at its default that is recorded only when set, or names that are the model's own)."""
    if value is _MISSING:
        return "not recorded: the default"
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of what differs between two build descriptions, each with both values."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        else:
            found.append(f"{prefix}{key} ({_shown(a)} before, {_shown(b)} now)")
    return found
