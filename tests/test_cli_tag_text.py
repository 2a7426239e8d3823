"""`cmcaug tag-text` and the corpus tagger behind it (`cmcaug.text.tags.tag_corpus`): formats, streaming,
row ids, bad rows, the tags file's schema and metadata, and `--bank`."""
from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmcaug.cli.main import main
from cmcaug.concepts import ConceptVocab
from cmcaug.errors import InputError
from cmcaug.synth import make_corpus
from cmcaug.text.corpus import UNREADABLE, MissingField, read_captions
from cmcaug.text.grounding import GroundingTagger
from cmcaug.text.tags import TAGS_SCHEMA, tag_corpus


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The shapes world's captions.jsonl and vocab.json (captions name every object)."""
    return make_corpus(tmp_path_factory.mktemp("shapes"), n_images=12, seed=3, image_size=64)


@pytest.fixture(scope="module")
def lookup() -> GroundingTagger:
    return GroundingTagger(ConceptVocab.default(), mode="lookup", batch_size=3)


def read_tags(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_shapes_corpus_end_to_end(shapes, tmp_path, capsys):
    out = tmp_path / "tags.parquet"
    code = main(["tag-text", str(shapes.captions), "-o", str(out), "--vocab", str(shapes.root / "vocab.json"),
                 "--mode", "lookup", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "captions: 12" in printed and "grounded: 12" in printed and "concept" in printed
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == TAGS_SCHEMA
    span = pa.struct([("start", pa.int32()), ("end", pa.int32()), ("concept_id", pa.int32())])
    assert table.schema.field("spans").type == pa.list_(span)
    assert table.schema.field("caption").type == pa.string() and table.schema.field("row_id").type == pa.int64()
    assert json.loads(table.schema.metadata[b"cmcaug.vocab"]) == ConceptVocab.from_json(shapes.root / "vocab.json").to_dict()
    assert json.loads(table.schema.metadata[b"cmcaug.tagger"])["mode"] == "lookup"
    rows = table.to_pylist()
    captions = [json.loads(line)["caption"] for line in shapes.captions.read_text().splitlines()]
    assert [r["caption"] for r in rows] == captions and [r["row_id"] for r in rows] == list(range(12))
    vocab = ConceptVocab.from_json(shapes.root / "vocab.json")
    for row in rows:
        assert row["spans"], row  # every shapes caption names its objects
        for span in row["spans"]:
            assert vocab.surface_forms[row["caption"][span["start"]:span["end"]].lower()] == span["concept_id"]


def test_every_format_bad_rows_and_row_ids(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("A dog on a sofa.\n\n   \nTwo cats\n", encoding="utf-8")
    jsonl = tmp_path / "b.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:  # a byte-order mark, as some editors write
        f.write('\ufeff{"caption": "a man with a bike"}\n{"caption": 5}\nnot json\n{"text": "x"}\n["a dog"]\n')
    parquet = tmp_path / "c.parquet"
    long_caption = "a dog " * 20
    pq.write_table(pa.table({"caption": ["Pizza &amp; a  TV", None, long_caption, "nothing here"]}), parquet)
    tagger = GroundingTagger(ConceptVocab.default(), mode="lookup", batch_size=2, max_chars=100)
    stats = tag_corpus([txt, jsonl, parquet], tmp_path / "out" / "tags.parquet", tagger, batch_rows=3, progress=False)
    kinds = ("captions", "tagged", "grounded", "spans", "empty", "missing_field", "not_text", "unreadable", "too_long")
    assert {k: stats[k] for k in kinds} == {"captions": 13, "tagged": 5, "grounded": 4, "spans": 7, "empty": 2,
                                            "missing_field": 1, "not_text": 3, "unreadable": 1, "too_long": 1}
    assert stats["warnings"] == [] and stats["kept_fields"] == []  # 1 of 5 JSON rows without "caption": no warning
    assert stats["spans_per_concept"]["dog"] == 1 and stats["spans_per_concept"]["pizza"] == 1
    rows = read_tags(tmp_path / "out" / "tags.parquet")
    assert [r["row_id"] for r in rows] == list(range(13))
    assert [(Path(r["source"]).name, r["source_row"]) for r in rows][3:6] == [("a.txt", 3), ("b.jsonl.gz", 0), ("b.jsonl.gz", 1)]
    assert [r["caption"] for r in rows][4:9] == ["a man with a bike", None, None, None, None]
    assert rows[10]["caption"] is None and rows[11]["caption"] is None and rows[11]["spans"] == []  # too long: not kept
    spans = {r["row_id"]: [(r["caption"][s["start"]:s["end"]], s["concept_id"]) for s in r["spans"]] for r in rows}
    vocab = ConceptVocab.default()
    assert spans[0] == [("dog", vocab.id("dog")), ("sofa", vocab.id("couch"))]
    assert spans[9] == [("Pizza", vocab.id("pizza")), ("TV", vocab.id("tv"))]  # offsets index the raw caption
    assert not list(tmp_path.glob("out/.tags.parquet.tmp*"))


def test_read_captions_yields_every_row_as_it_holds_it(tmp_path):
    (tmp_path / "a.txt").write_text("\ufeffA dog.\n\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "a cat"}\nnot json\n{"caption": "x"}\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["a kite", None]}), tmp_path / "c.parquet")
    rows = list(read_captions([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"], "text", batch_rows=1))
    assert [(Path(r.source).name, r.source_row) for r in rows] == [
        ("a.txt", 0), ("a.txt", 1), ("b.jsonl", 0), ("b.jsonl", 1), ("b.jsonl", 2), ("c.parquet", 0), ("c.parquet", 1)]
    assert [r.value for r in rows] == ["A dog.", "", "a cat", UNREADABLE, MissingField(("caption",)), "a kite", None]
    assert all(r.fields == {} for r in rows)  # nothing kept
    with pytest.raises(InputError, match="no such caption file"):
        next(read_captions([tmp_path / "missing.txt"]))


def test_large_input_streams_in_batches(tmp_path, lookup, capsys):
    rows = 2500
    captions = [f"{i} dogs and a cat" if i % 3 else "" for i in range(rows)]
    pq.write_table(pa.table({"text": captions}), tmp_path / "big.parquet", row_group_size=700)
    stats = tag_corpus([tmp_path / "big.parquet"], tmp_path / "tags.parquet", lookup, field="text", batch_rows=512)
    assert stats["captions"] == rows and stats["empty"] == (rows + 2) // 3 and stats["spans"] == 2 * stats["tagged"]
    assert "tag-text: 100%" in capsys.readouterr().err  # the progress bar knows a Parquet corpus's length
    file = pq.ParquetFile(tmp_path / "tags.parquet")
    assert file.metadata.num_rows == rows and file.metadata.num_row_groups == -(-rows // 512)  # written batch by batch
    ids = file.read(columns=["row_id"]).column(0).to_numpy()
    assert np.array_equal(ids, np.arange(rows))


def test_parquet_is_read_batch_by_batch(tmp_path):
    captions = [f"caption {i} " + "x" * 200 for i in range(20_000)]  # about 4.4 MB of text
    pq.write_table(pa.table({"caption": captions}), tmp_path / "a.parquet", row_group_size=1000)
    before = pa.total_allocated_bytes()
    rows = read_captions([tmp_path / "a.parquet"], batch_rows=500)
    assert next(rows)[1:] == (0, captions[0], {})
    assert pa.total_allocated_bytes() - before < 1_500_000  # one row group's worth, not the column


def test_memory_stays_bounded_over_long_runs_of_untagged_rows(tmp_path):
    """Untagged rows wait behind tagged ones for order; they must not pile up while the tagger reads on."""
    (tmp_path / "c.txt").write_text("a dog\n" + "\n" * 10_000 + "a dog\n")
    tagger = GroundingTagger(ConceptVocab({"dog": []}), mode="lookup", batch_size=64)
    tracemalloc.start()
    try:
        stats = tag_corpus([tmp_path / "c.txt"], tmp_path / "t.parquet", tagger, batch_rows=256, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats["captions"] == 10_002 and stats["empty"] == 10_000 and stats["spans"] == 2
    assert peak < 3_000_000  # holding every empty row took > 10 MB


def test_bad_inputs_exit_with_input_error(tmp_path, capsys):
    (tmp_path / "a.csv").write_text("dog\n")
    (tmp_path / "c.parquet").write_bytes(b"")
    pq.write_table(pa.table({"text": ["a dog"]}), tmp_path / "d.parquet")
    base = ["-o", str(tmp_path / "t.parquet"), "--vocab", "default", "--mode", "lookup", "--no-progress"]
    assert main(["tag-text", str(tmp_path / "missing.txt"), *base]) == 3
    assert main(["tag-text", str(tmp_path / "a.csv"), *base]) == 3
    assert main(["tag-text", str(tmp_path / "c.parquet"), *base]) == 3
    assert main(["tag-text", str(tmp_path / "d.parquet"), *base]) == 3
    err = capsys.readouterr().err
    assert "no such corpus file" in err and "unknown corpus format" in err and "no column 'caption'" in err
    assert main(["tag-text", str(tmp_path / "d.parquet"), *base[:-5], "--bank", str(tmp_path / "nobank")]) == 4
    assert main(["tag-text", str(tmp_path / "d.parquet"), *base[2:], "--field", "text", "-o", str(tmp_path / "d.parquet")]) == 3
    assert pq.read_table(tmp_path / "d.parquet").column_names == ["text"]  # the input is left alone
    assert not (tmp_path / "t.parquet").exists()


def test_every_input_is_checked_before_any_work(tmp_path, lookup):
    (tmp_path / "a.txt").write_text("a dog\n")
    pq.write_table(pa.table({"text": ["a dog"]}), tmp_path / "b.parquet")
    out = tmp_path / "out" / "t.parquet"
    with pytest.raises(InputError, match="no column 'caption'"):  # a Parquet input after a text one included
        tag_corpus([tmp_path / "a.txt", tmp_path / "b.parquet"], out, lookup, progress=False)
    assert not out.parent.exists()


def test_vocabulary_from_a_bank(tmp_path, capsys):
    from cmcaug.bank.writer import write_bank

    vocab = ConceptVocab({"dog": ["puppy"], "kite": []})
    patches = pa.table({"concept_id": pa.array([0, 1], pa.int32()), "image": ["a.png", "b.png"],
                        "box": pa.array([[0, 0, 4, 4]] * 2, pa.list_(pa.float32(), 4)), "score": pa.array([1, 1], pa.float32())})
    embeddings = np.eye(2, 4, dtype=np.float32)
    write_bank(tmp_path / "bank", vocab=vocab, patches=patches, pixels=np.zeros((2, 4, 4, 3), np.uint8),
               embeddings=embeddings, provenance={}, stats={})
    (tmp_path / "c.txt").write_text("A puppy and a kite.\nA cat.\n")
    assert main(["tag-text", str(tmp_path / "c.txt"), "-o", str(tmp_path / "t.parquet"), "--bank", str(tmp_path / "bank"),
                 "--mode", "lookup", "--no-progress"]) == 0
    rows = read_tags(tmp_path / "t.parquet")
    assert [[s["concept_id"] for s in r["spans"]] for r in rows] == [[0, 1], []]
    assert "kite" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--n-process", "0"], ["--batch-size", "0"], ["--max-chars", "0"]])
def test_numbers_out_of_range_are_bad_usage(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        main(["tag-text", "x.jsonl", "-o", str(tmp_path / "t.parquet"), "--vocab", "default", *flags])
    assert refused.value.code == 2 and f"argument {flags[0]}: must be >= 1, got 0" in capsys.readouterr().err


def test_a_model_for_lookup_mode_is_bad_usage(tmp_path, capsys):
    code = main(["tag-text", "x.jsonl", "-o", str(tmp_path / "t.parquet"), "--vocab", "default", "--mode", "lookup",
                 "--model", "en_core_web_sm"])
    assert code == 2 and "cmcaug tag-text: error: --model is the spaCy pipeline of --mode tagger" in capsys.readouterr().err
