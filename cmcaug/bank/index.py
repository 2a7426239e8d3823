"""FAISS index over a bank's embeddings: choose the type by size, build deterministically, save, load, search.

Bank embeddings are float16, so the index stores them as float16 (`SQfp16`): lossless, and half the
size of a float32 `IndexFlatIP`. Inner product on L2-normalized vectors is cosine similarity.

| patches N            | index                    | search                                  |
|----------------------|--------------------------|-----------------------------------------|
| N < 50,000           | `SQfp16` (flat)          | exact                                   |
| 50,000 <= N < 4M     | `IVF{nlist},SQfp16`      | probes `nprobe = ceil(nlist / 8)` lists |
| N >= 4M              | `IVF{nlist},SQ8`         | same; 8-bit codes: half the memory,     |
|                      |                          | approximate scores                      |

with `nlist ~ 4 sqrt(N)`. The bytes of the written index are a pure function of the vectors: k-means is
trained on an evenly spaced subset with FAISS's fixed seed, and FAISS's assignment and centroid updates
give the same result whatever the thread count (the tests check 1 vs 2 threads).

A concept occupies a contiguous id range, and ids in every inverted list are ascending, so a concept
filter is an `IDSelectorRange(assume_sorted=True)`: FAISS binary-searches each list for the range.
Filtered searches probe every list, so they see every patch of the concept (exact with float16
storage) at a cost of O(nlist log N + count).
The index is searched on the CPU: FAISS's classic GPU indexes ignore ID selectors (facebookresearch/faiss
issues 3114, 3924), and bank search is an inspection tool, not part of the training loop.

A bank's manifest records the index spec (`plan_index`); `check_spec` checks one read from disk, and
`open_index` refuses an index file that is not the one the spec, N and d describe (`check_index_contents`
goes on to its ids and stored vectors when a bank is validated).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .._deps import require
from ..errors import BankFormatError, InputError

FLAT_MAX = 50_000
SQ8_MIN = 4_000_000
KINDS = ("flat", "ivf", "ivf-sq8")
_TRAIN_PER_LIST = 50  # k-means points per centroid (FAISS warns below 39)
_KMEANS_ITERATIONS = 10  # plenty for coarse lists; training dominates the cost of finalizing a bank
_MIN_PER_LIST = 39
_CHUNK_ROWS = 1 << 16
_SPOT_CHECKS = 64  # stored vectors compared with the bank's embeddings when a bank is validated
_STORAGE_ERROR = {"flat": 0.0, "ivf": 0.0, "ivf-sq8": 0.1}  # L2 error of a stored vector: float16 codes are exact


def _faiss() -> Any:
    return require("faiss", "Building or searching a patch bank's index")


def plan_index(num_vectors: int, kind: str | None = None) -> dict[str, Any]:
    """The index spec for `num_vectors` vectors: `kind` (auto by size when None), FAISS factory string,
    `nlist` and default `nprobe` (0 for flat). Stored in the bank manifest under "index"."""
    if kind is None:
        kind = "flat" if num_vectors < FLAT_MAX else "ivf" if num_vectors < SQ8_MIN else "ivf-sq8"
    if kind not in KINDS:
        raise InputError(f"index kind must be one of {KINDS}, got {kind!r}")
    if kind == "flat":
        return {"kind": "flat", "factory": _factory("flat", 0), "metric": "inner_product", "nlist": 0, "nprobe": 0}
    if num_vectors < 1:
        raise InputError(f"an IVF index needs at least one vector to train on, got {num_vectors}")
    nlist = max(1, min(round(4 * math.sqrt(num_vectors)), num_vectors // _MIN_PER_LIST))
    return {"kind": kind, "factory": _factory(kind, nlist), "metric": "inner_product", "nlist": nlist, "nprobe": math.ceil(nlist / 8)}


def _factory(kind: str, nlist: int) -> str:
    storage = "SQ8" if kind == "ivf-sq8" else "SQfp16"
    return storage if kind == "flat" else f"IVF{nlist},{storage}"


def check_spec(spec: dict[str, Any]) -> None:
    """Raise `InputError` unless `spec` is an index spec as `plan_index` makes them (read from a manifest)."""
    kind, nlist, nprobe = spec.get("kind"), spec.get("nlist"), spec.get("nprobe")
    if kind not in KINDS:
        raise InputError(f"index kind must be one of {KINDS}, found {kind!r}")
    if spec.get("metric") != "inner_product":
        raise InputError(f"index metric must be 'inner_product', found {spec.get('metric')!r}")
    counts = (nlist, nprobe)
    if any(isinstance(value, bool) or not isinstance(value, int) for value in counts):
        raise InputError(f"index nlist and nprobe must be integers, found {nlist!r} and {nprobe!r}")
    sane = counts == (0, 0) if kind == "flat" else 1 <= nprobe <= nlist
    if not sane:
        raise InputError(f"a {kind} index needs {'nlist = nprobe = 0' if kind == 'flat' else '1 <= nprobe <= nlist'}, "
                         f"found nlist {nlist}, nprobe {nprobe}")
    if spec.get("factory") != _factory(kind, nlist):
        raise InputError(f"a {kind} index with nlist {nlist} has factory {_factory(kind, nlist)!r}, found {spec.get('factory')!r}")


def _float32_rows(vectors: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def build_index(vectors: np.ndarray, spec: dict[str, Any]) -> Any:
    """Train (IVF) and fill an index for `vectors` [N, d] (float16/float32, may be a memmap), in chunks.

    Vector i gets id i. Only `_CHUNK_ROWS` rows are converted to float32 at a time.
    """
    faiss = _faiss()
    n, d = vectors.shape
    index = faiss.index_factory(d, spec["factory"], faiss.METRIC_INNER_PRODUCT)
    if spec["kind"] != "flat":
        ivf = faiss.extract_index_ivf(index)
        ivf.by_residual = spec["kind"] == "ivf-sq8"  # fp16 keeps the vectors as they are: lossless
        ivf.cp.seed = 1234
        ivf.cp.niter = _KMEANS_ITERATIONS
        ivf.nprobe = spec["nprobe"]
        n_train = min(n, _TRAIN_PER_LIST * spec["nlist"])
        index.train(_float32_rows(vectors, np.linspace(0, n - 1, n_train).round().astype(np.int64)))
    for start in range(0, n, _CHUNK_ROWS):
        index.add(_float32_rows(vectors, slice(start, start + _CHUNK_ROWS)))
    return index


def save_index(index: Any, target: str | Path | BinaryIO) -> None:
    """Write `index` to a path, or stream it into an open binary file (the same bytes): the bank writer
    writes only through files it opened itself (`cmcaug.bank._folder`)."""
    faiss = _faiss()
    faiss.write_index(index, faiss.PyCallbackIOWriter(target.write) if hasattr(target, "write") else str(target))


def load_index(path: str | Path, spec: dict[str, Any]) -> Any:
    """Read an index memory-mapped (IVF lists and flat codes are paged in on demand, shared by processes)."""
    faiss = _faiss()
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    if spec["kind"] != "flat":
        faiss.extract_index_ivf(index).nprobe = spec["nprobe"]
    return index


def _factory_of(index: Any) -> str:
    """The factory string that makes an index like `index` (its class name if it is none of ours)."""
    faiss = _faiss()
    if not isinstance(index, (faiss.IndexScalarQuantizer, faiss.IndexIVFScalarQuantizer)):
        return type(index).__name__
    qtype = index.sq.qtype
    storage = {faiss.ScalarQuantizer.QT_fp16: "SQfp16", faiss.ScalarQuantizer.QT_8bit: "SQ8"}.get(qtype, f"SQ(qtype {qtype})")
    return f"IVF{index.nlist},{storage}" if isinstance(index, faiss.IndexIVF) else storage


def open_index(path: Path, spec: dict[str, Any], num_vectors: int, dim: int) -> Any:
    """`load_index`, refusing with `BankFormatError` naming `path` a file FAISS cannot read (truncated, not an
    index) or an index of another type (factory, inner product), size or dimension than the manifest says."""
    faiss = _faiss()
    try:
        index = load_index(path, spec)
    except RuntimeError as exc:
        raise BankFormatError(f"{path}: FAISS cannot read it ({str(exc).splitlines()[0]}); rebuild the bank") from exc
    found = (_factory_of(index), index.metric_type == faiss.METRIC_INNER_PRODUCT, index.ntotal, index.d)
    if found != (spec["factory"], True, num_vectors, dim):
        metric = "inner product" if found[1] else f"metric {index.metric_type}"
        raise BankFormatError(
            f"{path}: index {found[0]} ({metric}) of {index.ntotal} vectors of dim {index.d}, but the manifest records "
            f"{spec['factory']} (inner product) of {num_vectors} vectors of dim {dim}; the index is another bank's or "
            "was changed: rebuild the bank"
        )
    return index


def check_index_contents(index: Any, vectors: np.ndarray, spec: dict[str, Any], path: Path) -> None:
    """Refuse (`BankFormatError` naming `path`) an index whose ids are not 0..N-1, ascending in every inverted
    list (what a concept filter's binary search assumes), or whose stored vectors at `_SPOT_CHECKS` evenly
    spaced ids are not those rows of `vectors` [N, d] (another bank's index of the same shape)."""
    faiss = _faiss()
    sample = np.unique(np.linspace(0, len(vectors) - 1, min(len(vectors), _SPOT_CHECKS)).round().astype(np.int64))
    stored = np.empty((sample.size, vectors.shape[1]), np.float32)
    if isinstance(index, faiss.IndexIVF):
        lists, offsets = _list_positions(index, len(vectors), path)
        for row, i in zip(stored, sample):
            index.reconstruct_from_offset(int(lists[i]), int(offsets[i]), faiss.swig_ptr(row))
    else:
        stored[:] = index.reconstruct_batch(sample)
    with np.errstate(invalid="ignore", over="ignore"):  # a NaN or infinity stored is an error like any other
        errors = np.linalg.norm(stored - _float32_rows(vectors, sample), axis=1)
    bad = np.flatnonzero(~(errors <= _STORAGE_ERROR[spec["kind"]]))
    if bad.size:
        raise BankFormatError(
            f"{path}: its vector {sample[bad[0]]} is {errors[bad[0]]:.3g} away from row {sample[bad[0]]} of the bank's "
            "embeddings; the index is another bank's: rebuild the bank"
        )


def _list_positions(index: Any, num_vectors: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(inverted list, offset in it) of each id 0..N-1 of an IVF index, after checking its ids."""
    faiss = _faiss()
    per_list = [faiss.rev_swig_ptr(index.invlists.get_ids(i), index.invlists.list_size(i)).copy() for i in range(index.nlist)]
    if not all((np.diff(ids) > 0).all() for ids in per_list):
        raise BankFormatError(f"{path}: ids in an inverted list are not ascending; rebuild the bank")
    ids, sizes = np.concatenate(per_list), np.array([len(ids) for ids in per_list])
    if ids.size != num_vectors or (ids.size and (ids.min() < 0 or ids.max() >= num_vectors or np.bincount(ids).max() > 1)):
        raise BankFormatError(f"{path}: its ids are not each of 0..{num_vectors - 1} once; rebuild the bank")
    lists, offsets = np.empty(num_vectors, np.int64), np.empty(num_vectors, np.int64)
    lists[ids] = np.repeat(np.arange(index.nlist), sizes)
    offsets[ids] = np.arange(ids.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return lists, offsets


def search_index(
    index: Any,
    queries: np.ndarray,
    k: int,
    id_range: tuple[int, int] | None = None,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` inner products: (scores float32 [Q, k], ids int64 [Q, k]); missing hits have id -1.

    `id_range=(lo, hi)` restricts hits to ids in [lo, hi) and, on IVF, probes every list (every id in
    the range is scored).
    `nprobe` overrides the index's default for unrestricted IVF searches.
    """
    faiss = _faiss()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    selector = None if id_range is None else faiss.IDSelectorRange(int(id_range[0]), int(id_range[1]), True)
    if isinstance(index, faiss.IndexIVF):
        probes = index.nlist if selector is not None else (nprobe or index.nprobe)
        params = faiss.SearchParametersIVF(sel=selector, nprobe=int(probes))
    else:
        params = faiss.SearchParameters(sel=selector)
    scores, ids = index.search(queries, int(k), params=params)
    return scores, ids.astype(np.int64, copy=False)
