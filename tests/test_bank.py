"""PatchBank: open, sample, pixels/embeddings/records, search, pickling, and every way a bank can be bad."""
from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from bank_helpers import EMPTY_CONCEPT, VOCAB, expected_order, random_inputs, rehash, write_random_bank

from cmcaug.bank import format as fmt
from cmcaug.bank import reader
from cmcaug.bank.reader import PatchBank
from cmcaug.bank.writer import write_bank
from cmcaug.errors import BankFormatError, InputError


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("bank") / "bank"
    inputs = write_random_bank(path, n=400, patch_size=6, dim=12)
    order = expected_order(inputs["patches"])
    return path, {
        "pixels": inputs["pixels"][order],
        "embeddings": inputs["embeddings"][order].astype(np.float16),
        "rows": inputs["patches"].take(order).to_pylist(),
    }


@pytest.fixture(scope="module")
def bank(written: tuple[Path, dict]) -> PatchBank:
    return PatchBank.open(written[0])


def test_open_exposes_shape_vocab_and_counts(bank: PatchBank, written: tuple[Path, dict]) -> None:
    rows = written[1]["rows"]
    assert (len(bank), bank.patch_size, bank.embedding_dim) == (400, 6, 12)
    assert bank.vocab == VOCAB
    assert bank.manifest["format"] == fmt.FORMAT
    for name in VOCAB.names:
        expected = sum(r["concept_id"] == VOCAB.id(name) for r in rows)
        assert bank.count(name) == bank.count(VOCAB.id(name)) == bank.count(name.upper()) == expected
    assert bank.count(EMPTY_CONCEPT) == 0
    assert np.array_equal(bank.offsets, np.concatenate([[0], np.cumsum(bank.counts)[:-1]]))
    with pytest.raises(InputError, match="unknown concept"):
        bank.count("zebra")


# -- sampling --------------------------------------------------------------------------------------
def test_sample_draws_from_the_right_concept(bank: PatchBank) -> None:
    concepts = np.array([0, 1, 2, 4] * 50)
    ids = bank.sample(concepts, generator=0)
    assert ids.dtype == np.int64 and ids.shape == concepts.shape
    assert np.array_equal(np.array([r["concept_id"] for r in bank.records(ids)]), concepts)


def test_sample_is_uniform_within_a_concept(bank: PatchBank) -> None:
    c = VOCAB.id("cat")
    ids = bank.sample(np.full(40 * bank.count(c), c), generator=np.random.default_rng(0))
    hist = np.bincount(ids - bank.offsets[c], minlength=bank.count(c))
    assert len(hist) == bank.count(c) and hist.min() > 10 and hist.max() < 80  # mean 40 per patch


@pytest.mark.parametrize("make", [lambda: 7, lambda: np.random.default_rng(7), lambda: torch.Generator().manual_seed(7)])
def test_sample_is_reproducible(bank: PatchBank, make: Callable) -> None:
    concepts = [0, 1, 2, 0, 4, 4]
    assert np.array_equal(bank.sample(concepts, generator=make()), bank.sample(concepts, generator=make()))


def test_sample_follows_the_input_kind_and_shape(bank: PatchBank) -> None:
    ids = bank.sample(torch.tensor([[0, 1], [2, 4]]), generator=torch.Generator().manual_seed(0))
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int64 and ids.shape == (2, 2)
    assert bank.pixels(ids).shape == (2, 2, 6, 6, 3)
    assert bank.sample([], generator=0).shape == (0,)


