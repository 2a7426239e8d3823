"""One small exception hierarchy, so callers can catch cmcaug's problems apart from their own.

Messages name the file or argument, what was expected, what was found, and what to do.
"""
from __future__ import annotations


class CMCAugError(Exception):
    """Base class of every error cmcaug raises on purpose."""


class InputError(CMCAugError, ValueError):
    """A bad argument or input file: wrong shape, dtype, device, path, option or content."""


class BankFormatError(CMCAugError):
    """A patch bank on disk is malformed, incomplete or of an unknown format; the message names the file."""


class MissingDependencyError(CMCAugError, ImportError):
    """An optional heavy dependency (spaCy, ultralytics, FAISS, Ray, ...) is needed but not installed."""


class BankLockedError(CMCAugError):
    """Another process is writing the same bank folder; the message names it (pid, host, start time)."""


class StorageError(CMCAugError, OSError):
    """The file system refused a write (disk full, quota, file too large, permissions, I/O error); the
    message names the file and says what was kept, and the original `OSError` is its `__cause__`."""
