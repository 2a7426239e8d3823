"""`write_bank`: finalize a patch bank on disk from unsorted rows (the last step of `build_bank`).

The writer sorts patches by (concept_id, image, box, score) with a stable sort, so each concept's patches
are one contiguous id range and the output does not depend on the order rows arrived in (e.g. on how
many build workers there were). `BankContents` checks the rows and stages the bank's files in a folder of
their own, each flushed to disk, manifest.json last; `cmcaug.bank._publish.publish` then swaps them into
the bank folder, so a reader never sees a half-written bank and a failed write leaves the previous bank
as it was. The bytes of every file are a pure function of the inputs (no timestamps, no temporary
paths). Every file is written with `file.write` through a descriptor (`cmcaug.bank._folder`), never
through a memory map, so a full disk is an `OSError` (`StorageError`), not a SIGBUS; big inputs
(np.memmap) are streamed in chunks of about 64 MiB rather than loaded whole.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from .._version import __version__
from ..concepts import ConceptVocab
from ..errors import InputError
from . import format as fmt
from ._folder import Folder
from ._publish import bank_lock, publish
from .index import build_index, plan_index, save_index

log = logging.getLogger(__name__)

STAGING = ".staging"  # where write_bank stages a bank inside its folder
_CHUNK_BYTES = 64 << 20
_NORM_TOLERANCE = 1e-2


def _sorted_patches(patches: pa.Table, num_concepts: int) -> tuple[pa.Table, np.ndarray]:
    """Check and cast `patches` to the bank schema; return it sorted, and the sorting permutation."""
    if not isinstance(patches, pa.Table):
        raise InputError(f"patches must be a pyarrow.Table, got {type(patches).__name__}")
    missing = [f.name for f in fmt.PATCHES_SCHEMA if f.name not in patches.column_names]
    if missing:
        raise InputError(f"patches table lacks columns {missing}; expected {fmt.PATCHES_SCHEMA.names}, found {patches.column_names}")
    columns = {}
    for field in fmt.PATCHES_SCHEMA:
        column = patches.column(field.name)
        if column.null_count:
            raise InputError(f"patches column {field.name!r} has {column.null_count} null values")
        try:
            columns[field.name] = column.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InputError(f"patches column {field.name!r} is {column.type}, expected {field.type} ({exc})") from exc
    table = pa.table(columns, schema=fmt.PATCHES_SCHEMA)
    ids = table.column("concept_id").to_numpy()
    if ids.size and (ids.min() < 0 or ids.max() >= num_concepts):
        raise InputError(f"patches concept_id must lie in [0, {num_concepts}) (the vocabulary's ids), found [{ids.min()}, {ids.max()}]")
    boxes = table.column("box").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    scores = table.column("score").to_numpy()
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise InputError("patches box and score values must be finite; found NaN or infinity")
    keys = pa.table({
        "concept_id": table.column("concept_id"), "image": table.column("image"),
        **{f"box{i}": boxes[:, i] for i in range(4)}, "score": table.column("score"),
    })
    order = pc.sort_indices(keys, sort_keys=[(name, "ascending") for name in keys.column_names]).to_numpy()
    return table.take(order).combine_chunks(), order  # one chunk: parquet pages must not depend on input chunking


def _check_arrays(pixels: np.ndarray, embeddings: np.ndarray, num_patches: int) -> None:
    if pixels.ndim != 4 or pixels.shape[3] != 3 or pixels.shape[1] != pixels.shape[2] or pixels.dtype != np.uint8:
        raise InputError(f"pixels must be uint8 [N, P, P, 3], got {pixels.dtype} {tuple(pixels.shape)}")
    if pixels.shape[1] < 1:
        raise InputError(f"pixels must have a patch size P >= 1, got shape {tuple(pixels.shape)}")
    if embeddings.ndim != 2 or embeddings.shape[1] < 1 or embeddings.dtype not in (np.float16, np.float32):
        raise InputError(f"embeddings must be float16/float32 [N, d] with d >= 1, got {embeddings.dtype} {tuple(embeddings.shape)}")
    if not pixels.shape[0] == embeddings.shape[0] == num_patches:
        raise InputError(
            f"patches, pixels and embeddings must have one row per patch, "
            f"found {num_patches}, {pixels.shape[0]} and {embeddings.shape[0]} rows"
        )


def _gathered(source: np.ndarray, order: np.ndarray, dtype: np.dtype, bar: tqdm) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (rows of `order`, source rows in that order as `dtype`), ~64 MiB at a time; reads ascend."""
    row_bytes = max(1, int(np.prod(source.shape[1:])) * source.dtype.itemsize)
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, len(order), step):
        rows = order[start : start + step]
        bar.update(len(rows))
        yield rows, fmt.gather_rows(source, rows, dtype)


