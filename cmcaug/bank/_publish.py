"""How a bank folder is written: one writer at a time (`bank_lock`), a new bank swapped in whole (`publish`).

Lock. Every writer of a bank folder (a build, from start to end; `write_bank`) holds an exclusive
`flock` on BANK/.lock. A second writer does not wait: it gets `BankLockedError` naming the holder (pid,
host, start time and what it runs), which the holder wrote into the file. The kernel drops a lock when
its holder exits, even by SIGKILL, so a file left behind never blocks anyone. The holder deletes the file
when done, still holding the lock; a process that locked a file just deleted checks that the path still
names it, and locks the new one otherwise. (Over NFS, Linux maps flock to NFS locks; other network file
systems may not lock at all.)

Publish. A new bank is first staged whole in a folder inside BANK (`.build/staged/` for a build,
`.staging/` for `write_bank`): its data files, each flushed to disk, then its manifest.json, so a staging
folder that holds a manifest is complete. `publish` then

  1. deletes BANK/manifest.json: the old bank is unpublished (opening it now fails: "missing manifest");
  2. renames the staged data files over the old ones;
  3. renames the staged manifest.json into BANK: the new bank is published.

Each rename is atomic and the folder is flushed to disk between the steps, so their order survives a
power cut. Until step 1 the old bank is untouched, byte for byte: a writer that fails or is killed before
it (bad input, a full disk, SIGKILL) leaves the old bank as it was, readable. From step 1 on, the staged
bank is complete, so a writer killed during steps 1-3 is finished by the next build of that folder
(`finish_publish`, run by --resume and --overwrite): a publish only ever moves forward. Steps 1-3 only
rename and delete, so they need no free space. The bank format (version 1: fixed file names in BANK)
is unchanged. A reader that already has the old files open keeps reading them (a rename does not touch
an open file). Only a reader that reads the old manifest just before step 1 and opens the data files
after step 2 could pair them wrongly: `PatchBank.open(validate=True)` refuses that (checksums), and a
reader that reads the manifest again once its files are open, and finds the same bytes, never pairs them.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator

from ..errors import BankFormatError, BankLockedError
from . import format as fmt
from ._folder import Folder, reported

LOCK = ".lock"


@contextlib.contextmanager
def bank_lock(bank: Folder, purpose: str) -> Iterator[None]:
    """Hold BANK/.lock for the block; `BankLockedError` when another process holds it. `purpose` goes into
    the file, for that process's message ("cmcaug build-bank", "write_bank")."""
    fd = _lock_file(bank, purpose)
    try:
        yield
    finally:
        try:
            bank.remove(LOCK)  # still holding it: whoever locks this file next sees it gone and retries
        finally:
            os.close(fd)


def _lock_file(bank: Folder, purpose: str) -> int:
    """Open and lock BANK/.lock, write who holds it into it; return its descriptor."""
    path = bank.path / LOCK
    while True:
        with reported(path, "lock"):
            fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=bank.fd)
            try:
                if _locked_at_path(bank, fd):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                                              "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}).encode(), 0)
                    return fd
            except BaseException:
                os.close(fd)
                raise
        os.close(fd)  # its holder deleted that file meanwhile: lock the one at the path now


def _locked_at_path(bank: Folder, fd: int) -> bool:
    """Lock the open file `fd`; False when it is no longer BANK/.lock (its holder deleted it as it finished)."""
    found = os.fstat(fd)
    if found.st_nlink == 0:
        return False
    if not stat.S_ISREG(found.st_mode) or found.st_nlink > 1:  # never write into a hard link's other names
        raise BankFormatError(f"{bank.path / LOCK} is not a plain file of its own (a FIFO, device or hard link); remove it "
                              "and run again")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BankLockedError(f"{bank.path} is being written by another process ({_holder(fd)}); wait for it to finish "
                              "(or stop it), then run again") from None
    try:
        now = os.stat(LOCK, dir_fd=bank.fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (found.st_dev, found.st_ino)


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it into the file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"{info['purpose']}, pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "it has not written its name yet"


def publish(staged: Folder, bank: Folder, step: Callable[[str], None] = lambda _: None) -> None:
    """Swap the complete bank in `staged` into `bank`: steps 1-3 of the module docstring. Data files missing
    from `staged` were moved by the publish this call finishes. `step` is called after steps 1 and 2 with
    "unpublished" and "moved" (the build's crash tests stop there)."""
    if staged.kind(fmt.MANIFEST) != "file":
        raise BankFormatError(f"{staged.path}: no {fmt.MANIFEST}, so the bank staged there is incomplete and cannot be published")
    bank.remove(fmt.MANIFEST)
    bank.fsync()
    step("unpublished")
    for name in fmt.DATA_FILES:
        if staged.kind(name) is not None:
            staged.move(name, bank)
    bank.fsync()
    step("moved")
    staged.move(fmt.MANIFEST, bank)
    bank.fsync()


def finish_publish(staged: Folder, bank: Folder) -> bool:
    """Finish a publish that was cut short (its step 1 done: `bank` has no manifest, `staged` a complete bank);
    True when there was one."""
    if bank.kind(fmt.MANIFEST) is not None or staged.kind(fmt.MANIFEST) != "file":
        return False
    publish(staged, bank)
    return True
