"""Reading an uncompressed tar shard as far as it is whole.

img2dataset writes webdataset shards as plain tar files; a download or copy that stopped early leaves a
shard cut inside a member's data or header, and a disk error can leave a header that is not one.
`complete_members` returns every member before such damage (whose bytes are all there) and says where
the damage is, instead of refusing the whole shard; a compressed shard is refused by name.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError

_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def complete_members(f: BinaryIO, path: str | Path) -> tuple[list[tarfile.TarInfo], str | None]:
    """The members of the tar file `f` (named `path` in messages) whose bytes are all there, in order, and
    what ends it early (None: nothing; a shard that ends right after a member lost nothing). `InputError`
    for a gzip, bzip2, xz or zstd file."""
    head = f.read(6)
    kind = next((name for magic, name in _COMPRESSED.items() if head.startswith(magic)), None)
    if kind is not None:
        raise InputError(f"{path} is {kind}-compressed: cannot read it as an uncompressed tar shard; "
                         "img2dataset writes plain .tar files (decompress it first)")
    f.seek(0)
    size = os.fstat(f.fileno()).st_size
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            while (member := tar.next()) is not None:
                members.append(member)
            f.seek(tar.offset)  # tarfile stops quietly at a header it cannot read: only zeros mean the end
            damage = f"an unreadable tar header at byte {tar.offset:,}" if f.read(tarfile.BLOCKSIZE).strip(b"\0") else None
    except tarfile.TarError as exc:
        damage = f"{exc} after byte {members[-1].offset_data:,}" if members else str(exc)
    complete = [m for m in members if m.offset_data + m.size <= size]
    if len(complete) < len(members):
        damage = f"member {members[-1].name!r} cut off at byte {size:,}"
    return complete, damage
