"""The patch bank's on-disk format (version 1): file names, schemas, and the checks both sides share.

The writer (`writer.py`) and the reader (`reader.py`) import everything about the layout from here,
so the two cannot drift apart. See DESIGN.md "Patch bank on disk":

    manifest.json     format, version, N, P, d, index spec, provenance, stats, sha256 + size of each file
    concepts.parquet  concept_id, name, synonyms, offset, count  (one row per vocabulary concept)
    patches.parquet   concept_id, image, box, score  (row = patch id = FAISS id, sorted by concept)
    pixels.npy        uint8 [N, P, P, 3]
    embeddings.npy    float16 [N, d], L2-normalized
    index.faiss       FAISS inner-product index over the embeddings
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import BankFormatError, InputError
from .index import check_spec

FORMAT = "cmcaug-bank"
VERSION = 1

MANIFEST = "manifest.json"
CONCEPTS = "concepts.parquet"
PATCHES = "patches.parquet"
PIXELS = "pixels.npy"
EMBEDDINGS = "embeddings.npy"
INDEX = "index.faiss"
DATA_FILES = (CONCEPTS, PATCHES, PIXELS, EMBEDDINGS, INDEX)

PIXEL_DTYPE = np.dtype(np.uint8)
EMBEDDING_DTYPE = np.dtype(np.float16)

CONCEPTS_SCHEMA = pa.schema([
    ("concept_id", pa.int32()),
    ("name", pa.string()),
    ("synonyms", pa.list_(pa.string())),
    ("offset", pa.int64()),
    ("count", pa.int64()),
])
PATCHES_SCHEMA = pa.schema([
    ("concept_id", pa.int32()),
    ("image", pa.string()),
    ("box", pa.list_(pa.float32(), 4)),
    ("score", pa.float32()),
])

# Fixed writer options: the bytes of a parquet file are then a pure function of its table.
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "row_group_size": 1 << 20,
    "use_dictionary": True,
    "write_statistics": True,
    "data_page_version": "1.0",
}

_MANIFEST_FIELDS = {"num_patches": int, "patch_size": int, "embedding_dim": int, "index": dict, "files": dict}


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def manifest_json(manifest: dict[str, Any]) -> str:
    """The one canonical text of a manifest (sorted keys, fixed indent), so equal banks have equal bytes."""
    return json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n"


def check_manifest(manifest: Any, path: Path) -> None:
    """Raise `BankFormatError` unless `manifest` is a version-1 cmcaug bank manifest with sane fields."""
    if not isinstance(manifest, dict):
        raise BankFormatError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise BankFormatError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}; this is not a cmcaug patch bank")
    version = manifest.get("version")
    if version != VERSION:
        hint = "upgrade cmcaug to read it" if isinstance(version, int) and version > VERSION else "rebuild it with cmcaug build-bank"
        raise BankFormatError(f"{path}: bank format version {version!r}, this cmcaug reads version {VERSION}: {hint}")
    for key, kind in _MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BankFormatError(f"{path}: field {key!r} should be a JSON {kind.__name__}, found {value!r}")
    if manifest["num_patches"] < 0 or manifest["patch_size"] < 1 or manifest["embedding_dim"] < 1:
        raise BankFormatError(
            f"{path}: expected num_patches >= 0, patch_size >= 1, embedding_dim >= 1, found "
            f"{manifest['num_patches']}, {manifest['patch_size']}, {manifest['embedding_dim']}"
        )
    try:
        check_spec(manifest["index"])
    except InputError as exc:
        raise BankFormatError(f"{path}: field 'index': {exc}; rebuild the bank") from exc
    unknown = sorted(set(manifest["files"]) - set(DATA_FILES))
    if unknown:
        raise BankFormatError(f"{path}: files lists {unknown}, which are not files of a bank (expected {list(DATA_FILES)})")
    for name in DATA_FILES:
        entry = manifest["files"].get(name)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _is_int(entry.get("bytes"))):
            raise BankFormatError(f"{path}: files[{name!r}] should be {{'sha256': hex, 'bytes': int}}, found {entry!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def open_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Memory-map a `.npy` file after checking its header (dtype, C order, shape) and its exact size.

    The header is read first, so a pickled (object) array, a wrong dtype or a truncated file is refused
    with a message rather than a numpy/mmap error.
    """
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            found_shape, fortran, found_dtype = read_header(f)
            data_offset = f.tell()
    except (OSError, ValueError) as exc:
        raise BankFormatError(f"{path}: not a readable .npy file ({exc}); rebuild the bank") from exc
    if found_dtype.hasobject:
        raise BankFormatError(f"{path}: holds Python objects (pickle), which cmcaug never loads; rebuild the bank")
    if found_dtype != dtype or fortran:
        raise BankFormatError(f"{path}: expected a C-ordered {dtype} array, found {found_dtype}{' (Fortran order)' if fortran else ''}")
    if tuple(found_shape) != shape:
        raise BankFormatError(f"{path}: expected shape {shape} (from {MANIFEST}), found {tuple(found_shape)}")
    expected = data_offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        state = "truncated" if actual < expected else "has trailing bytes"
        raise BankFormatError(f"{path}: {state}: {actual} bytes, expected {expected} for shape {shape}; rebuild the bank")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def gather_rows(array: np.ndarray, ids: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """`array[ids]` (as `dtype`) for any shape of ids, reading a memmap in ascending row order: sequential
    reads for the disk, whether a reader samples patches or the writer sorts a bank by concept."""
    flat = ids.reshape(-1)
    ascending = np.argsort(flat, kind="stable")
    out = np.empty((flat.size, *array.shape[1:]), dtype=dtype or array.dtype)
    out[ascending] = array[flat[ascending]]
    return out.reshape(*ids.shape, *array.shape[1:])
