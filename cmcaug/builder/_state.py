"""A bank build's resumable state on disk: `BANK/.build/` with `state.json` and one shard file a batch.

    BANK/.build/state.json          the fingerprint (sha256) and description of the inputs and options
    BANK/.build/shards/NNNNNNNN.npz one finished batch: its patch rows, pixels, embeddings and stats

A shard is written to a temporary name and renamed into place, so a shard file exists only when its
batch is complete; `state.json` pins the inputs and options. A build killed at any point (SIGKILL
included) and re-run with `resume=True` redoes only the missing batches, then finalizes from scratch;
`write_bank` publishes the bank by writing `manifest.json` last. `.build/` is renamed away before it is
deleted, so it is either whole or gone. `CRASH_ENV` kills the process at a named point, so tests can
check each of these steps.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..bank import format as fmt
from ..errors import BankFormatError, InputError

BUILD_DIR = ".build"
CRASH_ENV = "CMCAUG_BUILD_CRASH_AT"  # test hook: "shard:N", "finalize:before", "finalize:written", "finalize:renamed"
_TRASH = ".build.trash"
_STATE = "state.json"
_BANK_NAMES = {fmt.MANIFEST, *fmt.DATA_FILES, *(f".{n}.tmp" for n in (fmt.MANIFEST, *fmt.DATA_FILES)), BUILD_DIR, _TRASH}


def crash_point(name: str) -> None:
    """Kill this process here when `CRASH_ENV` names this point (the resume tests' hook)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def digest(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON: the fingerprint that decides whether a build can be resumed."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- the output directory --------------------------------------------------------------------------
def _clear(out: Path, keep: str | None = None) -> None:
    """Delete every entry of `out` but `keep`; `.build/` goes last, so a cleared-half folder stays recognisable."""
    for entry in sorted(out.iterdir(), key=lambda p: p.name == BUILD_DIR):
        if entry.name != keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def open_build(out: Path, state: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Make `out/.build/` ready for `state`; return the finished bank's manifest when resuming one."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory; pass a directory path for the bank")
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / _TRASH, ignore_errors=True)
    build, manifest = out / BUILD_DIR, out / fmt.MANIFEST
    entries = sorted(p.name for p in out.iterdir())
    foreign = [e for e in entries if e not in _BANK_NAMES]
    if foreign:
        raise InputError(f"output {out} holds files that are not part of a cmcaug bank ({', '.join(foreign[:3])}); "
                         "choose a new or empty directory")
    if overwrite:
        _clear(out)
    elif resume and build.is_dir():
        old = _read_state(build)
        if old is None:
            shutil.rmtree(build)  # killed before its state was written: nothing to keep
        elif old["fingerprint"] != state["fingerprint"]:
            changed = _differences(old["description"], state["description"])
            raise InputError(f"the unfinished build in {build} was started with other inputs or options (differs in: "
                             f"{', '.join(changed)}); rerun with the same ones to resume, or pass --overwrite to start over")
    elif resume and manifest.is_file():
        try:
            finished = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise BankFormatError(f"{manifest}: unreadable manifest ({exc}); pass --overwrite to rebuild the bank") from exc
        if finished.get("provenance", {}).get("fingerprint") == state["fingerprint"]:
            return finished
        raise InputError(f"{out} is a finished bank built from other inputs or options; pass --overwrite to rebuild it")
    elif resume:
        _clear(out)  # leftovers of a bank being deleted: start over
    elif entries:
        what = ("an unfinished build: pass --resume to continue it or --overwrite to start over" if build.is_dir()
                else "a bank: pass --overwrite to replace it, or --resume to keep it if it was built from the same inputs and options")
        raise InputError(f"output '{out}' already holds {what}")
    (build / "shards").mkdir(parents=True, exist_ok=True)
    for stale in (build / "shards").glob("*.tmp"):
        stale.unlink()
    if _read_state(build) is None:
        _write_atomic(build / _STATE, json.dumps(state, sort_keys=True, indent=1).encode())
    return None


def _read_state(build: Path) -> dict[str, Any] | None:
    try:
        return json.loads((build / _STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def clear_leftovers(out: Path) -> None:
    """Remove what a killed `write_bank` left in `out` (everything but `.build/`) before writing the bank again."""
    crash_point("finalize:before")
    _clear(out, keep=BUILD_DIR)


def remove_build(out: Path) -> None:
    """Delete `out/.build/` once the bank is published: renamed away first, so it is either whole or gone."""
    crash_point("finalize:written")
    os.replace(out / BUILD_DIR, out / _TRASH)
    crash_point("finalize:renamed")
    shutil.rmtree(out / _TRASH)


# -- shards ----------------------------------------------------------------------------------------
def shard_path(build: Path, batch: int) -> Path:
    return build / "shards" / f"{batch:08d}.npz"


def missing_batches(build: Path, n_batches: int) -> list[int]:
    """The batches of 0 .. n_batches - 1 without a finished shard: the work left to do."""
    return [b for b in range(n_batches) if not shard_path(build, b).is_file()]


def encode_shard(arrays: dict[str, np.ndarray], stats: dict[str, Any]) -> bytes:
    """One batch's shard bytes: its arrays and its stats (as JSON) in one .npz, no pickle."""
    shard = io.BytesIO()
    np.savez(shard, stats=np.frombuffer(json.dumps(stats, sort_keys=True).encode(), np.uint8), **arrays)
    return shard.getvalue()


def save_shard(build: Path, batch: int, shard: bytes) -> None:
    _write_atomic(shard_path(build, batch), shard)


def load_shard(build: Path, batch: int, names: Sequence[str]) -> dict[str, Any]:
    """The arrays `names` and the stats of batch `batch`'s shard."""
    path = shard_path(build, batch)
    try:
        with np.load(path, allow_pickle=False) as z:
            out: dict[str, Any] = {n: z[n] for n in names}
            out["stats"] = json.loads(bytes(z["stats"]).decode())
            return out
    except (OSError, ValueError, KeyError) as exc:
        raise BankFormatError(f"{path}: unreadable build shard ({exc}); pass --overwrite to start the build over") from exc


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of what differs between two build descriptions, with both values where they are plain."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
            found.append(f"{prefix}{key}")
        else:
            found.append(f"{prefix}{key} ({a!r} before, {b!r} now)")
    return found
