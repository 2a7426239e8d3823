"""`PatchBank`: a concept patch bank on disk, opened for sampling, pixel reads and similarity search.

Pixels and embeddings are memory-mapped, so opening is cheap whatever the bank's size and DataLoader
workers share the page cache. Patches are sorted by concept, so drawing a patch of concept c is one
uniform draw in [offset[c], offset[c] + count[c]): `sample` is vectorized and O(1) per draw. The
per-patch table (`records`) and the FAISS index (`search`) are loaded on first use.

    bank = PatchBank.open("bank/")
    ids = bank.sample([3, 3, 17], generator=torch.Generator().manual_seed(0))
    pixels = bank.pixels(ids)                      # uint8 [3, P, P, 3]

A concept with no patches cannot be drawn: `sample` refuses it by name, or with `missing="mark"` draws the
id -1 for it, which `pixels`, `embeddings` and `records` refuse as what it is.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..concepts import ConceptVocab
from ..errors import BankFormatError, InputError
from . import format as fmt
from .index import check_index_contents, open_index, search_index

log = logging.getLogger(__name__)

Generator = torch.Generator | np.random.Generator | int | None
MISSING = ("raise", "mark")  # what `sample` does with a concept that has no patches


def _as_int_array(values: Any, what: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.dtype == bool or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"{what} must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _like(template: Any, array: np.ndarray) -> Any:
    """`array` as a torch tensor when the caller passed one, else as numpy."""
    return torch.from_numpy(array) if isinstance(template, torch.Tensor) else array


def _uniform(n: int, generator: Generator) -> np.ndarray:
    """`n` float64 draws in [0, 1) from a torch generator, a numpy generator or a seed (None: fresh entropy)."""
    if isinstance(generator, torch.Generator):
        return torch.rand(n, generator=generator, dtype=torch.float64).numpy()
    if isinstance(generator, np.random.Generator):
        return generator.random(n)
    if generator is None or (isinstance(generator, (int, np.integer)) and not isinstance(generator, bool)):
        return np.random.default_rng(generator).random(n)
    raise InputError(f"generator must be a torch.Generator, numpy Generator, int seed or None, got {type(generator).__name__}")


def _checked_uniforms(uniforms: Any, n: int) -> np.ndarray:
    """`uniforms` as float64, refused unless it holds `n` values in [0, 1): a value outside would draw from a
    neighbouring concept's id range."""
    u = (uniforms.detach().cpu().numpy() if isinstance(uniforms, torch.Tensor) else np.asarray(uniforms)).astype(np.float64)
    if u.size != n:
        raise InputError(f"uniforms must hold one value per concept id ({n}), got shape {tuple(u.shape)}")
    if u.size and not ((u >= 0) & (u < 1)).all():
        raise InputError(f"uniforms must lie in [0, 1), found [{u.min()}, {u.max()}]")
    return u


