"""Caption corpora with faults, for `cmcaug tag-text`: text that is not UTF-8 (undecodable bytes, JSON escapes
of lone surrogates) in every input format, and captions of any length, which must neither crash a run nor
grow its memory. Each bad row is counted by kind; the other rows are tagged and written."""
from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmcaug.cli.main import main
from cmcaug.concepts import ConceptVocab
from cmcaug.text import corpus
from cmcaug.text.corpus import TOO_LONG, UNREADABLE, json_line_chars, read_captions
from cmcaug.text.grounding import GroundingTagger
from cmcaug.text.tags import tag_corpus

KINDS = ("captions", "tagged", "grounded", "empty", "not_text", "unreadable", "too_long")


@pytest.fixture(scope="module")
def lookup() -> GroundingTagger:
    return GroundingTagger(ConceptVocab.default(), mode="lookup", batch_size=2)


def values(paths: list[Path], **kwargs) -> list:
    return [row.value for row in read_captions(paths, **kwargs)]


def test_a_lone_surrogate_escape_is_unreadable_and_the_rest_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    lines = ['{"caption": "a dog"}', '{"caption": "a cat \\ud800 on a sofa"}', '{"caption": "two dogs \\ud83d\\udc36"}',
             '{"caption": "\\udfff"}', '{"caption": "a kite"}']
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="ascii")
    out = tmp_path / "tags.parquet"
    assert main(["tag-text", str(tmp_path / "c.jsonl"), "-o", str(out), "--vocab", "default", "--mode", "lookup",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "unreadable: 2" in printed and "tagged: 3" in printed
    assert "c.jsonl:2: not valid UTF-8" in caplog.text and "c.jsonl:4: not valid UTF-8" in caplog.text
    rows = pq.read_table(out).to_pylist()
    assert [r["caption"] for r in rows] == ["a dog", None, "two dogs \U0001f436", None, "a kite"]  # a surrogate pair is fine
    assert [[r["caption"][s["start"]:s["end"]] for s in r["spans"]] for r in rows] == [["dog"], [], ["dogs"], [], ["kite"]]


def test_bytes_that_are_not_utf8_are_unreadable_in_every_format(tmp_path: Path, lookup: GroundingTagger) -> None:
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfa dog\nla caf\xe9 et le chien\n\xff\xfe\nan \xc3\xa9l\xc3\xa9phant and a cat\n")
    with gzip.open(tmp_path / "b.txt.gz", "wb") as f:
        f.write(b"a cat\r\n\x80 dog\r\n")
    (tmp_path / "c.jsonl").write_bytes(b'{"caption": "a bike \xff"}\n{"caption": "a bike", "url": "\xff"}\n')
    broken = pa.array([b"a dog", b"a \xc3( cat", None, b"a kite"]).view(pa.string())  # written without validation
    pq.write_table(pa.table({"caption": broken}), tmp_path / "d.parquet", row_group_size=2)
    paths = [tmp_path / n for n in ("a.txt", "b.txt.gz", "c.jsonl", "d.parquet")]
    assert values(paths) == ["a dog", UNREADABLE, UNREADABLE, "an \u00e9l\u00e9phant and a cat", "a cat", UNREADABLE,
                             UNREADABLE, "a bike", "a dog", UNREADABLE, None, "a kite"]  # a bad byte elsewhere in JSON is not the caption's
    stats = tag_corpus(paths, tmp_path / "t.parquet", lookup, progress=False)
    assert {k: stats[k] for k in KINDS} == {"captions": 12, "tagged": 6, "grounded": 6, "empty": 0, "not_text": 1,
                                            "unreadable": 5, "too_long": 0}
    assert [r["caption"] for r in pq.read_table(tmp_path / "t.parquet").to_pylist()][:4] == ["a dog", None, None,
                                                                                           "an \u00e9l\u00e9phant and a cat"]


def test_kept_fields_and_json_files_that_are_not_utf8(tmp_path: Path, lookup: GroundingTagger,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A .json file is decoded like a text file: a bad byte makes its caption unreadable, or its kept string null."""
    (tmp_path / "c.jsonl").write_bytes(b'{"caption": "a bike", "url": "\xff"}\n{"caption": "a bike", "url": "\\udc80"}\n')
    (tmp_path / "d.json").write_bytes(b'{"annotations": [{"caption": "a \xff dog", "id": 1, "url": "u"}, '
                                      b'{"caption": "a cat", "id": 2, "url": "\xfe"}]}')
    paths = [tmp_path / "c.jsonl", tmp_path / "d.json"]
    stats = tag_corpus(paths, tmp_path / "t.parquet", lookup, keep=["url"], progress=False)
    assert {k: stats[k] for k in ("captions", "tagged", "unreadable", "bad_fields")} == {
        "captions": 4, "tagged": 3, "unreadable": 1, "bad_fields": 3}
    assert "c.jsonl:1: field 'url' holds '\\udcff', which a string column cannot; written as null" in caplog.text
    rows = pq.read_table(tmp_path / "t.parquet").select(["caption", "url", "id"]).to_pylist()
    assert rows == [{"caption": "a bike", "url": None, "id": None}, {"caption": "a bike", "url": None, "id": None},
                    {"caption": None, "url": "u", "id": 1}, {"caption": "a cat", "url": None, "id": 2}]


def test_over_long_rows_are_too_long_in_every_format(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a dog\n" + "x" * 11 + "\n" + "y" * 10 + "\r\n\n" + "z" * 30, encoding="utf-8")
    limit = json_line_chars(10)
    assert limit == 1 << 20 and json_line_chars(100_000) == 1_600_000
    padding = "p" * limit  # a short caption on a line over the limit: the line is not parsed
    (tmp_path / "b.jsonl").write_text(f'{{"caption": "{"c" * 11}"}}\n{{"caption": "a cat", "x": "{padding}"}}\n'
                                      f'{{"caption": "a cat", "x": "{padding[:limit - 40]}"}}\n', encoding="utf-8")
    pq.write_table(pa.table({"caption": ["a kite", "k" * 11]}), tmp_path / "c.parquet")
    paths = [tmp_path / n for n in ("a.txt", "b.jsonl", "c.parquet")]
    assert values(paths, max_chars=10) == ["a dog", TOO_LONG, "y" * 10, "", TOO_LONG, TOO_LONG, TOO_LONG, "a cat", "a kite",
                                           TOO_LONG]
    assert values(paths)[1] == "x" * 11  # no max_chars: rows as they are


def test_parquet_batches_shrink_to_a_byte_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    captions = [f"{i} " + "w" * 98 for i in range(50)]
    pq.write_table(pa.table({"caption": captions, "other": list(range(50))}), tmp_path / "a.parquet", row_group_size=20)
    sizes: list[int] = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, batch_size, **kwargs):
        sizes.append(batch_size)
        return iter_batches(self, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(corpus, "PARQUET_BATCH_BYTES", 1_000)
    assert values([tmp_path / "a.parquet"], batch_rows=64) == captions
    assert 5 <= sizes[-1] <= 10  # about 1,000 bytes of 100-character values
    monkeypatch.setattr(corpus, "PARQUET_BATCH_BYTES", 1 << 30)
    assert values([tmp_path / "a.parquet"], batch_rows=64) == captions and sizes[-1] == 64


def test_max_chars_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.txt").write_text("a dog\n" + "a dog " * 3 + "\n")
    base = ["tag-text", str(tmp_path / "c.txt"), "-o", str(tmp_path / "t.parquet"), "--vocab", "default", "--mode", "lookup",
            "--no-progress"]
    assert main([*base, "--max-chars", "10"]) == 0
    assert "too_long: 1" in capsys.readouterr().out
    assert main(base) == 0 and "too_long: 0" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # a usage error (tests/test_cli_tag_text.py), exit 2
        main([*base, "--max-chars", "0"])
    assert refused.value.code == 2


CHILD = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from cmcaug.concepts import ConceptVocab
    from cmcaug.text.grounding import GroundingTagger
    from cmcaug.text.tags import tag_corpus

    folder = Path(sys.argv[1])
    tagger = GroundingTagger(ConceptVocab.default(), mode="lookup")
    tag_corpus([folder / "warm.txt"], folder / "warm.parquet", tagger, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = tag_corpus([folder / "a.txt.gz", folder / "b.jsonl.gz"], folder / "t.parquet", tagger, keep=["id"],
                       progress=False)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(stats["captions"], stats["tagged"], stats["too_long"], grown // 1024)
""")


def test_memory_does_not_grow_with_caption_length(tmp_path: Path) -> None:
    """Captions of 64 million characters (gzip keeps the files small) are skipped a piece at a time: the
    run's peak memory grows by a few MB, where reading one such line whole takes 64 MB and more."""
    piece = "a dog " * 1_000_000
    (tmp_path / "warm.txt").write_text("a dog\n")
    with gzip.open(tmp_path / "a.txt.gz", "wt", compresslevel=1) as f:
        f.write(f"a dog\n{piece * 11}\na dog\n{piece * 11}\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", compresslevel=1) as f:
        f.write(f'{{"caption": "{piece * 11}", "id": 1}}\n{{"caption": "a cat", "id": 2}}\n')  # --keep id reads its first rows too
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    captions, tagged, too_long, grown_mb = map(int, done.stdout.split())
    assert (captions, tagged, too_long) == (6, 3, 3)
    assert grown_mb < 32, f"peak memory grew by {grown_mb} MB"
