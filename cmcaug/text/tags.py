"""Tagging a caption corpus into a Parquet tags file, streaming, so a corpus larger than memory works.

Inputs (`read_captions` streams them, in the order given): `.txt` (one caption a line), `.jsonl` (a
string field of each object) and `.parquet` (a string column); `.txt.gz` and `.jsonl.gz` too. The tags
file has one row per input row, in input order, so it joins back to the corpus by position or by `row_id`:

| column | type | meaning |
|---|---|---|
| `row_id` | int64 | 0-based index of the row across all inputs, in the order given |
| `source` | string | the input file the row came from (as given) |
| `source_row` | int64 | 0-based line (txt, jsonl) or row (parquet) within that file |
| `caption` | string | the caption; null when the row was not tagged for any reason but `empty` |
| `spans` | list<struct<start: int32, end: int32, concept_id: int32>> | grounded spans, character offsets into `caption` |

Rows that are not tagged keep an empty `spans` list, each kind counted in the returned stats: `empty`
(empty or blank captions), `not_text` (values that are not strings), `unreadable` (a JSON line that
does not parse; a caption that is not valid UTF-8: undecodable bytes, or a JSON escape of a lone
surrogate such as "\\ud800") and `too_long` (longer than the tagger's `max_chars`). Their captions are
not written: an over-long one could be any size, and an unreadable one has no UTF-8 spelling.

Memory does not grow with the input: text files are read a line at a time and an over-long line is
skipped in pieces, never held whole (a `.jsonl` line may hold up to `json_line_chars(max_chars)`
characters, room for an escaped caption of `max_chars` and the object's other fields); Parquet is read
in record batches of at most `PARQUET_BATCH_BYTES` of the caption column (a batch holds one row
at least, so the longest Parquet value is read whole).

The schema metadata records the vocabulary (`cmcaug.vocab`, JSON) and the tagger (`cmcaug.tagger`), so a
reader can check that concept ids mean what its bank means by them. The file appears atomically: it is
written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from .grounding import LONE_SURROGATE, GroundingTagger

log = logging.getLogger(__name__)

SPAN_TYPE = pa.struct([("start", pa.int32()), ("end", pa.int32()), ("concept_id", pa.int32())])
TAGS_SCHEMA = pa.schema([("row_id", pa.int64()), ("source", pa.string()), ("source_row", pa.int64()),
                         ("caption", pa.string()), ("spans", pa.list_(SPAN_TYPE))])
SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")
UNREADABLE = object()  # what `read_captions` yields for a JSON line that does not parse or a caption that is not UTF-8
TOO_LONG = object()  # what `read_captions` yields for a caption (or .jsonl line) over its `max_chars`
PARQUET_BATCH_BYTES = 64 << 20  # of the caption column per record batch read: 8,192 rows of COCO captions are 0.5 MB
_SKIP_CHARS = 1 << 20  # an over-long line is skipped this many characters at a time


def json_line_chars(max_chars: int) -> int:
    """The longest `.jsonl` line read for captions of `max_chars`: 16 characters a caption character (a JSON
    escape of an emoji takes 12), and at least 1 Mi, for the object's other fields."""
    return max(16 * max_chars, 1 << 20)


def _kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise InputError(f"{path}: unknown corpus format; expected a file ending in {', '.join(SUFFIXES)}")