def test_an_empty_concept_is_refused_by_name_or_marked_minus_one(bank: PatchBank, caplog: pytest.LogCaptureFixture) -> None:
    empty = VOCAB.id(EMPTY_CONCEPT)
    with pytest.raises(InputError, match=f"no patches of '{EMPTY_CONCEPT}'.*missing='mark'"):
        bank.sample([0, empty, 1], generator=0)
    with caplog.at_level(logging.WARNING, logger="cmcaug.bank.reader"):
        ids = bank.sample([0, empty, 1, empty], generator=0, missing="mark")
    assert ids[1] == ids[3] == -1 and (ids[[0, 2]] >= 0).all()
    assert EMPTY_CONCEPT in caplog.text
    with pytest.raises(InputError, match=r"2 of the patch ids are -1, which marks no patch.*ids\[ids >= 0\]"):
        bank.pixels(ids)
    assert bank.pixels(ids[ids >= 0]).shape[0] == 2
    with pytest.raises(InputError, match="missing must be one of"):
        bank.sample([0], missing="skip")


@pytest.mark.parametrize("bad, message", [([0, 5], r"\[0, 5\)"), ([-1], r"\[0, 5\)"), ([0.5], "integers")])
def test_sample_refuses_bad_concept_ids(bank: PatchBank, bad: list, message: str) -> None:
    with pytest.raises(InputError, match=message):
        bank.sample(bad, generator=0)


def test_sample_with_callers_uniforms(bank: PatchBank) -> None:
    c = VOCAB.id("cat")
    ids = bank.sample(torch.tensor([c, c, c]), uniforms=torch.tensor([0.0, 0.5, np.nextafter(1.0, 0.0)]))
    assert ids.tolist() == [bank.offsets[c], bank.offsets[c] + bank.count(c) // 2, bank.offsets[c] + bank.count(c) - 1]
    for bad, message in [([0.5], "one value per concept id"), ([0.5, -0.1], r"\[0, 1\)"), ([0.5, 1.0], r"\[0, 1\)")]:
        with pytest.raises(InputError, match=message):  # out of range would draw a neighbouring concept's patch
            bank.sample([c, c], uniforms=bad)


# -- reads -----------------------------------------------------------------------------------------
def test_pixels_embeddings_and_records_match_the_sorted_inputs(bank: PatchBank, written: tuple[Path, dict]) -> None:
    expected = written[1]
    ids = np.array([399, 0, 17, 17, 250])
    pixels = bank.pixels(ids)
    assert pixels.dtype == torch.uint8 and pixels.shape == (5, 6, 6, 3)
    assert np.array_equal(pixels.numpy(), expected["pixels"][ids])
    assert np.array_equal(bank.embeddings(torch.from_numpy(ids)).numpy(), expected["embeddings"][ids])
    for record, i in zip(bank.records(ids), ids):
        row = expected["rows"][i]
        assert record == {
            "concept": VOCAB.name(row["concept_id"]), "concept_id": row["concept_id"], "image": row["image"],
            "box": tuple(row["box"]), "score": row["score"],
        }


@pytest.mark.parametrize("bad", [[-1], [400], [1.0]])
def test_reads_refuse_bad_patch_ids(bank: PatchBank, bad: list) -> None:
    with pytest.raises(InputError, match="patch ids"):
        bank.pixels(bad)


# -- search ----------------------------------------------------------------------------------------
def _brute_force(embeddings: np.ndarray, queries: np.ndarray, k: int, lo: int = 0) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float32) @ embeddings.astype(np.float32).T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids + lo


def test_search_is_exact_on_a_flat_bank(bank: PatchBank, written: tuple[Path, dict]) -> None:
    embeddings = written[1]["embeddings"]
    queries = embeddings[[3, 100, 333]].astype(np.float32)
    scores, ids = bank.search(queries, k=5)
    ref_scores, ref_ids = _brute_force(embeddings, queries, 5)
    assert np.array_equal(ids, ref_ids) and np.allclose(scores, ref_scores, atol=1e-5)
    assert np.array_equal(ids[:, 0], [3, 100, 333])


