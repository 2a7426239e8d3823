"""What `cmcaug tag-text` reads beyond one caption a row: COCO's `captions_*.json` and JSON lists, the fields
kept beside the caption (`--keep`, and the scalar fields of `.json` rows) and their column types, and a
caption field that the rows lack (a warning for `.jsonl`, refused for Parquet and `.json`)."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmcaug.cli.main import main
from cmcaug.concepts import ConceptVocab
from cmcaug.errors import InputError
from cmcaug.inputs import IndexedItems, parse_item
from cmcaug.text import corpus
from cmcaug.text.corpus import CaptionRow, MissingField, check_corpus, fits_column, read_captions
from cmcaug.text.grounding import GroundingTagger
from cmcaug.text.tags import TAGS_SCHEMA, tag_corpus

COCO = {
    "info": {"year": 2017}, "licenses": [],
    "images": [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 25, "file_name": "000000000025.jpg"}],
    "annotations": [{"image_id": 9, "id": 48, "caption": "A dog sleeping on a couch."},
                    {"image_id": 9, "id": 67, "caption": "Two cats and a remote."},
                    {"image_id": 25, "id": 3, "caption": "A giraffe eating leaves."}],
}


@pytest.fixture(scope="module")
def lookup() -> GroundingTagger:
    return GroundingTagger(ConceptVocab.default(), mode="lookup", batch_size=2)


def tag(tmp_path: Path, *args: str) -> int:
    """`cmcaug tag-text ARGS -o tmp_path/t.parquet --vocab default --mode lookup --no-progress`."""
    return main(["tag-text", *args, "-o", str(tmp_path / "t.parquet"), "--vocab", "default", "--mode", "lookup",
                 "--no-progress"])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["captions_val2017.json", "captions_val2017.json.gz"])
def test_coco_captions_json_keeps_image_id_and_id(tmp_path, capsys, name):
    text = json.dumps(COCO)
    if name.endswith(".gz"):
        with gzip.open(tmp_path / name, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert tag(tmp_path, str(tmp_path / name)) == 0
    assert "captions: 3" in capsys.readouterr().out
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.schema.remove_metadata() == pa.schema([*TAGS_SCHEMA, ("image_id", pa.int64()), ("id", pa.int64())])
    rows = table.to_pylist()
    assert [(r["source_row"], r["image_id"], r["id"], r["caption"]) for r in rows] == [
        (i, a["image_id"], a["id"], a["caption"]) for i, a in enumerate(COCO["annotations"])]
    vocab = ConceptVocab.default()
    assert [[s["concept_id"] for s in r["spans"]] for r in rows] == [
        [vocab.id("dog"), vocab.id("couch")], [vocab.id("cat"), vocab.id("remote")], [vocab.id("giraffe")]]


def test_readers_of_tags_files_take_the_kept_columns(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(COCO), encoding="utf-8")
    assert tag(tmp_path, str(tmp_path / "c.json")) == 0
    items = IndexedItems.of(tmp_path / "t.parquet", ConceptVocab.default())  # what CMCTransform.dataset returns
    row = items[1]
    assert (row["image_id"], row["id"], row["index"]) == (9, 67, 1)
    item = parse_item(row, 0)
    assert item.caption == "Two cats and a remote." and item.index == 1 and len(item.spans) == 2


def test_read_captions_gives_each_row_its_fields(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(COCO), encoding="utf-8")
    write_jsonl(tmp_path / "d.jsonl", [{"caption": "a kite", "url": "u1"}, {"caption": "a bus"}])
    rows = list(read_captions([tmp_path / "c.json", tmp_path / "d.jsonl"], keep=["url"]))
    assert rows[0] == CaptionRow(str(tmp_path / "c.json"), 0, "A dog sleeping on a couch.", {"image_id": 9, "id": 48})
    assert [r.fields for r in rows[3:]] == [{"url": "u1"}, {}]
    summary = check_corpus([tmp_path / "c.json", tmp_path / "d.jsonl"], keep=["url"])
    assert summary.rows is None and summary.fields == {"url": pa.string(), "image_id": pa.int64(), "id": pa.int64()}
    assert check_corpus([tmp_path / "c.json"]).rows == 3  # a .json corpus is counted, so progress knows its length


def test_a_json_list_keeps_its_scalar_fields_of_one_type(tmp_path, lookup):
    rows = [{"caption": "A man on a bike.", "image": "a.jpg", "image_id": "coco_1", "score": 1, "boxes": [[0, 0, 1, 1]]},
            {"caption": ["a bus", "a red bus"], "image": "b.jpg", "image_id": "coco_2", "score": 0.5, "mixed": 1},
            {"image": "c.jpg", "mixed": "one", "flag": True}]
    (tmp_path / "k.json").write_text(json.dumps(rows), encoding="utf-8")
    stats = tag_corpus([tmp_path / "k.json"], tmp_path / "t.parquet", lookup, progress=False)
    assert (stats["tagged"], stats["not_text"], stats["missing_field"]) == (1, 1, 1)  # a list of captions is no caption
    assert stats["kept_fields"] == ["image", "image_id", "score", "flag"]  # boxes: a list; mixed: int and str
    table = pq.read_table(tmp_path / "t.parquet")
    assert [table.schema.field(n).type for n in stats["kept_fields"]] == [pa.string(), pa.string(), pa.float64(), pa.bool_()]
    assert table.column("score").to_pylist() == [1.0, 0.5, None] and table.column("flag").to_pylist() == [None, None, True]
    assert stats["warnings"] == []  # 1 of 3 rows without "caption"


def test_keep_copies_jsonl_and_parquet_fields_typed_across_inputs(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"caption": "a dog", "url": "http://x/1", "width": 640, "sim": 0.3},
                                       {"caption": "a cat", "width": 480}])
    pq.write_table(pa.table({"caption": ["a kite"], "url": ["http://x/2"], "width": pa.array([320], pa.int32()),
                             "sim": pa.array([0.25], pa.float32()), "other": [1]}), tmp_path / "b.parquet")
    assert tag(tmp_path, str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"), "--keep", "url", "width",
               "--keep", "sim") == 0
    assert "kept_fields: url, width, sim" in capsys.readouterr().out
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.column_names == [*TAGS_SCHEMA.names, "url", "width", "sim"]
    assert [table.schema.field(n).type for n in ("url", "width", "sim")] == [pa.string(), pa.int64(), pa.float64()]
    assert table.select(["url", "width", "sim"]).to_pylist() == [
        {"url": "http://x/1", "width": 640, "sim": 0.3}, {"url": None, "width": 480, "sim": None},
        {"url": "http://x/2", "width": 320, "sim": 0.25}]


def test_a_kept_value_of_another_type_is_null_and_counted(tmp_path, lookup, monkeypatch, caplog):
    """A .jsonl file's kept fields are typed by its first rows; a later value of another type is not guessed at."""
    monkeypatch.setattr(corpus, "SAMPLE_ROWS", 2)
    write_jsonl(tmp_path / "a.jsonl", [{"caption": "a dog", "w": 1}, {"caption": "a dog", "w": 2.5},
                                       {"caption": "a dog", "w": "wide"}, {"caption": "a dog", "w": True},
                                       {"caption": "a dog", "w": 1 << 70}, {"caption": "a dog", "w": 7}])
    stats = tag_corpus([tmp_path / "a.jsonl"], tmp_path / "t.parquet", lookup, keep=["w"], progress=False)
    assert stats["bad_fields"] == 3 and stats["tagged"] == 6
    assert pq.read_table(tmp_path / "t.parquet").column("w").to_pylist() == [1.0, 2.5, None, None, None, 7.0]
    assert "a.jsonl:3: field 'w' holds 'wide', which a double column cannot; written as null" in caplog.text