def _open_text(path: Path) -> TextIO:
    """`path` as text; a byte that is not UTF-8 becomes a lone surrogate (U+DC80..U+DCFF), which `read_captions` finds."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape")
    return open(path, encoding="utf-8-sig", errors="surrogateescape")  # noqa: SIM115 - closed by the caller's `with`


class CaptionRow(NamedTuple):
    """One row of a caption corpus: the input file (as given), the row's 0-based line (txt, jsonl) or row
    (parquet) within it, and whatever the row holds (`UNREADABLE` or `TOO_LONG`: see `read_captions`)."""

    source: str
    source_row: int
    value: Any


def read_captions(paths: Sequence[str | Path], field: str = "caption", *, batch_rows: int = 8192,
                  max_chars: int | None = None) -> Iterator[CaptionRow]:
    """Every row of every caption file of `paths`, in order: `.txt` lines, the `field` of `.jsonl` objects, the
    `field` column of `.parquet` files (`.txt.gz` and `.jsonl.gz` too).

    Streams, so a corpus larger than memory works: text line by line (a leading byte-order mark skipped),
    Parquet in record batches of at most `batch_rows`. A row's value is not checked beyond this: it may be
    None, a number or a blank string (a JSON object without `field` gives None). It is `UNREADABLE` for a
    JSON line that does not parse and for a caption that is not valid UTF-8 (an undecodable byte, or a JSON
    escape of a lone surrogate), and with `max_chars`, `TOO_LONG` for a caption longer than that (or a
    `.jsonl` line longer than `json_line_chars(max_chars)`), which a text file never holds in memory whole.
    """
    for raw in paths:
        path = Path(raw)
        kind = _kind(path)
        if not path.is_file():
            raise InputError(f"{path}: no such caption file")
        values = _read_parquet(path, field, batch_rows) if kind == ".parquet" else _read_text(path, kind, field, max_chars)
        for row, value in enumerate(values):
            yield CaptionRow(str(raw), row, _checked(value, max_chars, path, row))


def _checked(value: Any, max_chars: int | None, path: Path, row: int) -> Any:
    """`value`, or `TOO_LONG` / `UNREADABLE` for a string over `max_chars` / holding a lone surrogate."""
    if not isinstance(value, str):
        return value
    if max_chars is not None and len(value) > max_chars:
        return TOO_LONG
    if not value.isascii() and LONE_SURROGATE.search(value):
        log.warning("%s:%d: not valid UTF-8 (an undecodable byte, or an escaped lone surrogate); the row gets no tags",
                    path, row + 1)
        return UNREADABLE
    return value


def _read_text(path: Path, kind: str, field: str, max_chars: int | None) -> Iterator[Any]:
    """Each line of a text file (the `field` of each object in a `.jsonl` file), over-long lines as `TOO_LONG`."""
    json_lines = kind.startswith(".jsonl")
    limit = max_chars if max_chars is None or not json_lines else json_line_chars(max_chars)
    with _open_text(path) as f:
        for row, line in enumerate(_lines(f, limit)):
            yield _json_field(line, field, path, row) if json_lines and line is not TOO_LONG else line


def _lines(f: TextIO, limit: int | None) -> Iterator[Any]:
    """Each line of `f` without its newline; `TOO_LONG` for a line over `limit` characters, skipped in pieces."""
    while line := f.readline(-1 if limit is None else limit + 1):
        if limit is None or len(line) <= limit or line.endswith("\n"):
            yield line[:-1] if line.endswith("\n") else line
            continue
        while line and not line.endswith("\n"):
            line = f.readline(_SKIP_CHARS)
        yield TOO_LONG


def _json_field(line: str, field: str, path: Path, row: int) -> Any:
    if not line.strip():
        return ""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        log.warning("%s:%d: not valid JSON (%s); the row gets no tags", path, row + 1, exc)
        return UNREADABLE
    return obj.get(field) if isinstance(obj, dict) else None


def _parquet_file(path: Path, field: str) -> pq.ParquetFile:
    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc
    if field not in file.schema_arrow.names:
        raise InputError(f"{path}: no column {field!r}; it has {file.schema_arrow.names}; choose one with --field")
    return file


def _batch_rows(file: pq.ParquetFile, field: str, batch_rows: int) -> int:
    """`batch_rows`, or fewer so that a record batch of column `field` holds about `PARQUET_BATCH_BYTES`, from the
    row group whose values are the longest on average (the row groups' uncompressed sizes)."""
    meta, widest = file.metadata, 1.0
    for group in map(meta.row_group, range(meta.num_row_groups)):
        for column in map(group.column, range(group.num_columns)):
            if column.path_in_schema == field and group.num_rows:
                widest = max(widest, column.total_uncompressed_size / group.num_rows)
    return max(1, min(batch_rows, int(PARQUET_BATCH_BYTES / widest)))


def _read_parquet(path: Path, field: str, batch_rows: int) -> Iterator[Any]:
    """The `field` column's values, in record batches (`_batch_rows`); a value that is not UTF-8 is read as
    bytes and decoded with surrogateescape, so that only its row is unreadable."""
    file = _parquet_file(path, field)
    for batch in file.iter_batches(batch_size=_batch_rows(file, field, batch_rows), columns=[field]):
        try:
            values = batch.column(0).to_pylist()
        except UnicodeDecodeError:
            values = [v if v is None else v.decode("utf-8", "surrogateescape")
                      for v in batch.column(0).cast(pa.large_binary()).to_pylist()]
        yield from values


def _check_inputs(paths: Sequence[str | Path], field: str) -> int | None:
    """Refuse missing, unknown or unreadable inputs before any work; the total rows if all are Parquet."""
    if not paths:
        raise InputError("tag_corpus needs at least one corpus file")
    rows: int | None = 0
    for raw in paths:
        path = Path(raw)
        kind = _kind(path)
        if not path.is_file():
            raise InputError(f"{path}: no such corpus file")
        # Every Parquet input is opened, after a text input too, so its column is checked before any work.
        num_rows = _parquet_file(path, field).metadata.num_rows if kind == ".parquet" else None
        rows = None if rows is None or num_rows is None else rows + num_rows
    return rows


class _TagsWriter:
    """Buffers output rows and writes them as record batches of `batch_rows`."""

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int):
        self.writer = pq.ParquetWriter(path, schema)
        self.schema, self.batch_rows = schema, batch_rows
        self._clear()

    def _clear(self) -> None:
        self.row_id: list[int] = []
        self.source: list[str] = []
        self.source_row: list[int] = []
        self.caption: list[str | None] = []
        self.offsets: list[int] = [0]
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.ids: list[int] = []

    def add(self, row_id: int, source: str, source_row: int, caption: str | None, spans: Sequence[Any]) -> None:
        self.row_id.append(row_id)
        self.source.append(source)
        self.source_row.append(source_row)
        self.caption.append(caption)
        for s in spans:
            self.starts.append(s[0])
            self.ends.append(s[1])
            self.ids.append(s[2])
        self.offsets.append(len(self.ids))
        if len(self.row_id) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if not self.row_id:
            return
        structs = pa.StructArray.from_arrays(
            [pa.array(self.starts, pa.int32()), pa.array(self.ends, pa.int32()), pa.array(self.ids, pa.int32())],
            fields=list(SPAN_TYPE))
        spans = pa.ListArray.from_arrays(pa.array(self.offsets, pa.int32()), structs, type=pa.list_(SPAN_TYPE))
        columns = [pa.array(self.row_id, pa.int64()), pa.array(self.source, pa.string()),
                   pa.array(self.source_row, pa.int64()), pa.array(self.caption, pa.string()), spans]
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self._clear()

    def close(self) -> None:
        self.flush()
        self.writer.close()


