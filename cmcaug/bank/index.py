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
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require
from ..errors import InputError

FLAT_MAX = 50_000
SQ8_MIN = 4_000_000
KINDS = ("flat", "ivf", "ivf-sq8")
_TRAIN_PER_LIST = 50  # k-means points per centroid (FAISS warns below 39)
_KMEANS_ITERATIONS = 10  # plenty for coarse lists; training dominates the cost of finalizing a bank
_MIN_PER_LIST = 39
_CHUNK_ROWS = 1 << 16


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
        return {"kind": "flat", "factory": "SQfp16", "metric": "inner_product", "nlist": 0, "nprobe": 0}
    if num_vectors < 1:
        raise InputError(f"an IVF index needs at least one vector to train on, got {num_vectors}")
    nlist = max(1, min(round(4 * math.sqrt(num_vectors)), num_vectors // _MIN_PER_LIST))
    storage = "SQfp16" if kind == "ivf" else "SQ8"
    return {"kind": kind, "factory": f"IVF{nlist},{storage}", "metric": "inner_product", "nlist": nlist, "nprobe": math.ceil(nlist / 8)}


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


def save_index(index: Any, path: str | Path) -> None:
    _faiss().write_index(index, str(path))


def load_index(path: str | Path, spec: dict[str, Any]) -> Any:
    """Read an index memory-mapped (IVF lists and flat codes are paged in on demand, shared by processes)."""
    faiss = _faiss()
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    if spec["kind"] != "flat":
        faiss.extract_index_ivf(index).nprobe = spec["nprobe"]
    return index


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
