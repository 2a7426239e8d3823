"""Small random patch banks for the bank, writer, index and inspect tests (real files, real FAISS), the
bank-folder digest that the build tests compare, a batch runner that dies like a killed or failed build,
and a full disk at one chosen write."""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cmcaug.bank import format as fmt
from cmcaug.bank._folder import Folder
from cmcaug.bank.writer import write_bank
from cmcaug.concepts import ConceptVocab

VOCAB = ConceptVocab({"dog": ["puppy", "hound"], "cat": ["kitten"], "hot dog": [], "kite": [], "teddy bear": ["teddy"]})
EMPTY_CONCEPT = "kite"  # random_inputs never draws it


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_inputs(n: int = 300, patch_size: int = 6, dim: int = 12, seed: int = 0) -> dict[str, Any]:
    """`write_bank` keyword arguments for `n` random patches of every concept but EMPTY_CONCEPT, unsorted,
    with repeated images so the (concept, image, box) sort has ties to break."""
    rng = np.random.default_rng(seed)
    concepts = np.array([i for i, name in enumerate(VOCAB.names) if name != EMPTY_CONCEPT], dtype=np.int32)
    patches = pa.table({
        "score": rng.random(n).astype(np.float32),
        "image": [f"images/{i:03d}.jpg" for i in rng.integers(0, max(1, n // 4), n)],
        "concept_id": rng.choice(concepts, n).astype(np.int32),
        "box": pa.array(list(rng.integers(0, 5, (n, 4)).astype(np.float32)), pa.list_(pa.float32(), 4)),
    })
    return {
        "vocab": VOCAB,
        "patches": patches,
        "pixels": rng.integers(0, 256, (n, patch_size, patch_size, 3), dtype=np.uint8),
        "embeddings": unit_rows(rng, n, dim),
        "provenance": {"detector": "annotations.json", "vocabulary": "test"},
        "stats": {"images_read": n // 4, "boxes_kept": n},
    }


def expected_order(patches: pa.Table) -> np.ndarray:
    """The bank's row order, computed the slow obvious way: sort by (concept_id, image, box, score)."""
    rows = patches.to_pylist()
    keys = [(r["concept_id"], r["image"], tuple(r["box"]), r["score"]) for r in rows]
    return np.array(sorted(range(len(rows)), key=keys.__getitem__), dtype=np.int64)


def write_random_bank(path: Path, **kwargs: Any) -> dict[str, Any]:
    """Write a random bank to `path`; returns the inputs it was written from."""
    inputs = random_inputs(**kwargs)
    write_bank(path, **inputs)
    return inputs


def rehash(bank: Path) -> None:
    """Make manifest.json vouch for the files as they are now (to reach the checks behind the checksums)."""
    manifest = json.loads((bank / fmt.MANIFEST).read_text())
    for name in fmt.DATA_FILES:
        manifest["files"][name] = {"sha256": fmt.sha256_file(bank / name), "bytes": (bank / name).stat().st_size}
    (bank / fmt.MANIFEST).write_text(fmt.manifest_json(manifest))


def file_hashes(bank: Path, hidden: bool = True) -> dict[str, str]:
    """sha256 of every entry of a bank folder, hidden ones included unless `hidden=False` (then: the bank's
    own files only, not .build/ or .lock); a folder (a leftover .build/) shows as "dir"."""
    return {p.name: fmt.sha256_file(p) if p.is_file() else "dir" for p in sorted(bank.iterdir()) if hidden or p.name[0] != "."}


def stop_after(n: int, runner, error: BaseException | type[BaseException] = KeyboardInterrupt):
    """A build batch runner that hands over `n` shards of `runner`, then raises `error` (by default it dies
    like a killed build)."""
    def run(job, batches):
        results = runner(job, batches)
        try:
            for _ in range(n):
                yield next(results)
        finally:
            results.close()
        raise error

    return run


class FullDisk:
    """A file on a full disk: every write fails with ENOSPC."""

    def __init__(self, file) -> None:
        self._file = file

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def fill_disk_at(monkeypatch, folder: str, name: str) -> None:
    """Make the write of file `name` in a folder named `folder` (".build", "shards", "staged", ".staging")
    fail as on a full disk; `monkeypatch.undo()` frees the space again."""
    writing = Folder.writing

    @contextlib.contextmanager
    def full_at_write(self: Folder, file_name: str):
        with writing(self, file_name) as file:
            yield FullDisk(file) if (self.path.name, file_name) == (folder, name) else file

    monkeypatch.setattr(Folder, "writing", full_at_write)
