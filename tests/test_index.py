"""FAISS index: type by size, exact flat search, IVF recall, exact id-range filter, deterministic bytes, and the
checks of an index read from a bank (its spec, type, size, dimension, ids)."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest
from bank_helpers import unit_rows

from cmcaug.bank import format as fmt
from cmcaug.bank.index import (
    FLAT_MAX, SQ8_MIN, build_index, check_index_contents, check_spec, load_index, open_index, plan_index, save_index, search_index,
)
from cmcaug.errors import BankFormatError, InputError


def clustered(n: int, d: int = 16, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit float16 vectors around `clusters` centres: the structure real patch embeddings have."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng, clusters, d)
    x = centres[rng.integers(0, clusters, n)] + 0.15 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.astype(np.float32).T), axis=1, kind="stable")[:, :k]


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_plan_picks_the_type_by_size() -> None:
    assert plan_index(0)["kind"] == plan_index(FLAT_MAX - 1)["kind"] == "flat"
    ivf = plan_index(FLAT_MAX)
    assert ivf["kind"] == "ivf" and ivf["factory"] == f"IVF{ivf['nlist']},SQfp16"
    assert ivf["nlist"] == round(4 * FLAT_MAX**0.5) and ivf["nprobe"] == -(-ivf["nlist"] // 8)
    assert plan_index(SQ8_MIN)["factory"].endswith(",SQ8")
    assert plan_index(1000, "ivf")["nlist"] == 1000 // 39  # enough training points per list
    with pytest.raises(InputError, match="index kind"):
        plan_index(10, "hnsw")
    with pytest.raises(InputError, match="at least one vector"):
        plan_index(0, "ivf")


def test_flat_is_exact_and_lossless_for_float16() -> None:
    vectors = clustered(700)
    queries = vectors[:20].astype(np.float32)
    index = build_index(vectors, plan_index(len(vectors)))
    scores, ids = search_index(index, queries, 5)
    assert np.array_equal(ids, brute_force(vectors, queries, 5))
    assert np.allclose(scores[:, 0], 1.0, atol=1e-3)
    assert np.array_equal(index.reconstruct_n(0, len(vectors)), vectors.astype(np.float32))


@pytest.mark.parametrize("kind, min_recall", [("ivf", 0.95), ("ivf-sq8", 0.85)])
def test_ivf_recall_and_exact_range_filter(kind: str, min_recall: float) -> None:
    vectors = clustered(4000)
    queries = vectors[::80].astype(np.float32) + 0.05 * unit_rows(np.random.default_rng(1), 50, 16)
    spec = plan_index(len(vectors), kind)
    index = build_index(vectors, spec)
    assert isinstance(index, faiss.IndexIVF) and index.ntotal == len(vectors)
    _, ids = search_index(index, queries, 10)
    truth = brute_force(vectors, queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]) >= min_recall
    _, all_lists = search_index(index, queries, 10, nprobe=spec["nlist"])
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(all_lists, truth)]) >= min_recall
    lo, hi = 1234, 1334
    _, ranged = search_index(index, queries, 5, id_range=(lo, hi))
    assert ((ranged >= lo) & (ranged < hi)).all()
    if kind == "ivf":  # float16 storage: the filtered search is exact
        assert np.array_equal(ranged, brute_force(vectors[lo:hi], queries, 5) + lo)


def test_flat_range_filter_and_padding() -> None:
    vectors = clustered(300)
    index = build_index(vectors, plan_index(300))
    queries = vectors[[0, 299]].astype(np.float32)
    _, ids = search_index(index, queries, 4, id_range=(10, 60))
    assert np.array_equal(ids, brute_force(vectors[10:60], queries, 4) + 10)
    scores, ids = search_index(index, queries, 3, id_range=(5, 7))
    assert (ids[:, 2] == -1).all() and (ids[:, :2] >= 5).all()


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_save_load_round_trip(tmp_path: Path, kind: str) -> None:
    vectors = clustered(2000)
    spec = plan_index(len(vectors), kind)
    index = build_index(vectors, spec)
    save_index(index, tmp_path / "index.faiss")
    loaded = load_index(tmp_path / "index.faiss", spec)
    if kind == "ivf":
        assert loaded.nprobe == spec["nprobe"]
    queries = vectors[:10].astype(np.float32)
    assert np.array_equal(search_index(loaded, queries, 5)[1], search_index(index, queries, 5)[1])


def test_bytes_do_not_depend_on_thread_count(tmp_path: Path, one_thread: None) -> None:
    vectors = clustered(4000)
    spec = plan_index(len(vectors), "ivf")
    save_index(build_index(vectors, spec), tmp_path / "one.faiss")
    faiss.omp_set_num_threads(2)
    save_index(build_index(vectors, spec), tmp_path / "two.faiss")
    save_index(build_index(vectors, spec), tmp_path / "again.faiss")
    hashes = {fmt.sha256_file(tmp_path / f"{name}.faiss") for name in ("one", "two", "again")}
    assert len(hashes) == 1


# -- checking an index read from a bank --------------------------------------------------------------
@pytest.mark.parametrize("n, kind", [(0, None), (100, None), (FLAT_MAX, None), (SQ8_MIN, None), (100, "ivf-sq8")])
def test_every_planned_spec_passes_its_check(n: int, kind: str | None) -> None:
    check_spec(plan_index(n, kind))


@pytest.mark.parametrize("change, message", [
    ({"kind": None}, "index kind"),
    ({"metric": "l2"}, "metric"),
    ({"nlist": 3.0}, "integers"),
    ({"nprobe": True}, "integers"),
    ({"nprobe": 0}, "1 <= nprobe <= nlist"),
    ({"nprobe": 10**12}, "1 <= nprobe <= nlist"),
    ({"factory": "IVF9,SQfp16"}, "factory 'IVF10,SQfp16'"),
    ({"kind": "ivf-sq8"}, "factory 'IVF10,SQ8'"),
    ({"kind": "flat"}, "nlist = nprobe = 0"),
])
def test_bad_specs_are_refused(change: dict, message: str) -> None:
    spec = {**plan_index(1000, "ivf"), "nlist": 10, "factory": "IVF10,SQfp16", "nprobe": 2}
    check_spec(spec)
    with pytest.raises(InputError, match=re.escape(message)):
        check_spec({**spec, **change})


def _ivf_with_ids(vectors: np.ndarray, ids: np.ndarray) -> faiss.IndexIVF:
    spec = plan_index(len(vectors), "ivf")
    index = faiss.index_factory(vectors.shape[1], spec["factory"], faiss.METRIC_INNER_PRODUCT)
    index.train(vectors.astype(np.float32))
    index.add_with_ids(vectors.astype(np.float32), ids)
    return index


@pytest.mark.parametrize("ids, message", [
    (np.arange(400)[::-1].copy(), "not ascending"),
    (np.minimum(np.arange(400), 398), "not ascending|each of 0..399 once"),
    (np.arange(400) + 1, "each of 0..399 once"),
])
def test_ivf_ids_must_be_the_row_numbers_ascending(tmp_path: Path, ids: np.ndarray, message: str) -> None:
    vectors = clustered(400)
    spec = plan_index(400, "ivf")
    check_index_contents(build_index(vectors, spec), vectors, spec, tmp_path / "index.faiss")
    with pytest.raises(BankFormatError, match=message) as info:
        check_index_contents(_ivf_with_ids(vectors, ids), vectors, spec, tmp_path / "index.faiss")
    assert str(tmp_path / "index.faiss") in str(info.value)


def test_open_index_names_the_file_and_what_it_holds(tmp_path: Path) -> None:
    vectors = clustered(300)
    save_index(build_index(vectors, plan_index(300, "ivf")), tmp_path / "index.faiss")
    with pytest.raises(BankFormatError, match=r"index IVF7,SQfp16 \(inner product\) of 300 vectors of dim 16, but the "
                                              r"manifest records SQfp16 \(inner product\) of 300 vectors of dim 16"):
        open_index(tmp_path / "index.faiss", plan_index(300), 300, 16)
    (tmp_path / "index.faiss").write_bytes((tmp_path / "index.faiss").read_bytes()[:-1])
    with pytest.raises(BankFormatError, match="FAISS cannot read it"):
        open_index(tmp_path / "index.faiss", plan_index(300, "ivf"), 300, 16)


@pytest.mark.parametrize("kind, change", [("flat", np.nan), ("flat", 0.01), ("ivf", 0.01)])
def test_stored_vectors_must_be_the_embeddings(tmp_path: Path, kind: str, change: float) -> None:
    vectors = clustered(400)
    spec = plan_index(400, kind)
    stored = vectors.copy()
    stored[0, 0] += np.float16(change)
    with pytest.raises(BankFormatError, match=r"vector 0 is (nan|0\.01\d*) away from row 0"):
        check_index_contents(build_index(stored, spec), vectors, spec, tmp_path / "index.faiss")