class PatchBank:
    """A read-only patch bank (format version 1). Open with `PatchBank.open(path)`."""

    def __init__(self, path: Path, manifest: dict[str, Any], vocab: ConceptVocab, offsets: np.ndarray, counts: np.ndarray):
        self.path = path
        self.manifest = manifest
        self.vocab = vocab
        self._offsets = offsets
        self._counts = counts
        self._reported_empty: set[int] = set()
        self._records: pa.Table | None = None
        self._index: Any = None
        self._map_arrays()

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, validate: bool = True) -> PatchBank:
        """Open the bank in `path`, refusing a malformed one with `BankFormatError` naming the file.

        Always checked (fast, any size): manifest format/version/fields, every file present with the
        size the manifest records, npy headers (dtype, shape: N, P, d agree), concepts.parquet
        (ids 0..n-1, counts >= 0, offsets contiguous and summing to N), patches.parquet schema and
        row count, the index spec. `validate=True` also hashes every file against the manifest's sha256,
        checks that patches.parquet's concept_id column matches the offsets, and reads index.faiss: its
        type (the spec's factory, inner product), size (N) and dimension (d), its ids (0..N-1, ascending in
        every IVF list) and 64 of its vectors against embeddings.npy. This reads the whole bank (seconds
        per GB), so long-running jobs that reopen a bank they trust pass `validate=False`: such a bank
        reads and checks index.faiss the same way on its first `search`.
        """
        path = Path(path).absolute()  # pickled banks reopen by path, maybe from another working directory
        manifest_path = path / fmt.MANIFEST
        if not manifest_path.is_file():
            if not path.exists():
                why = f"the folder {path} does not exist"
            elif not path.is_dir():
                why = f"{path} is a file, not a bank folder"
            elif (path / ".build").exists():
                why = f"the build of {path} did not finish (re-run cmcaug build-bank with --resume)"
            else:
                why = f"{path} is not a patch bank"
            raise BankFormatError(f"{manifest_path}: missing: {why}")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a 5,000-digit number, deep nesting
            raise BankFormatError(f"{manifest_path}: not valid JSON ({exc}); rebuild the bank") from exc
        fmt.check_manifest(manifest, manifest_path)
        for name in fmt.DATA_FILES:
            file, expected = path / name, manifest["files"][name]
            if not file.is_file():
                raise BankFormatError(f"{file}: missing (listed in {fmt.MANIFEST}); rebuild the bank")
            size = file.stat().st_size
            if size != expected["bytes"]:
                raise BankFormatError(
                    f"{file}: {size} bytes, {fmt.MANIFEST} records {expected['bytes']}; the file was changed or truncated"
                )
            if validate and fmt.sha256_file(file) != expected["sha256"]:
                raise BankFormatError(f"{file}: sha256 checksum does not match {fmt.MANIFEST}; the file is corrupt or was changed")
        vocab, offsets, counts = _read_concepts(path / fmt.CONCEPTS, manifest["num_patches"])
        _check_patches(path / fmt.PATCHES, manifest["num_patches"], counts, read_ids=validate)
        bank = cls(path, manifest, vocab, offsets, counts)
        if validate:
            bank._faiss_index()  # read and checked now, kept for searches
        bank._check_unchanged()  # a build may have published over the folder while these files were checked
        return bank

    def _check_unchanged(self) -> None:
        """Refuse to read on when the folder's manifest is no longer the one this bank opened: a build has
        published another bank there since (the memory maps still show the old files; lazy reads by path would not)."""
        try:
            current = json.loads((self.path / fmt.MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            current = None
        if current != self.manifest:
            raise BankFormatError(f"{self.path / fmt.MANIFEST}: the bank in {self.path} changed after it was opened "
                                  "(a build published another one there); open it again")

    def _map_arrays(self) -> None:
        n, p, d = self.manifest["num_patches"], self.manifest["patch_size"], self.manifest["embedding_dim"]
        self._pixels = fmt.open_npy(self.path / fmt.PIXELS, fmt.PIXEL_DTYPE, (n, p, p, 3))
        self._embeddings = fmt.open_npy(self.path / fmt.EMBEDDINGS, fmt.EMBEDDING_DTYPE, (n, d))

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the small parts only; the memmaps are reopened by path (DataLoader workers, spawn)."""
        return {
            "path": self.path, "manifest": self.manifest, "vocab": self.vocab.to_dict(), "offsets": self._offsets, "counts": self._counts,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.manifest = state["path"], state["manifest"]
        self._check_unchanged()  # a worker maps the files now: they must still be the pickled bank's
        self.__init__(state["path"], state["manifest"], ConceptVocab(state["vocab"]), state["offsets"], state["counts"])

    def __repr__(self) -> str:
        return f"PatchBank({str(self.path)!r}: {len(self)} patches of {self.patch_size}x{self.patch_size}, {len(self.vocab)} concepts)"

    # -- shape ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.manifest["num_patches"])

    @property
    def patch_size(self) -> int:
        return int(self.manifest["patch_size"])

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def offsets(self) -> np.ndarray:
        """First patch id of each concept, int64 [num_concepts] (a copy)."""
        return self._offsets.copy()

    @property
    def counts(self) -> np.ndarray:
        """Patches per concept, int64 [num_concepts] (a copy); planners mask concepts with count 0."""
        return self._counts.copy()

    def count(self, concept: str | int) -> int:
        """Patches of a concept, by name (case-insensitive) or id."""
        return int(self._counts[self.vocab.resolve(concept)])

    # -- sampling and reads -----------------------------------------------------------------------
    def sample(self, concept_ids: Any, generator: Generator = None, *, missing: str = "raise",
               uniforms: np.ndarray | None = None) -> Any:
        """One uniformly drawn patch id per entry of `concept_ids` (any shape; list, numpy or torch).

        Returns int64 ids of the same shape, as a torch tensor for tensor input, else numpy. A concept
        with no patches has nothing to draw: `missing="raise"` (the default) raises `InputError` naming
        those concepts; `missing="mark"` draws id -1 for them (a warning logged once per concept), keeping
        positions, to be dropped (`ids[ids >= 0]`) before `pixels`. `bank.counts` tells them apart beforehand.
        Draws are reproducible for a seed or generator; None draws fresh OS entropy. Callers that key
        their own randomness (e.g. per sample) pass `uniforms` in [0, 1), one per concept id, instead.
        """
        if missing not in MISSING:
            raise InputError(f"missing must be one of {MISSING}, got {missing!r}")
        concepts = _as_int_array(concept_ids, "concept_ids")
        if concepts.size and (concepts.min() < 0 or concepts.max() >= len(self.vocab)):
            raise InputError(f"concept_ids must lie in [0, {len(self.vocab)}), found [{concepts.min()}, {concepts.max()}]")
        counts = self._counts[concepts]
        u = _uniform(concepts.size, generator) if uniforms is None else _checked_uniforms(uniforms, concepts.size)
        u = u.reshape(concepts.shape)
        ids = self._offsets[concepts] + np.minimum(np.floor(u * counts).astype(np.int64), counts - 1)
        empty = counts == 0
        if empty.any():
            ids[empty] = -1
            self._report_empty(np.unique(concepts[empty]), missing)
        return _like(concept_ids, ids)

    def _report_empty(self, concepts: np.ndarray, missing: str) -> None:
        if missing == "raise":
            names = [self.vocab.name(c) for c in concepts]
            raise InputError(f"{self.path} has no patches of {', '.join(map(repr, names))}, so nothing to draw for them: "
                             "leave them out (bank.counts says which concepts have patches), or pass missing='mark' "
                             "to draw id -1 for them")
        new = [int(c) for c in concepts if int(c) not in self._reported_empty]
        if new:
            self._reported_empty.update(new)
            log.warning("bank %s has no patches of %s; those draws return id -1", self.path, [self.vocab.name(c) for c in new])

    def _patch_ids(self, ids: Any) -> np.ndarray:
        array = _as_int_array(ids, "patch ids")
        if array.size and (array.min() < 0 or array.max() >= len(self)):
            if (array == -1).any():
                raise InputError(f"{int((array == -1).sum())} of the patch ids are -1, which marks no patch (a draw of a "
                                 "concept with no patches, sample(..., missing='mark'), or an empty search slot): "
                                 "drop them first (ids[ids >= 0])")
            raise InputError(f"patch ids must lie in [0, {len(self)}), found [{array.min()}, {array.max()}]")
        return array

    def pixels(self, ids: Any) -> torch.Tensor:
        """uint8 tensor [*ids.shape, P, P, 3] of the patches' pixels (RGB)."""
        return torch.from_numpy(fmt.gather_rows(self._pixels, self._patch_ids(ids)))

    def embeddings(self, ids: Any) -> torch.Tensor:
        """float16 tensor [*ids.shape, d] of the patches' L2-normalized embeddings."""
        return torch.from_numpy(fmt.gather_rows(self._embeddings, self._patch_ids(ids)))

    def records(self, ids: Any) -> list[dict[str, Any]]:
        """Per patch: concept (name), concept_id, image, box (x0, y0, x1, y1 in source pixels), score."""
        flat = self._patch_ids(ids).reshape(-1)
        if self._records is None:
            self._check_unchanged()
            self._records = _read_table(self.path / fmt.PATCHES, fmt.PATCHES_SCHEMA)
        rows = self._records.take(pa.array(flat)).to_pylist()
        for row in rows:
            row["concept"] = self.vocab.name(row["concept_id"])
            row["box"] = tuple(row["box"])
        return rows

    # -- search ---------------------------------------------------------------------------------
    def search(self, embeddings: Any, k: int, concept: str | int | None = None, nprobe: int | None = None) -> tuple[Any, Any]:
        """Top-`k` patches by inner product with each query: (scores float32 [Q, k'], ids int64 [Q, k']).

        `embeddings` is [Q, d] or [d] (numpy or torch; L2-normalize them for cosine similarity).
        `concept` restricts hits to that concept and scores every one of its patches (exact, except for
        the 8-bit codes of banks of 4M+ patches, see `cmcaug.bank.index`). k' = min(k, number
        of candidates), so an empty bank or concept gives [Q, 0]; an approximate (IVF) search may still
        leave slots with id -1 and score -inf. `nprobe` overrides the IVF default for unrestricted searches.
        """
        queries = embeddings.detach().cpu().float().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings, np.float32)
        queries = queries.reshape(1, -1) if queries.ndim == 1 else queries
        if queries.ndim != 2 or queries.shape[1] != self.embedding_dim:
            d = self.embedding_dim
            raise InputError(f"search embeddings must be [Q, {d}] or [{d}], got shape {tuple(queries.shape)}")
        if int(k) < 1:
            raise InputError(f"k must be >= 1, got {k}")
        id_range = None
        if concept is not None:
            c = self.vocab.resolve(concept)
            id_range = (int(self._offsets[c]), int(self._offsets[c] + self._counts[c]))
        candidates = len(self) if id_range is None else id_range[1] - id_range[0]
        k = min(int(k), candidates)
        if k == 0:
            scores, ids = np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        else:
            scores, ids = search_index(self._faiss_index(), queries, k, id_range, nprobe)
            scores[ids < 0] = -np.inf
        return _like(embeddings, scores), _like(embeddings, ids)

    def _faiss_index(self) -> Any:
        """The index, read and checked on first use against the manifest and the embeddings this bank mapped
        (so an index.faiss swapped in by a later build of the folder is refused, not paired with them)."""
        if self._index is None:
            self._check_unchanged()
            file, spec = self.path / fmt.INDEX, self.manifest["index"]
            index = open_index(file, spec, len(self), self.embedding_dim)
            check_index_contents(index, self._embeddings, spec, file)
            self._index = index
        return self._index

    # -- summary --------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What `cmcaug inspect` prints: sizes, index, provenance, build stats and per-concept counts."""
        m = self.manifest
        return {
            "path": str(self.path),
            "format": f"{m['format']} v{m['version']}",
            "num_patches": len(self),
            "patch_size": self.patch_size,
            "embedding_dim": self.embedding_dim,
            "num_concepts": len(self.vocab),
            "empty_concepts": int((self._counts == 0).sum()),
            "index": m["index"].get("factory", m["index"].get("kind")),
            "bytes": sum(entry["bytes"] for entry in m["files"].values()),
            "provenance": m.get("provenance", {}),
            "stats": m.get("stats", {}),
            "concepts": [
                {"concept_id": i, "name": name, "count": int(count), "offset": int(offset)}
                for i, (name, count, offset) in enumerate(zip(self.vocab.names, self._counts, self._offsets))
            ],
        }


def _read_parquet(file: Path, schema: pa.Schema) -> pq.ParquetFile:
    """Open a parquet file and check its columns (names and types) against the format's schema."""
    try:
        parquet = pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as exc:
        raise BankFormatError(f"{file}: not a readable parquet file ({exc}); rebuild the bank") from exc
    if [(f.name, f.type) for f in parquet.schema_arrow] != [(f.name, f.type) for f in schema]:
        found, expected = (", ".join(f"{f.name}: {f.type}" for f in fields) for fields in (parquet.schema_arrow, schema))
        raise BankFormatError(f"{file}: columns ({found}), expected ({expected}); rebuild the bank")
    return parquet


def _read_table(file: Path, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    try:
        return _read_parquet(file, schema).read(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise BankFormatError(f"{file}: cannot be read ({exc}); rebuild the bank") from exc


def _read_concepts(file: Path, num_patches: int) -> tuple[ConceptVocab, np.ndarray, np.ndarray]:
    """The vocabulary, offsets and counts, after checking they tile [0, num_patches) in concept order."""
    table = _read_table(file, fmt.CONCEPTS_SCHEMA)
    if table.num_rows == 0 or any(table.column(c).null_count for c in table.column_names):
        raise BankFormatError(f"{file}: expected one non-null row per concept, found {table.num_rows} rows with nulls or none")
    ids = table.column("concept_id").to_numpy()
    offsets = table.column("offset").to_numpy()
    counts = table.column("count").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise BankFormatError(f"{file}: concept_id must be 0..{len(ids) - 1} in order")
    expected_offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if (counts < 0).any():
        raise BankFormatError(f"{file}: counts must be >= 0, found {counts.min()}")
    if counts.sum() != num_patches:
        raise BankFormatError(f"{file}: counts sum to {counts.sum()}, but {fmt.MANIFEST} says num_patches = {num_patches}")
    if not np.array_equal(offsets, expected_offsets):
        c = int(np.flatnonzero(offsets != expected_offsets)[0])
        raise BankFormatError(
            f"{file}: offsets are not contiguous: concept {c} has offset {offsets[c]}, expected {expected_offsets[c]} = sum of earlier counts"
        )
    try:
        vocab = ConceptVocab(dict(zip(table.column("name").to_pylist(), table.column("synonyms").to_pylist())))
    except InputError as exc:
        raise BankFormatError(f"{file}: bad concept names: {exc}") from exc
    if len(vocab) != len(ids):
        raise BankFormatError(f"{file}: concept names must be distinct; {len(ids)} rows name {len(vocab)} concepts")
    return vocab, offsets.astype(np.int64), counts.astype(np.int64)


def _check_patches(file: Path, num_patches: int, counts: np.ndarray, read_ids: bool) -> None:
    """Check the schema and row count; with `read_ids`, that rows are sorted by concept as `counts` say."""
    parquet = _read_parquet(file, fmt.PATCHES_SCHEMA)
    if parquet.metadata.num_rows != num_patches:
        raise BankFormatError(f"{file}: {parquet.metadata.num_rows} rows, expected {num_patches} (num_patches in {fmt.MANIFEST})")
    if read_ids:
        ids = _read_table(file, fmt.PATCHES_SCHEMA, ["concept_id"]).column("concept_id").to_numpy()
        if not np.array_equal(ids, np.repeat(np.arange(len(counts), dtype=ids.dtype), counts)):
            raise BankFormatError(f"{file}: rows are not sorted by concept_id as concepts.parquet's offsets/counts say")