def test_search_within_a_concept(bank: PatchBank, written: tuple[Path, dict]) -> None:
    embeddings = written[1]["embeddings"]
    c = VOCAB.id("hot dog")
    lo, n = bank.offsets[c], bank.count(c)
    queries = torch.from_numpy(embeddings[[0, 399]].astype(np.float32))
    scores, ids = bank.search(queries, k=4, concept="hot dog")
    assert isinstance(ids, torch.Tensor) and ids.shape == (2, 4)
    ref_scores, ref_ids = _brute_force(embeddings[lo : lo + n], queries.numpy(), 4, lo)
    assert np.array_equal(ids.numpy(), ref_ids) and np.allclose(scores.numpy(), ref_scores, atol=1e-5)
    scores, ids = bank.search(queries[0], k=10_000, concept=c)
    assert ids.shape == (1, n) and set(ids[0].tolist()) == set(range(lo, lo + n))
    assert bank.search(queries, k=3, concept=EMPTY_CONCEPT)[1].shape == (2, 0)


def test_search_refuses_bad_queries(bank: PatchBank) -> None:
    with pytest.raises(InputError, match=r"\[Q, 12\]"):
        bank.search(np.zeros((2, 5)), k=1)
    with pytest.raises(InputError, match="k must be"):
        bank.search(np.zeros(12), k=0)


# -- pickling --------------------------------------------------------------------------------------
def test_pickle_reopens_by_path_without_copying_arrays(bank: PatchBank) -> None:
    blob = pickle.dumps(bank)
    assert len(blob) < 4096 < bank._pixels.nbytes
    clone = pickle.loads(blob)
    assert isinstance(clone._pixels, np.memmap) and clone.vocab == bank.vocab
    ids = np.arange(0, 400, 7)
    assert torch.equal(clone.pixels(ids), bank.pixels(ids))
    assert np.array_equal(clone.sample([0, 1, 2], generator=3), bank.sample([0, 1, 2], generator=3))
    assert np.array_equal(clone.search(bank.embeddings([5]).float(), 2)[1], bank.search(bank.embeddings([5]).float(), 2)[1])


# -- refusing bad banks ----------------------------------------------------------------------------
@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    write_random_bank(tmp_path / "bank", n=60)
    return tmp_path / "bank"


def _files_edit(entries: dict) -> Callable[[Path], None]:
    def edit(bank: Path) -> None:
        _manifest_edit(files={**json.loads((bank / fmt.MANIFEST).read_text())["files"], **entries})(bank)
    return edit


def _manifest_edit(**changes: object) -> Callable[[Path], None]:
    def edit(bank: Path) -> None:
        manifest = json.loads((bank / fmt.MANIFEST).read_text())
        manifest.update(changes)
        (bank / fmt.MANIFEST).write_text(json.dumps(manifest))
    return edit


def _save_npy(name: str, make: Callable[[np.ndarray], np.ndarray], allow_pickle: bool = False) -> Callable[[Path], None]:
    def edit(bank: Path) -> None:
        array = np.load(bank / name, allow_pickle=False)
        np.save(bank / name, make(array), allow_pickle=allow_pickle)
        rehash(bank)
    return edit


def _replace_bytes(name: str, change: Callable[[bytes], bytes], fix_manifest: bool = True) -> Callable[[Path], None]:
    def edit(bank: Path) -> None:
        (bank / name).write_bytes(change((bank / name).read_bytes()))
        if fix_manifest:
            rehash(bank)
    return edit


def _truncate(name: str, keep: int = -100, fix_manifest: bool = True) -> Callable[[Path], None]:
    return _replace_bytes(name, lambda data: data[:keep], fix_manifest)


def _write_parquet(name: str, change: Callable[[pa.Table], pa.Table]) -> Callable[[Path], None]:
    def edit(bank: Path) -> None:
        pq.write_table(change(pq.read_table(bank / name)), bank / name)
        rehash(bank)
    return edit


def _set(table: pa.Table, column: str, values: np.ndarray) -> pa.Table:
    return table.set_column(table.column_names.index(column), column, pa.array(values, table.schema.field(column).type))