def write_npy(file: BinaryIO, shape: tuple[int, ...], dtype: np.dtype, blocks: Iterable[np.ndarray]) -> str:
    """Write a `.npy` file block by block (header first), never holding the whole array; return its sha256,
    hashed on the way so the manifest need not read the bank's largest files back."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                                  "shape": shape})
    digest = hashlib.sha256(header.getvalue())
    file.write(header.getvalue())
    for block in blocks:
        data = np.ascontiguousarray(block, dtype).data
        digest.update(data)
        file.write(data)
    return digest.hexdigest()


def map_npy(file: BinaryIO) -> np.ndarray:
    """The `.npy` file that `write_npy` wrote into `file`, memory-mapped read-only through that same open file."""
    file.flush()
    file.seek(0)
    np.lib.format.read_magic(file)
    shape, _, dtype = np.lib.format.read_array_header_1_0(file)
    if not math.prod(shape):
        return np.zeros(shape, dtype)  # an empty file region cannot be mapped
    return np.memmap(file, dtype, "r", file.tell(), shape)


def _checked_embeddings(chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[np.ndarray]:
    for rows, block in chunks:
        norms = np.linalg.norm(block.astype(np.float32), axis=1)
        bad = np.flatnonzero(~(np.abs(norms - 1) <= _NORM_TOLERANCE))
        if bad.size:
            raise InputError(
                f"embeddings must be L2-normalized (finite, norm 1 +- {_NORM_TOLERANCE}); input row {rows[bad[0]]} has norm "
                f"{norms[bad[0]]:.4g} ({bad.size} such rows in this chunk); normalize them before writing the bank"
            )
        yield block


def _concepts_table(vocab: ConceptVocab, concept_ids: np.ndarray) -> pa.Table:
    counts = np.bincount(concept_ids, minlength=len(vocab)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return pa.table({
        "concept_id": np.arange(len(vocab), dtype=np.int32),
        "name": vocab.names,
        "synonyms": [list(vocab.synonyms(i)) for i in range(len(vocab))],
        "offset": offsets,
        "count": counts,
    }, schema=fmt.CONCEPTS_SCHEMA)


def _file_entry(file: BinaryIO, sha256: str | None = None) -> dict[str, Any]:
    """A manifest's record of a file just written: its sha256 (read back unless given) and size."""
    file.flush()
    if sha256 is None:
        file.seek(0)
        digest = hashlib.sha256()
        while block := file.read(1 << 22):
            digest.update(block)
        sha256 = digest.hexdigest()
    return {"sha256": sha256, "bytes": os.fstat(file.fileno()).st_size}


