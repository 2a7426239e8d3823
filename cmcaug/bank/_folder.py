"""`Folder`: a directory opened once, never through a symbolic link, and used only by names inside it.

Everything a build or `write_bank` reads or writes in a bank folder goes through here, so nothing they
write can land outside that folder, whatever was planted in it:

- a subfolder is opened with O_DIRECTORY | O_NOFOLLOW relative to its parent's descriptor, and every file
  by its name relative to its folder's descriptor: a link planted as `.build/` (or swapped in while a build
  runs) is refused, never followed;
- a file is made new with O_CREAT | O_EXCL | O_NOFOLLOW, so it is never a link or someone else's file, and
  a file is replaced only by renaming a new one over its name (which replaces a link, never its target);
- files are read with O_NOFOLLOW | O_NONBLOCK and must be plain files, so a planted link cannot pull
  another file into a bank, nor a planted FIFO hang a build;
- an `OSError` leaves as `StorageError` naming the file (its `__cause__` keeps the errno), a link or a
  FIFO as `BankFormatError`.

Only the bank folder itself is opened by its path (following a link there): it is the path the user chose.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import BankFormatError, CMCAugError, StorageError

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "folder", stat.S_IFLNK: "link"}


def not_plain(path: Path, kind: str) -> BankFormatError:
    """The error for an entry of a bank folder that is a link (or a FIFO, socket, device) where cmcaug expects a file or folder."""
    what = "a symbolic link" if kind == "link" else "not a plain file or folder"
    return BankFormatError(f"{path} is {what}; cmcaug never reads or writes a bank through one: remove it and run again")


@contextlib.contextmanager
def reported(path: Path, doing: str) -> Iterator[None]:
    """Turn an `OSError` raised in the block into `StorageError` ("cannot write PATH: No space left on device")."""
    try:
        yield
    except CMCAugError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise not_plain(path, "link") from exc
        raise StorageError(f"cannot {doing} {path}: {exc.strerror or exc}") from exc


class Folder:
    """An open directory (see the module docstring); use it in a `with` block, or `close` it."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path

    @classmethod
    def open(cls, path: Path, create: bool = False) -> Folder:
        """The folder at `path` (made, with its parents, when `create`)."""
        with reported(path, "open"):
            if create:
                path.mkdir(parents=True, exist_ok=True)
            return cls(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), path)

    def folder(self, name: str, create: bool = False) -> Folder:
        """The subfolder `name` (made when `create` and missing); `BankFormatError` when it is a link or a file."""
        path = self.path / name
        with reported(path, "open"):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o777, dir_fd=self.fd)
            try:
                return Folder(os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=self.fd), path)
            except NotADirectoryError as exc:
                kind = self.kind(name)
                if kind == "file":
                    raise BankFormatError(f"{path} is a file where a folder belongs; remove it and run again") from exc
                raise not_plain(path, kind or "other") from exc

    def kind(self, name: str) -> str | None:
        """"file", "folder", "link" or "other" (FIFO, socket, device) for entry `name`; None when there is none."""
        with reported(self.path / name, "read"):
            try:
                mode = os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                return None
        return _KINDS.get(stat.S_IFMT(mode), "other")

    def names(self) -> list[str]:
        with reported(self.path, "read"):
            return sorted(os.listdir(self.fd))

    def odd_entries(self) -> Iterator[tuple[Path, str]]:
        """(path, kind) of every link, FIFO, socket or device in this folder and its subfolders, never following a link."""
        for name in self.names():
            kind = self.kind(name)
            if kind == "folder":
                with self.folder(name) as sub:
                    yield from sub.odd_entries()
            elif kind not in ("file", None):  # None: deleted since it was listed
                yield self.path / name, kind

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[BinaryIO]:
        """A new file `name` (replacing one there, or a link: the link itself) open for writing and reading
        back; flushed to disk at the end of the block, deleted again when the block fails."""
        with reported(self.path / name, "write"):
            self.remove(name)
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644, dir_fd=self.fd)
            try:
                with os.fdopen(fd, "w+b") as file:
                    yield file
                    file.flush()
                    os.fsync(file.fileno())
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.fd)  # free the space a failed write took
                raise

    def write(self, name: str, data: bytes) -> None:
        """Replace file `name` by `data` atomically: a new temporary file, flushed, renamed over the name."""
        temp = f".{name}.tmp"
        with self.writing(temp) as file:
            file.write(data)
        self.move(temp, self, name)

    def reading(self, name: str) -> BinaryIO:
        """The plain file `name`, open for reading."""
        path = self.path / name
        with reported(path, "read"):
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW, dir_fd=self.fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise not_plain(path, "other")
            return os.fdopen(fd, "rb")

    def move(self, name: str, dest: Folder, dest_name: str | None = None) -> None:
        """Rename entry `name` to `dest_name` (default: the same name) in `dest`, atomically, replacing what is there."""
        with reported(dest.path / (dest_name or name), "write"):
            os.replace(name, dest_name or name, src_dir_fd=self.fd, dst_dir_fd=dest.fd)

    def remove(self, name: str) -> None:
        """Delete entry `name` if there is one: a file, a link (never its target) or a folder with all it holds."""
        with reported(self.path / name, "remove"):
            kind = self.kind(name)
            if kind == "folder":
                with self.folder(name) as sub:
                    for entry in sub.names():
                        sub.remove(entry)
                os.rmdir(name, dir_fd=self.fd)
            elif kind is not None:
                os.unlink(name, dir_fd=self.fd)

    def fsync(self) -> None:
        """Flush this folder's entries to disk, so renames in it happen in order even across a power cut."""
        with reported(self.path, "write"):
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
