"""write_bank: sorted layout, offsets, deterministic bytes, streaming from memmaps, input checks, publish order,
a full disk, the lock, and links planted in the bank folder."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bank_helpers import (EMPTY_CONCEPT, VOCAB, expected_order, file_hashes, fill_disk_at, random_inputs, unit_rows,
                          write_random_bank)

from hypothesis import given, settings
from hypothesis import strategies as st

from cmcaug.bank import format as fmt
from cmcaug.bank import writer as bank_writer
from cmcaug.bank._folder import Folder
from cmcaug.bank._publish import bank_lock
from cmcaug.bank.reader import PatchBank
from cmcaug.bank.writer import write_bank
from cmcaug.errors import BankFormatError, BankLockedError, InputError, StorageError


def test_round_trip_sorted_by_concept_image_box(tmp_path: Path) -> None:
    inputs = write_random_bank(tmp_path / "bank")
    order = expected_order(inputs["patches"])
    pixels = np.load(tmp_path / "bank" / fmt.PIXELS, allow_pickle=False)
    embeddings = np.load(tmp_path / "bank" / fmt.EMBEDDINGS, allow_pickle=False)
    assert np.array_equal(pixels, inputs["pixels"][order])
    assert embeddings.dtype == np.float16
    assert np.array_equal(embeddings, inputs["embeddings"][order].astype(np.float16))
    written = pq.read_table(tmp_path / "bank" / fmt.PATCHES)
    assert written.schema.equals(fmt.PATCHES_SCHEMA)
    assert written.to_pylist() == inputs["patches"].take(order).select(fmt.PATCHES_SCHEMA.names).to_pylist()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 40), seed=st.integers(0, 2**16), images=st.integers(1, 4))
def test_any_rows_round_trip_in_sorted_order(n: int, seed: int, images: int) -> None:
    inputs = random_inputs(n=n, patch_size=2, dim=3, seed=seed)
    image = [f"{i % images}.png" for i in range(n)]  # few images: many (concept, image) ties
    inputs["patches"] = inputs["patches"].set_column(1, "image", pa.array(image, pa.string()))
    with tempfile.TemporaryDirectory() as tmp:
        write_bank(tmp, **inputs)
        bank = PatchBank.open(tmp)
        order = expected_order(inputs["patches"])
        assert np.array_equal(bank.pixels(np.arange(n)).numpy(), inputs["pixels"][order])
        assert [r["image"] for r in bank.records(np.arange(n))] == [image[i] for i in order]
        concepts = inputs["patches"].column("concept_id").to_numpy()
        assert np.array_equal(bank.counts, np.bincount(concepts, minlength=len(VOCAB)))


def test_concepts_offsets_and_counts_tile_the_patches(tmp_path: Path) -> None:
    inputs = write_random_bank(tmp_path / "bank")
    concepts = pq.read_table(tmp_path / "bank" / fmt.CONCEPTS)
    assert concepts.schema.equals(fmt.CONCEPTS_SCHEMA)
    assert concepts.column("name").to_pylist() == VOCAB.names
    assert concepts.column("synonyms").to_pylist() == [list(VOCAB.synonyms(n)) for n in VOCAB.names]
    ids = pq.read_table(tmp_path / "bank" / fmt.PATCHES).column("concept_id").to_numpy()
    counts = concepts.column("count").to_numpy()
    offsets = concepts.column("offset").to_numpy()
    assert np.array_equal(counts, np.bincount(inputs["patches"].column("concept_id").to_numpy(), minlength=len(VOCAB)))
    assert counts[VOCAB.id(EMPTY_CONCEPT)] == 0
    for c, (offset, count) in enumerate(zip(offsets, counts)):
        assert (ids[offset : offset + count] == c).all()
    assert offsets[0] == 0 and offsets[-1] + counts[-1] == len(ids)


def test_manifest_fields_and_checksums(tmp_path: Path) -> None:
    inputs = random_inputs(n=50, patch_size=5, dim=7)
    manifest = write_bank(tmp_path / "bank", **inputs)
    on_disk = json.loads((tmp_path / "bank" / fmt.MANIFEST).read_text())
    assert on_disk == manifest
    assert (tmp_path / "bank" / fmt.MANIFEST).read_text() == fmt.manifest_json(manifest)
    assert (manifest["format"], manifest["version"]) == (fmt.FORMAT, fmt.VERSION)
    assert (manifest["num_patches"], manifest["patch_size"], manifest["embedding_dim"]) == (50, 5, 7)
    assert manifest["provenance"] == inputs["provenance"] and manifest["stats"] == inputs["stats"]
    assert manifest["index"]["kind"] == "flat"
    for name in fmt.DATA_FILES:
        file = tmp_path / "bank" / name
        assert manifest["files"][name] == {"sha256": fmt.sha256_file(file), "bytes": file.stat().st_size}
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == sorted([*fmt.DATA_FILES, fmt.MANIFEST])


def test_bytes_are_a_function_of_the_rows_not_their_order(tmp_path: Path) -> None:
    inputs = random_inputs()
    write_bank(tmp_path / "a", **inputs)
    perm = np.random.default_rng(1).permutation(inputs["patches"].num_rows)
    shuffled = dict(inputs, patches=inputs["patches"].take(perm), pixels=inputs["pixels"][perm], embeddings=inputs["embeddings"][perm])
    write_bank(tmp_path / "b", **shuffled)
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")


def test_memmap_inputs_stream_in_chunks_to_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = random_inputs()
    write_bank(tmp_path / "in_memory", **inputs)
    for name in ("pixels", "embeddings"):
        np.save(tmp_path / f"{name}.npy", inputs[name])
        inputs[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    monkeypatch.setattr(bank_writer, "_CHUNK_BYTES", 1000)  # many small chunks
    write_bank(tmp_path / "streamed", **inputs)
    assert file_hashes(tmp_path / "in_memory") == file_hashes(tmp_path / "streamed")


def test_empty_bank_is_valid(tmp_path: Path) -> None:
    inputs = random_inputs(n=0)
    manifest = write_bank(tmp_path / "bank", **inputs)
    assert manifest["num_patches"] == 0
    bank = PatchBank.open(tmp_path / "bank")
    assert len(bank) == 0 and bank.count("dog") == 0
    assert bank.pixels([]).shape == (0, 6, 6, 3)
    scores, ids = bank.search(unit_rows(np.random.default_rng(0), 2, 12), k=3)
    assert scores.shape == ids.shape == (2, 0)


def test_casts_compatible_column_types_and_ignores_chunking(tmp_path: Path) -> None:
    inputs = random_inputs(n=40)
    write_bank(tmp_path / "a", **inputs)
    p = inputs["patches"]
    loose = pa.table({
        "concept_id": p.column("concept_id").cast(pa.int64()),
        "image": p.column("image"),
        "box": p.column("box").cast(pa.list_(pa.float64())),
        "score": p.column("score").cast(pa.float64()),
        "extra": pa.array(range(40)),
    })
    write_bank(tmp_path / "b", **dict(inputs, patches=loose))
    chunked = pa.concat_tables([p.slice(0, 7), p.slice(7, 20), p.slice(27)])
    write_bank(tmp_path / "c", **dict(inputs, patches=chunked))
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b") == file_hashes(tmp_path / "c")


def test_rewrite_replaces_a_bank_and_leaves_other_files(tmp_path: Path) -> None:
    write_random_bank(tmp_path / "bank", n=30)
    (tmp_path / "bank" / ".build").mkdir()
    inputs = write_random_bank(tmp_path / "bank", n=60, seed=3)
    bank = PatchBank.open(tmp_path / "bank")
    assert len(bank) == 60 and np.array_equal(bank.pixels(np.arange(60)).numpy(), inputs["pixels"][expected_order(inputs["patches"])])
    assert (tmp_path / "bank" / ".build").is_dir()
    assert not list((tmp_path / "bank").glob(".*.tmp"))


def test_failed_write_leaves_the_previous_bank_intact(tmp_path: Path) -> None:
    write_random_bank(tmp_path / "bank", n=30)
    before = file_hashes(tmp_path / "bank")
    bad = random_inputs(n=30, seed=5)
    bad["embeddings"][7] *= 2
    with pytest.raises(InputError, match="input row 7 has norm 2"):
        write_bank(tmp_path / "bank", **bad)
    assert file_hashes(tmp_path / "bank") == before
    PatchBank.open(tmp_path / "bank")


@pytest.mark.parametrize("name", [*fmt.DATA_FILES, ".manifest.json.tmp"])
def test_full_disk_leaves_the_previous_bank_intact(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_random_bank(tmp_path / "bank", n=30)
    before = file_hashes(tmp_path / "bank")
    fill_disk_at(monkeypatch, bank_writer.STAGING, name)
    with pytest.raises(StorageError, match=f"cannot write .*/bank/.staging/{name}: No space left on device") as failed:
        write_random_bank(tmp_path / "bank", n=60, seed=3)
    assert failed.value.__cause__.errno == errno.ENOSPC
    assert file_hashes(tmp_path / "bank") == before  # no .staging/ (its space is free again), no .lock
    PatchBank.open(tmp_path / "bank")


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    write_random_bank(tmp_path / "bank", n=30)
    before = file_hashes(tmp_path / "bank")
    with Folder.open(tmp_path / "bank") as bank, bank_lock(bank, "a test"):
        with pytest.raises(BankLockedError, match=f"bank is being written by another process .a test, pid {os.getpid()} on "):
            write_random_bank(tmp_path / "bank", n=60, seed=3)
        assert file_hashes(tmp_path / "bank", hidden=False) == before
    write_random_bank(tmp_path / "bank", n=60, seed=3)  # the lock is free again
    assert len(PatchBank.open(tmp_path / "bank")) == 60 and not (tmp_path / "bank" / ".lock").exists()


def test_links_in_the_bank_folder_are_replaced_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / fmt.PIXELS).write_bytes(b"precious")
    before = (victim / fmt.PIXELS).stat().st_mtime_ns
    bank = tmp_path / "bank"
    bank.mkdir()
    (bank / ".staging").symlink_to(victim)
    for name in (fmt.PIXELS, fmt.MANIFEST):
        (bank / name).symlink_to(victim / fmt.PIXELS)
    inputs = write_random_bank(bank, n=30)
    assert sorted(p.name for p in victim.iterdir()) == [fmt.PIXELS] and (victim / fmt.PIXELS).read_bytes() == b"precious"
    assert (victim / fmt.PIXELS).stat().st_mtime_ns == before
    assert not any(p.is_symlink() for p in bank.iterdir()) and len(PatchBank.open(bank)) == len(inputs["pixels"])
    (bank / ".lock").symlink_to(victim / fmt.PIXELS)
    with pytest.raises(BankFormatError, match=r"bank/\.lock is a symbolic link; cmcaug never reads or writes a bank through one"):
        write_random_bank(bank, n=30)
    assert (victim / fmt.PIXELS).read_bytes() == b"precious"


def _edit(inputs: dict, **changes: object) -> dict:
    return dict(inputs, **changes)


BAD_INPUTS = {
    "pixels dtype": (lambda i: _edit(i, pixels=i["pixels"].astype(np.float32)), "pixels must be uint8"),
    "pixels not square": (lambda i: _edit(i, pixels=i["pixels"][:, :, :4]), r"\[N, P, P, 3\]"),
    "row counts differ": (lambda i: _edit(i, embeddings=i["embeddings"][:-1]), "one row per patch"),
    "embeddings dtype": (lambda i: _edit(i, embeddings=i["embeddings"].astype(np.float64)), "float16/float32"),
    "not normalized": (lambda i: _edit(i, embeddings=i["embeddings"] * 3), "L2-normalized"),
    "concept out of range": (lambda i: _edit(i, patches=i["patches"].set_column(2, "concept_id", pa.array(np.full(20, 9)))), r"\[0, 5\)"),
    "missing column": (lambda i: _edit(i, patches=i["patches"].drop_columns(["score"])), "lacks columns"),
    "null image": (lambda i: _edit(i, patches=i["patches"].set_column(1, "image", pa.array([None] * 20, pa.string()))), "null"),
    "short box": (lambda i: _edit(i, patches=i["patches"].set_column(3, "box", pa.array([[1.0, 2.0]] * 20))), "box"),
    "nan score": (lambda i: _edit(i, patches=i["patches"].set_column(0, "score", pa.array(np.full(20, np.nan, np.float32)))), "finite"),
    "not json": (lambda i: _edit(i, provenance={"detector": object()}), "JSON-serializable"),
    "not a table": (lambda i: _edit(i, patches=i["patches"].to_pylist()), "pyarrow.Table"),
    "not a vocab": (lambda i: _edit(i, vocab=VOCAB.names), "ConceptVocab"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_refused_and_nothing_is_published(tmp_path: Path, case: str) -> None:
    corrupt, message = BAD_INPUTS[case]
    with pytest.raises(InputError, match=message):
        write_bank(tmp_path / "bank", **corrupt(random_inputs(n=20)))
    assert not (tmp_path / "bank" / fmt.MANIFEST).exists()
    assert not list(tmp_path.glob("bank/.*.tmp"))