def tag_corpus(paths: Sequence[str | Path], output: str | Path, tagger: GroundingTagger, *, field: str = "caption",
               batch_rows: int = 8192, progress: bool = True) -> dict[str, Any]:
    """Tag every caption of `paths` with `tagger` and write the tags file `output`; returns the run's stats.

    Stats: `captions` (rows read), `tagged`, `grounded` (rows with >= 1 span), `spans`, the rows left
    untagged by kind (`empty`, `not_text`, `unreadable`, `too_long`), `seconds`, `captions_per_s`, and
    `spans_per_concept` (concept name -> spans, every concept of the vocabulary).
    """
    from tqdm import tqdm

    total_rows = _check_inputs(paths, field)
    output = Path(output)
    if output.is_dir():
        raise InputError(f"{output}: is a folder; give the tags file's path, e.g. {output / 'tags.parquet'}")
    if any(Path(p).resolve() == output.resolve() for p in paths):
        raise InputError(f"{output}: is also an input; write the tags to another file")
    output.parent.mkdir(parents=True, exist_ok=True)
    vocab = tagger.vocab
    schema = TAGS_SCHEMA.with_metadata({
        "cmcaug.vocab": json.dumps(vocab.to_dict()),
        "cmcaug.tagger": json.dumps({"mode": tagger.mode, "model": tagger.model, "field": field}),
    })
    counts: Counter[str] = Counter()
    per_concept = [0] * len(vocab)
    # Rows handed to the tagger and not yet written, in order. Rows that are not tagged go through it as ""
    # (no spans), so this holds at most the tagger's look-ahead however long a run of empty rows is.
    pending: deque[tuple[int, str, int, str | None]] = deque()

    def to_tag() -> Iterator[str]:
        rows = read_captions(paths, field, batch_rows=batch_rows, max_chars=tagger.max_chars)
        for row_id, (source, source_row, value) in enumerate(rows):
            kind = ("unreadable" if value is UNREADABLE else "too_long" if value is TOO_LONG
                    else "not_text" if not isinstance(value, str) else "empty" if not value.strip() else "tagged")
            counts["captions"] += 1
            counts[kind] += 1
            pending.append((row_id, source, source_row, value if isinstance(value, str) else None))
            yield value if kind == "tagged" else ""

    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    start = time.perf_counter()
    try:
        writer = _TagsWriter(tmp, schema, batch_rows)
        with tqdm(total=total_rows, unit=" captions", disable=not progress, desc="tag-text") as bar:
            try:
                for spans in tagger.iter_tag(to_tag()):
                    writer.add(*pending.popleft(), spans)
                    bar.update(1)
                    counts["grounded"] += bool(spans)
                    counts["spans"] += len(spans)
                    for s in spans:
                        per_concept[s.concept_id] += 1
            finally:
                writer.close()
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    stats: dict[str, Any] = {k: counts[k] for k in ("captions", "tagged", "grounded", "spans", "empty", "not_text",
                                                   "unreadable", "too_long")}
    stats.update(seconds=round(seconds, 3), captions_per_s=round(counts["captions"] / seconds, 1) if seconds else 0.0,
                 output=str(output), spans_per_concept=dict(zip(vocab.names, per_concept)))
    return stats