@pytest.mark.parametrize(("column", "fitting", "unfitting"), [
    (pa.int64(), [None, 0, -(1 << 63), (1 << 63) - 1], [1.0, True, "1", 1 << 63, [1]]),
    (pa.float64(), [None, 1, 2.5, float("nan")], [True, "2.5", 1 << 64]),
    (pa.bool_(), [None, True, False], [0, 1.0, "true"]),
    (pa.string(), [None, "", "caf\u00e9", "\U0001f436"], [1, b"x", "\udc80", "a \ud800"])])
def test_fits_column(column, fitting, unfitting):
    assert all(fits_column(v, column) for v in fitting) and not any(fits_column(v, column) for v in unfitting)


def test_fields_that_cannot_be_kept_are_refused_before_any_work(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"caption": "a dog", "id": 1, "tags": ["x"]}, {"caption": "a cat", "id": "two"}])
    pq.write_table(pa.table({"caption": ["a dog"], "id": ["p1"], "when": pa.array([0], pa.timestamp("s"))}),
                   tmp_path / "b.parquet")
    write_jsonl(tmp_path / "c.jsonl", [{"caption": "a dog", "id": 1}])
    a, b, c = (str(tmp_path / n) for n in ("a.jsonl", "b.parquet", "c.jsonl"))
    cases = [([a, "--keep", "tags"], "field 'tags' holds values of no one type (not a number, boolean or string)"),
             ([a, "--keep", "id"], "field 'id' holds values of no one type (both int64 and string)"),
             ([c, b, "--keep", "id"], "field 'id' holds int64 in"),
             ([b, "--keep", "when"], "column 'when' is timestamp["),
             ([c, "--keep", "url"], "no input has the field(s) ['url'] to keep; they have ['caption', 'id']"),
             ([c, "--keep", "source", "index"], "cannot keep ['source', 'index']"),
             ([c, "--keep", "caption"], "cannot keep ['caption']")]
    for args, message in cases:
        assert tag(tmp_path, *args) == 3, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "t.parquet").exists()


