"""Tagging a caption corpus into a Parquet tags file, streaming, so a corpus larger than memory works.

Inputs are read by `cmcaug.text.corpus.read_captions`, in the order given: `.txt` (one caption a line),
`.jsonl` (a field of each object), `.json` (COCO captions: a field of each annotation; or a list of objects)
and `.parquet` (a column), `.gz` too but for Parquet. The tags file has one row per input row, in input
order, so it joins back to the corpus by position or by `row_id`:

| column | type | meaning |
|---|---|---|
| `row_id` | int64 | 0-based index of the row across all inputs, in the order given |
| `source` | string | the input file the row came from (as given) |
| `source_row` | int64 | 0-based line (txt, jsonl), annotation (json) or row (parquet) within that file |
| `caption` | string | the caption; null when the row was not tagged for any reason but `empty` |
| `spans` | list<struct<start: int32, end: int32, concept_id: int32>> | grounded spans, character offsets into `caption` |
| kept fields | int64, float64, bool or string | one column per kept field, null where a row lacks it |

The kept fields are those named by `keep` (JSON fields, Parquet columns) and the scalar fields of `.json`
rows (COCO: `image_id`, `id`), but for the names of the columns above and `index`, which
`cmcaug.inputs.IndexedItems` adds to each row; their types are chosen by `check_corpus`.

Rows that are not tagged keep an empty `spans` list, each kind counted in the returned stats: `empty`
(empty or blank captions), `missing_field` (JSON objects without the caption field), `not_text` (values
that are not strings, JSON rows that are not objects), `unreadable` (a JSON line that does not parse; a
caption that is not valid UTF-8: undecodable bytes, or a JSON escape of a lone surrogate such as "\\ud800")
and `too_long` (longer than the tagger's `max_chars`). Their captions are not written: an over-long one
could be any size, and an unreadable one has no UTF-8 spelling. A kept field's value that its column
cannot hold (another type than the column's, a string that is not UTF-8) is written as null and counted
as `bad_fields`.

A caption field that most rows lack is a warning (in the stats' `warnings`, and logged), naming the fields
those rows have; a Parquet file without that column, or a `.json` file none of whose rows has it, is
refused before any work (`check_corpus`), like every other input that cannot be read.

The schema metadata records the vocabulary (`cmcaug.vocab`, JSON) and the tagger (`cmcaug.tagger`), so a
reader can check that concept ids mean what its bank means by them. The file appears atomically: it is
written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import os
import reprlib
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from .corpus import TOO_LONG, UNREADABLE, MissingField, check_corpus, fits_column, read_captions
from .grounding import GroundingTagger

log = logging.getLogger(__name__)

SPAN_TYPE = pa.struct([("start", pa.int32()), ("end", pa.int32()), ("concept_id", pa.int32())])
TAGS_SCHEMA = pa.schema([("row_id", pa.int64()), ("source", pa.string()), ("source_row", pa.int64()),
                         ("caption", pa.string()), ("spans", pa.list_(SPAN_TYPE))])
RESERVED = frozenset([*TAGS_SCHEMA.names, "index"])  # no kept field takes these names ("index": see cmcaug.inputs)
_FIELDS_NAMED = 100  # the rows without the caption field whose fields a warning names


class _TagsWriter:
    """Buffers output rows and writes them as record batches of `batch_rows`. A kept field's value that its
    column cannot hold is written as null, logged and counted (`bad_fields`)."""

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int):
        self.writer = pq.ParquetWriter(path, schema)
        self.schema, self.batch_rows = schema, batch_rows
        self.kept = {f.name: f.type for f in schema if f.name not in TAGS_SCHEMA.names}
        self.bad_fields = 0
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
        self.fields: dict[str, list[Any]] = {name: [] for name in self.kept}

    def add(self, row_id: int, source: str, source_row: int, caption: str | None, fields: dict[str, Any],
            spans: Sequence[Any]) -> None:
        self.row_id.append(row_id)
        self.source.append(source)
        self.source_row.append(source_row)
        self.caption.append(caption)
        for s in spans:
            self.starts.append(s[0])
            self.ends.append(s[1])
            self.ids.append(s[2])
        self.offsets.append(len(self.ids))
        for name, values in self.fields.items():
            value = fields.get(name)
            if not fits_column(value, self.kept[name]):
                log.warning("%s:%d: field %r holds %s, which a %s column cannot; written as null", source, source_row + 1,
                            name, reprlib.repr(value), self.kept[name])
                self.bad_fields += 1
                value = None
            values.append(value)
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
                   pa.array(self.source_row, pa.int64()), pa.array(self.caption, pa.string()), spans,
                   *(pa.array(values, self.kept[name]) for name, values in self.fields.items())]
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self._clear()

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _row_kind(value: Any) -> str:
    """How a row's value (`read_captions`) is counted: "tagged", or why it is not."""
    if value is UNREADABLE or value is TOO_LONG:
        return "unreadable" if value is UNREADABLE else "too_long"
    if isinstance(value, MissingField):
        return "missing_field"
    return "not_text" if not isinstance(value, str) else "empty" if not value.strip() else "tagged"