@dataclass(frozen=True)
class BankContents:
    """A bank's checked contents (`check`), ready to be written into a folder (`stage`)."""

    vocab: ConceptVocab
    table: pa.Table  # the patches, sorted
    order: np.ndarray  # input row of each sorted row
    pixels: np.ndarray
    embeddings: np.ndarray
    manifest: dict[str, Any]  # all but "files"

    @classmethod
    def check(cls, *, vocab: ConceptVocab, patches: pa.Table, pixels: np.ndarray, embeddings: np.ndarray,
              provenance: dict[str, Any], stats: dict[str, Any], index_kind: str | None = None) -> BankContents:
        """`write_bank`'s arguments, checked (`InputError` naming what is wrong) and sorted; nothing is written."""
        if not isinstance(vocab, ConceptVocab):
            raise InputError(f"vocab must be a ConceptVocab, got {type(vocab).__name__}")
        table, order = _sorted_patches(patches, len(vocab))
        _check_arrays(pixels, embeddings, table.num_rows)
        manifest: dict[str, Any] = {
            "format": fmt.FORMAT, "version": fmt.VERSION, "writer": f"cmcaug {__version__}",
            "num_patches": table.num_rows, "patch_size": pixels.shape[1], "embedding_dim": embeddings.shape[1],
            "embedding_dtype": str(fmt.EMBEDDING_DTYPE), "num_concepts": len(vocab),
            "sort_order": ["concept_id", "image", "box", "score"],
            "index": plan_index(table.num_rows, index_kind), "provenance": provenance, "stats": stats,
        }
        try:
            fmt.manifest_json(manifest)
        except (TypeError, ValueError) as exc:
            raise InputError(f"provenance and stats must be JSON-serializable without NaN: {exc}") from exc
        return cls(vocab, table, order, pixels, embeddings, manifest)

    def stage(self, folder: Folder, progress: bool = False) -> dict[str, Any]:
        """Write the bank's files into the empty `folder`, each flushed to disk, manifest.json last (so a
        folder holding a manifest holds a whole bank); return the manifest."""
        manifest, n, spec = dict(self.manifest), self.table.num_rows, self.manifest["index"]
        p, d = manifest["patch_size"], manifest["embedding_dim"]
        files: dict[str, dict[str, Any]] = {}
        concepts = _concepts_table(self.vocab, self.table.column("concept_id").to_numpy())
        for name, table in ((fmt.CONCEPTS, concepts), (fmt.PATCHES, self.table)):
            with folder.writing(name) as file:
                pq.write_table(table, file, **fmt.PARQUET_OPTIONS)
                files[name] = _file_entry(file)
        with tqdm(total=n, desc="bank pixels", unit="patch", disable=not progress) as bar, folder.writing(fmt.PIXELS) as file:
            blocks = (block for _, block in _gathered(self.pixels, self.order, fmt.PIXEL_DTYPE, bar))
            files[fmt.PIXELS] = _file_entry(file, write_npy(file, (n, p, p, 3), fmt.PIXEL_DTYPE, blocks))
        with tqdm(total=n, desc="bank embeddings", unit="patch", disable=not progress) as bar, \
                folder.writing(fmt.EMBEDDINGS) as file:
            blocks = _checked_embeddings(_gathered(self.embeddings, self.order, fmt.EMBEDDING_DTYPE, bar))
            files[fmt.EMBEDDINGS] = _file_entry(file, write_npy(file, (n, d), fmt.EMBEDDING_DTYPE, blocks))
            sorted_embeddings = map_npy(file)
        log.info("building a %s index over %d embeddings", spec["factory"], n)
        with folder.writing(fmt.INDEX) as file:
            save_index(build_index(sorted_embeddings, spec), file)
            files[fmt.INDEX] = _file_entry(file)
        manifest["files"] = {name: files[name] for name in fmt.DATA_FILES}
        folder.fsync()  # the data files' names reach the disk before the manifest that vouches for them
        folder.write(fmt.MANIFEST, fmt.manifest_json(manifest).encode())
        folder.fsync()
        return manifest


def write_bank(
    path: str | Path,
    *,
    vocab: ConceptVocab,
    patches: pa.Table,
    pixels: np.ndarray,
    embeddings: np.ndarray,
    provenance: dict[str, Any],
    stats: dict[str, Any],
    index_kind: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a version-1 patch bank to `path` and return its manifest.

    `patches` has columns concept_id (int32), image (string), box (fixed_size_list<float32>[4]), score
    (float32), in any row order; `pixels` uint8 [N, P, P, 3] and `embeddings` float16/float32 [N, d]
    (L2-normalized) are row-aligned with it and may be np.memmap. `provenance` and `stats` must be
    JSON-serializable; they go into the manifest as they are. `index_kind` forces "flat", "ivf" or
    "ivf-sq8" (default: chosen by size, see `cmcaug.bank.index`). An empty bank (N = 0) is valid.
    Files in `path` other than the bank's own (e.g. `.build/`) are left alone.

    The bank is staged whole in `path/.staging/`, then published over the bank already in `path` (see
    `cmcaug.bank._publish`), holding `path/.lock` throughout (`BankLockedError` if another writer holds it).
    Bad input is refused before anything is written; a write that fails (`StorageError`: a full disk) or
    is killed before the publish leaves the bank that was in `path` byte for byte.
    """
    contents = BankContents.check(vocab=vocab, patches=patches, pixels=pixels, embeddings=embeddings,
                                  provenance=provenance, stats=stats, index_kind=index_kind)
    with Folder.open(Path(path), create=True) as bank, bank_lock(bank, "write_bank"):
        bank.remove(STAGING)
        with bank.folder(STAGING, create=True) as staging:
            try:
                manifest = contents.stage(staging, progress)
            except BaseException:
                bank.remove(STAGING)  # free the space the failed write took
                raise
            publish(staging, bank)
        bank.remove(STAGING)
    n, p = manifest["num_patches"], manifest["patch_size"]
    log.info("wrote bank %s: %d patches of %dx%d, %d concepts, %s index", path, n, p, p, len(vocab), manifest["index"]["kind"])
    return manifest