def _change_concepts(column: str, change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    return _write_parquet(fmt.CONCEPTS, lambda t: _set(t, column, change(t.column(column).to_numpy())))


def _index_of_another_bank(**kwargs: object) -> Callable[[Path], None]:
    """Put the index of another bank (written with `kwargs`) in place, and make the manifest vouch for it."""
    def edit(bank: Path) -> None:
        other = bank.parent / "other"
        write_bank(other, **random_inputs(**{k: v for k, v in kwargs.items() if k != "index_kind"}), index_kind=kwargs.get("index_kind"))
        (bank / fmt.INDEX).write_bytes((other / fmt.INDEX).read_bytes())
        rehash(bank)
    return edit


def _manifest_index(**changes: object) -> Callable[[Path], None]:
    def edit(bank: Path) -> None:
        spec = json.loads((bank / fmt.MANIFEST).read_text())["index"]
        _manifest_edit(index={**spec, **changes})(bank)
    return edit


def _flip_byte(bank: Path) -> None:
    data = bytearray((bank / fmt.EMBEDDINGS).read_bytes())
    data[-1] ^= 0xFF
    (bank / fmt.EMBEDDINGS).write_bytes(bytes(data))


CORRUPTIONS = {
    "no manifest": (lambda b: (b / fmt.MANIFEST).unlink(), fmt.MANIFEST, "missing"),
    "manifest not json": (lambda b: (b / fmt.MANIFEST).write_text("{not json"), fmt.MANIFEST, "not valid JSON"),
    "manifest not object": (lambda b: (b / fmt.MANIFEST).write_text("[1, 2]"), fmt.MANIFEST, "JSON object"),
    "manifest nested deep": (lambda b: (b / fmt.MANIFEST).write_text("[" * 100_000), fmt.MANIFEST, "not valid JSON"),
    "manifest huge number": (lambda b: (b / fmt.MANIFEST).write_text("[" + "9" * 5000 + "]"), fmt.MANIFEST, "not valid JSON"),
    "wrong format": (_manifest_edit(format="other"), fmt.MANIFEST, "not a cmcaug patch bank"),
    "newer version": (_manifest_edit(version=2), fmt.MANIFEST, "upgrade cmcaug"),
    "manifest field": (_manifest_edit(patch_size="6"), fmt.MANIFEST, "patch_size"),
    "files entry": (_manifest_edit(files={}), fmt.MANIFEST, "files"),
    "files entry not a dict": (_files_edit({fmt.PIXELS: 7}), fmt.MANIFEST, "pixels.npy"),
    "files entry bytes": (_files_edit({fmt.INDEX: {"sha256": "0", "bytes": True}}), fmt.MANIFEST, "bytes"),
    "unknown files entry": (_files_edit({"notes.txt": 5}), fmt.MANIFEST, "notes.txt"),
    "index spec empty": (_manifest_edit(index={}), fmt.MANIFEST, "index kind"),
    "index kind": (_manifest_index(kind="hnsw"), fmt.MANIFEST, "index kind"),
    "index metric": (_manifest_index(metric="l2"), fmt.MANIFEST, "metric"),
    "index nlist type": (_manifest_index(nlist="0"), fmt.MANIFEST, "integers"),
    "index nprobe of flat": (_manifest_index(nprobe=3), fmt.MANIFEST, "nlist = nprobe = 0"),
    "index nprobe over nlist": (_manifest_index(kind="ivf", factory="IVF1,SQfp16", nlist=1, nprobe=2), fmt.MANIFEST, "nprobe <= nlist"),
    "index factory": (_manifest_index(factory="IVF4,SQ8"), fmt.MANIFEST, "factory 'SQfp16'"),
    "index of a bigger bank": (_index_of_another_bank(n=100), fmt.INDEX, "100 vectors of dim 12.*60 vectors"),
    "index of another dim": (_index_of_another_bank(n=60, dim=8), fmt.INDEX, "dim 8.*dim 12"),
    "index of another type": (_index_of_another_bank(n=60, index_kind="ivf"), fmt.INDEX, "index IVF1,SQfp16.*records SQfp16"),
    "index of another bank, same shape": (_index_of_another_bank(n=60, seed=1), fmt.INDEX, "vector 0 is .* away from row 0 of the bank's"),
    "index not an index": (_replace_bytes(fmt.INDEX, lambda data: b"not an index"), fmt.INDEX, "FAISS cannot read it"),
    **{f"index truncated to {keep}": (_truncate(fmt.INDEX, keep=keep), fmt.INDEX, "FAISS cannot read it") for keep in (0, 10, 40, -1)},
    **{f"missing {name}": (lambda b, n=name: (b / n).unlink(), name, "missing") for name in fmt.DATA_FILES},
    "truncated, manifest disagrees": (_truncate(fmt.PIXELS, fix_manifest=False), fmt.PIXELS, "truncated|bytes"),
    "checksum mismatch": (_flip_byte, fmt.EMBEDDINGS, "sha256"),
    "truncated npy": (_truncate(fmt.PIXELS), fmt.PIXELS, "truncated"),
    "truncated npy header": (_truncate(fmt.EMBEDDINGS, keep=20), fmt.EMBEDDINGS, "not a readable .npy"),
    "trailing bytes": (_replace_bytes(fmt.PIXELS, lambda data: data + b"\0"), fmt.PIXELS, "trailing"),
    "wrong dtype": (_save_npy(fmt.PIXELS, lambda a: a.astype(np.int16)), fmt.PIXELS, "uint8"),
    "fortran order": (_save_npy(fmt.PIXELS, np.asfortranarray), fmt.PIXELS, "Fortran"),
    "pickled npy": (_save_npy(fmt.EMBEDDINGS, lambda a: a.astype(object), allow_pickle=True), fmt.EMBEDDINGS, "pickle"),
    "wrong patch size": (_save_npy(fmt.PIXELS, lambda a: a[:, :5, :5]), fmt.PIXELS, "shape"),
    "wrong row count": (_save_npy(fmt.EMBEDDINGS, lambda a: a[:-1]), fmt.EMBEDDINGS, "shape"),
    "offsets not contiguous": (_change_concepts("offset", lambda offsets: offsets + 1), fmt.CONCEPTS, "not contiguous"),
    "counts wrong total": (_change_concepts("count", lambda counts: counts * 2), fmt.CONCEPTS, "counts sum to 120"),
    "negative count": (_change_concepts("count", lambda counts: -counts), fmt.CONCEPTS, ">= 0"),
    "concept ids": (_change_concepts("concept_id", lambda ids: ids[::-1]), fmt.CONCEPTS, "concept_id"),
    "duplicate names": (_write_parquet(fmt.CONCEPTS, lambda t: _set(t, "name", ["dog"] * t.num_rows)), fmt.CONCEPTS, "distinct|twice"),
    "concepts schema": (_write_parquet(fmt.CONCEPTS, lambda t: t.drop_columns(["synonyms"])), fmt.CONCEPTS, "columns"),
    "concepts garbage": (_replace_bytes(fmt.CONCEPTS, lambda data: b"garbage"), fmt.CONCEPTS, "parquet"),
    "patches unsorted": (_write_parquet(fmt.PATCHES, lambda t: t.take(np.arange(t.num_rows)[::-1])), fmt.PATCHES, "sorted"),
    "patches rows": (_write_parquet(fmt.PATCHES, lambda t: t.slice(1)), fmt.PATCHES, "rows"),
    "patches schema": (_write_parquet(fmt.PATCHES, lambda t: t.rename_columns(["concept", *t.column_names[1:]])), fmt.PATCHES, "columns"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_bad_bank_is_refused_naming_the_file(fresh: Path, case: str) -> None:
    corrupt, name, problem = CORRUPTIONS[case]
    corrupt(fresh)
    with pytest.raises(BankFormatError, match=problem) as info:
        PatchBank.open(fresh)
    assert str(fresh / name) in str(info.value)


def test_no_validate_skips_checksums_but_not_structure(fresh: Path) -> None:
    _flip_byte(fresh)
    PatchBank.open(fresh, validate=False)
    _truncate(fmt.PIXELS, fix_manifest=False)(fresh)
    with pytest.raises(BankFormatError, match="pixels.npy"):
        PatchBank.open(fresh, validate=False)


@pytest.mark.parametrize("case", ["index not an index", "index truncated to -1", "index of another type", "index of a bigger bank",
                                  "index of another bank, same shape"])
def test_no_validate_leaves_the_index_to_the_first_search(fresh: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    corrupt, name, problem = CORRUPTIONS[case]
    corrupt(fresh)
    with monkeypatch.context() as patched:
        patched.setattr(reader, "open_index", _never("validate=False read the index"))
        bank = PatchBank.open(fresh, validate=False)
    with pytest.raises(BankFormatError, match=problem) as info:
        bank.search(np.ones(12), k=1)
    assert str(fresh / name) in str(info.value)


def test_validate_keeps_the_index_it_checked(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bank = PatchBank.open(fresh)
    monkeypatch.setattr(reader, "open_index", _never("search read the index again"))
    assert bank.search(bank.embeddings([7]).float(), k=1)[1].tolist() == [[7]]


def _never(what: str) -> Callable:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(what)
    return fail


@pytest.mark.parametrize("kind", ["ivf", "ivf-sq8"])
def test_validate_reads_ivf_indexes(tmp_path: Path, kind: str) -> None:
    """A genuine IVF index passes (8-bit codes within their error); one of another bank of the same shape does not."""
    for name, seed in (("bank", 0), ("other", 1)):
        write_bank(tmp_path / name, **random_inputs(n=400, dim=12, seed=seed), index_kind=kind)
    bank = PatchBank.open(tmp_path / "bank")
    assert bank.manifest["index"]["kind"] == kind and bank._index.ntotal == 400
    (tmp_path / "bank" / fmt.INDEX).write_bytes((tmp_path / "other" / fmt.INDEX).read_bytes())
    rehash(tmp_path / "bank")
    with pytest.raises(BankFormatError, match=r"index.faiss: its vector 0 is .* away from row 0"):
        PatchBank.open(tmp_path / "bank")


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BankFormatError, match="does not exist"):
        PatchBank.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankFormatError, match="is not a patch bank"):
        PatchBank.open(tmp_path / "empty")
    (tmp_path / "half" / ".build").mkdir(parents=True)
    with pytest.raises(BankFormatError, match="did not finish.*--resume"):
        PatchBank.open(tmp_path / "half")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BankFormatError, match="is a file, not a bank folder"):
        PatchBank.open(tmp_path / "afile")


def test_pickled_bank_reopens_from_another_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_random_bank(tmp_path / "bank")
    monkeypatch.chdir(tmp_path)
    blob = pickle.dumps(PatchBank.open("bank"))
    monkeypatch.chdir("/")
    assert len(pickle.loads(blob)) == len(PatchBank.open(tmp_path / "bank"))


def test_inputs_fixture_is_unsorted() -> None:
    ids = random_inputs().get("patches").column("concept_id").to_numpy()
    assert (np.diff(ids) < 0).any()  # otherwise the sort tests would prove nothing


def test_a_bank_published_over_after_opening_is_not_read_through_by_path(tmp_path) -> None:
    """The memory maps keep the opened files; lazy reads by path (records, index, a worker's reopen) refuse
    once another bank has been published in the folder."""
    import pickle

    folder = tmp_path / "bank"
    write_random_bank(folder, n=40, seed=0)
    bank = PatchBank.open(folder, validate=False)
    worker_copy = pickle.dumps(bank)
    write_random_bank(folder, n=60, seed=1)  # write_bank publishes over the folder's bank
    with pytest.raises(BankFormatError, match="changed after it was opened"):
        bank.records([0])
    with pytest.raises(BankFormatError, match="changed after it was opened"):
        bank.search(bank.embeddings([0]).float(), k=1)
    with pytest.raises(BankFormatError, match="changed after it was opened"):
        pickle.loads(worker_copy)
    assert len(PatchBank.open(folder)) == 60  # reopened: the new bank