def _missing_field_warning(field: str, missing: int, rows: int, their_fields: Sequence[str]) -> str | None:
    """A line for a caption field that most rows lack (None when most have it), naming the fields they have."""
    if missing <= rows / 2:
        return None
    has = f"they have {', '.join(map(repr, their_fields[:20]))}" if their_fields else "they have no fields"
    what = (f"none of the {rows:,} rows has a field {field!r} ({has}), so nothing was tagged" if missing == rows else
            f"{missing:,} of {rows:,} rows have no field {field!r} ({has}) and got no tags")
    return f"{what}; choose the caption field with --field (field= in Python)"


def _schema(corpus_fields: dict[str, pa.DataType], tagger: GroundingTagger, field: str) -> pa.Schema:
    """The tags file's schema: `TAGS_SCHEMA`, the kept fields whose names are not `RESERVED`, and the metadata."""
    dropped = [name for name in corpus_fields if name in RESERVED]
    if dropped:
        log.info("not kept, as the tags file has columns of those names: %s", dropped)
    kept = [pa.field(name, t) for name, t in corpus_fields.items() if name not in RESERVED]
    return pa.schema([*TAGS_SCHEMA, *kept], metadata={
        "cmcaug.vocab": json.dumps(tagger.vocab.to_dict()),
        "cmcaug.tagger": json.dumps({"mode": tagger.mode, "model": tagger.model, "field": field}),
    })


def tag_corpus(paths: Sequence[str | Path], output: str | Path, tagger: GroundingTagger, *, field: str = "caption",
               keep: Sequence[str] = (), batch_rows: int = 8192, progress: bool = True) -> dict[str, Any]:
    """Tag every caption of `paths` with `tagger` and write the tags file `output`; returns the run's stats.

    `field` is the JSON field / Parquet column holding the caption; the fields of `keep` (and the scalar fields
    of `.json` rows) are copied into the tags file as columns after `spans`. Every input is checked before any
    work (`cmcaug.text.corpus.check_corpus`).

    Stats: `captions` (rows read), `tagged`, `grounded` (rows with >= 1 span), `spans`, the rows left
    untagged by kind (`empty`, `missing_field`, `not_text`, `unreadable`, `too_long`), `bad_fields`,
    `seconds`, `captions_per_s`, `output`, `kept_fields` (the columns after `spans`), `warnings` (lines, also
    logged) and `spans_per_concept` (concept name -> spans, every concept of the vocabulary).
    """
    from tqdm import tqdm

    keep = list(dict.fromkeys(keep))
    clash = [name for name in keep if name in RESERVED or name == field]
    if clash:
        raise InputError(f"cannot keep {clash}: {field!r} is the caption, and {sorted(RESERVED)} name the tags file's "
                         "own columns and the index its readers add")
    corpus = check_corpus(paths, field, keep, max_chars=tagger.max_chars)
    output = Path(output)
    if output.is_dir():
        raise InputError(f"{output}: is a folder; give the tags file's path, e.g. {output / 'tags.parquet'}")
    if any(Path(p).resolve() == output.resolve() for p in paths):
        raise InputError(f"{output}: is also an input; write the tags to another file")
    output.parent.mkdir(parents=True, exist_ok=True)
    schema = _schema(corpus.fields, tagger, field)
    counts: Counter[str] = Counter()
    per_concept = [0] * len(tagger.vocab)
    their_fields: dict[str, None] = {}  # the fields of the first rows without the caption field
    # Rows handed to the tagger and not yet written, in order. Rows that are not tagged go through it as ""
    # (no spans), so this holds at most the tagger's look-ahead however long a run of empty rows is.
    pending: deque[tuple[int, str, int, str | None, dict[str, Any]]] = deque()

    def to_tag() -> Iterator[str]:
        rows = read_captions(paths, field, keep=keep, batch_rows=batch_rows, max_chars=tagger.max_chars)
        for row_id, (source, source_row, value, fields) in enumerate(rows):
            kind = _row_kind(value)
            counts["captions"] += 1
            counts[kind] += 1
            if kind == "missing_field" and counts[kind] <= _FIELDS_NAMED:
                their_fields.update(dict.fromkeys(value.fields))
            pending.append((row_id, source, source_row, value if isinstance(value, str) else None, fields))
            yield value if kind == "tagged" else ""

    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    start = time.perf_counter()
    try:
        writer = _TagsWriter(tmp, schema, batch_rows)
        with tqdm(total=corpus.rows, unit=" captions", disable=not progress, desc="tag-text") as bar:
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
    warning = _missing_field_warning(field, counts["missing_field"], counts["captions"], list(their_fields))
    if warning:
        log.warning("%s", warning, extra={"in_stats": True})
    stats: dict[str, Any] = {k: counts[k] for k in ("captions", "tagged", "grounded", "spans", "empty", "missing_field",
                                                   "not_text", "unreadable", "too_long")}
    stats.update(bad_fields=writer.bad_fields, seconds=round(seconds, 3),
                 captions_per_s=round(counts["captions"] / seconds, 1) if seconds else 0.0, output=str(output),
                 kept_fields=list(writer.kept), warnings=[warning] if warning else [],
                 spans_per_concept=dict(zip(tagger.vocab.names, per_concept)))
    return stats