def test_json_files_that_are_not_captions_are_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.json").write_text('{"annotations": [', encoding="utf-8")
    (tmp_path / "instances.json").write_text(json.dumps({"images": [], "categories": []}), encoding="utf-8")
    (tmp_path / "text.json").write_text(json.dumps(COCO), encoding="utf-8")
    assert tag(tmp_path, str(tmp_path / "bad.json")) == 3
    assert "bad.json: not valid JSON" in capsys.readouterr().err
    assert tag(tmp_path, str(tmp_path / "instances.json")) == 3
    err = capsys.readouterr().err
    assert "expected COCO captions" in err and "found an object with keys ['images', 'categories']" in err
    assert tag(tmp_path, str(tmp_path / "text.json"), "--field", "text") == 3
    assert "no row has a field 'text'; the rows have ['image_id', 'id', 'caption']" in capsys.readouterr().err
    monkeypatch.setattr(corpus, "JSON_FILE_CHARS", 100)
    assert tag(tmp_path, str(tmp_path / "text.json")) == 3
    assert "a .json corpus is read whole: write its rows to a .jsonl file" in capsys.readouterr().err


def test_a_caption_field_no_jsonl_row_has_is_a_warning_after_the_tables(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"caption": "a dog", "image": "a.jpg"}, {"caption": "a cat", "url": "u"}])
    args = [str(tmp_path / "a.jsonl"), "--field", "text", "-o", str(tmp_path / "t.parquet"), "--vocab", "default",
            "--mode", "lookup", "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "cmcaug.cli.main", "tag-text", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert done.returncode == 0, done.stdout
    warning = ("cmcaug tag-text: warning: none of the 2 rows has a field 'text' (they have 'caption', 'image', 'url'), "
               "so nothing was tagged; choose the caption field with --field (field= in Python)")
    assert done.stdout.count("has a field 'text'") == 1  # printed once, not logged as well
    assert done.stdout.rstrip().endswith(warning) and "missing_field: 2" in done.stdout
    assert pq.read_table(tmp_path / "t.parquet").column("caption").to_pylist() == [None, None]


@pytest.mark.parametrize(("lacking", "warned"), [(3, "3 of 4 rows have no field 'caption'"), (2, None)])
def test_a_caption_field_most_rows_lack_is_a_warning(tmp_path, lookup, caplog, lacking, warned):
    rows = [{"text": f"a dog {i}", "id": i} for i in range(lacking)] + [{"caption": "a dog"}] * (4 - lacking)
    write_jsonl(tmp_path / "a.jsonl", rows)
    stats = tag_corpus([tmp_path / "a.jsonl"], tmp_path / "t.parquet", lookup, progress=False)
    assert stats["missing_field"] == lacking and stats["tagged"] == 4 - lacking
    if warned:
        assert stats["warnings"] == [f"{warned} (they have 'text', 'id') and got no tags; choose the caption field with "
                                     "--field (field= in Python)"]
        assert stats["warnings"][0] in caplog.text  # Python callers see it in their log
    else:
        assert stats["warnings"] == [] and "no field" not in caplog.text


def test_missing_field_rows_name_their_fields(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {}, 5])
    assert [r.value for r in read_captions([tmp_path / "a.jsonl"])] == [MissingField(("text",)), MissingField(()), None]
    with pytest.raises(InputError, match="no such corpus file"):
        check_corpus([tmp_path / "b.jsonl"])
