"""Reading caption corpora, streaming: every row of every file, in order, with the fields a caller keeps.

Formats (by name; `.gz` too, except Parquet):

| file | one row per | the caption | `source_row` |
|---|---|---|---|
| `.txt` | line | the line | 0-based line |
| `.jsonl` | line | the `field` of the line's object | 0-based line |
| `.json` | annotation (COCO captions) or list element | its `field` | 0-based index in that list |
| `.parquet` | row | the `field` column | 0-based row |

A `.json` file holds COCO captions (`{"annotations": [{"caption", "image_id", "id"}, ...], ...}`, as in
`captions_train2017.json`) or a top-level list of objects (ALBEF/BLIP's `[{"caption", "image", "image_id"}]`).

Beside its caption, a row carries `fields`: the values of the fields named by `keep` that the row has
(JSON fields, Parquet columns), and in a `.json` file every field whose values are all JSON scalars of one
type (COCO: `image_id` and `id`). `check_corpus` refuses what cannot be read before any work and gives
each kept field one Arrow type: `int64`, `float64` (integers and floats mixed), `bool` or `string`;
`fits_column` says whether a row's value fits its field's column.

Memory does not grow with the input, but for a `.json` file: text files are read a line at a time and an over-long line is skipped
in pieces, never held whole (a `.jsonl` line may hold up to `json_line_chars(max_chars)` characters, room for
an escaped caption of `max_chars` and the object's other fields); Parquet is read in record batches of at
most `PARQUET_BATCH_BYTES` of the columns read (a batch holds one row at least, so the longest Parquet value
is read whole). A `.json` file is one JSON document, so it is read whole, up to `JSON_FILE_CHARS`: a
file the size of COCO's `captions_train2017.json` (90 MB, 591,753 captions) peaks at 450 MB of memory and
takes about 5 s to read on a loaded 2-core machine (`tag_corpus` parses it twice: `check_corpus`, then
`read_captions`).
"""
from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from .grounding import LONE_SURROGATE

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".txt.gz", ".jsonl.gz", ".json.gz")
UNREADABLE = object()  # a row's value for a JSON line that does not parse or a caption that is not UTF-8
TOO_LONG = object()  # a row's value for a caption (or .jsonl line) over `max_chars`
_BLANK = object()  # a blank .jsonl line: an empty caption, not a row without the field
PARQUET_BATCH_BYTES = 64 << 20  # of the columns read, per record batch: 8,192 rows of COCO captions are 0.5 MB
JSON_FILE_CHARS = 1 << 30  # the largest .json file read (whole); convert a larger one to .jsonl
SAMPLE_ROWS = 1000  # .jsonl rows read by `check_corpus` to type the kept fields
_SKIP_CHARS = 1 << 20  # an over-long line is skipped this many characters at a time


def json_line_chars(max_chars: int) -> int:
    """The longest `.jsonl` line read for captions of `max_chars`: 16 characters a caption character (a JSON
    escape of an emoji takes 12), and at least 1 Mi, for the object's other fields."""
    return max(16 * max_chars, 1 << 20)


class MissingField(NamedTuple):
    """The value of a JSON row that has no caption field: the fields it has instead."""

    fields: tuple[str, ...]


class CaptionRow(NamedTuple):
    """One row of a caption corpus: the input file (as given), the row's place in it (see the module table),
    what the row holds (a caption, or any JSON value, None, `MissingField`, `UNREADABLE`, `TOO_LONG`), and the
    kept fields the row has."""

    source: str
    source_row: int
    value: Any
    fields: dict[str, Any]


class CorpusSummary(NamedTuple):
    """What `check_corpus` found: the rows of all inputs (None when a `.txt` or `.jsonl` input would have to be
    read to count them) and the kept fields with their Arrow types, in order."""

    rows: int | None
    fields: dict[str, pa.DataType]


_ARROW_TYPES = {type(None): pa.null(), bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}


def _merged_type(types: Iterable[pa.DataType | None]) -> pa.DataType:
    """The one type that holds values of all `types` (int64 and float64 make float64; `pa.null()` goes with any);
    ValueError for None (not a kept type) or two that do not mix."""
    found = pa.null()
    for t in types:
        if t is None:
            raise ValueError("not a number, boolean or string")
        if t == found or t == pa.null():
            continue
        if found == pa.null() or {t, found} == {pa.int64(), pa.float64()}:
            found = t if found == pa.null() else pa.float64()
        else:
            raise ValueError(f"both {found} and {t}")
    return found


# The Python values that a kept field's column of each type holds, by Arrow type id.
_HOLDS = {pa.int64().id: (int,), pa.float64().id: (int, float), pa.bool_().id: (bool,), pa.string().id: (str,)}


def fits_column(value: Any, column: pa.DataType) -> bool:
    """Whether a kept field's column of type `column` (as `check_corpus` types it) holds `value` as it is: None
    or a value of its type (an integer in a float64 column too), but no integer beyond int64 and no string
    that is not UTF-8 (one with a lone surrogate). Values are checked one by one, as a `.jsonl` file's
    fields are typed by its first rows only."""
    kind = type(value)
    if value is None or kind not in _HOLDS[column.id]:
        return value is None
    if kind is int:
        return -(1 << 63) <= value < 1 << 63
    return kind is not str or value.isascii() or not LONE_SURROGATE.search(value)


def _kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix.removesuffix(".gz")
    raise InputError(f"{path}: unknown corpus format; expected a file ending in {', '.join(SUFFIXES)}")


def _open_text(path: Path) -> TextIO:
    """`path` as text; a byte that is not UTF-8 becomes a lone surrogate (U+DC80..U+DCFF), which `read_captions` finds."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape")
    return open(path, encoding="utf-8-sig", errors="surrogateescape")  # noqa: SIM115 - closed by the caller's `with`


def read_captions(paths: Sequence[str | Path], field: str = "caption", *, keep: Sequence[str] = (),
                  batch_rows: int = 8192, max_chars: int | None = None) -> Iterator[CaptionRow]:
    """Every row of every caption file of `paths`, in order, with the fields of `keep` it has (and in a `.json`
    file, its scalar fields; never `field` itself).

    Streams (see the module docstring; a leading byte-order mark is skipped, Parquet is read in record batches
    of at most `batch_rows`). A row's value is not checked beyond this: it may be None, a number or a blank
    string. It is `MissingField` for a JSON object without `field`, `UNREADABLE` for a JSON line that does
    not parse and for a caption that is not valid UTF-8 (an undecodable byte, or a JSON escape of a lone
    surrogate), and with `max_chars`, `TOO_LONG` for a caption longer than that (or a `.jsonl` line longer
    than `json_line_chars(max_chars)`, which is never held in memory whole).
    """
    keep = [name for name in keep if name != field]
    for raw in paths:
        path = Path(raw)
        kind = _kind(path)
        if not path.is_file():
            raise InputError(f"{path}: no such caption file")
        if kind == ".parquet":
            rows = _read_parquet(path, field, keep, batch_rows)
        elif kind == ".txt":
            rows = ((line, {}) for line in _lines(path, max_chars))
        else:
            records = _json_records(path) if kind == ".json" else _jsonl_objects(path, max_chars)
            names = [*keep, *_scalar_fields(records, field)] if kind == ".json" else keep
            rows = (_row(obj, field, names) for obj in records)
        for row, (value, fields) in enumerate(rows):
            yield CaptionRow(str(raw), row, _checked(value, max_chars, path, row), fields)


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


def _lines(path: Path, limit: int | None) -> Iterator[Any]:
    """Each line of the text file `path` without its newline; `TOO_LONG` for a line over `limit` characters,
    skipped in pieces."""
    with _open_text(path) as f:
        while line := f.readline(-1 if limit is None else limit + 1):
            if limit is None or len(line) <= limit or line.endswith("\n"):
                yield line[:-1] if line.endswith("\n") else line
                continue
            while line and not line.endswith("\n"):
                line = f.readline(_SKIP_CHARS)
            yield TOO_LONG


def _jsonl_objects(path: Path, max_chars: int | None) -> Iterator[Any]:
    """Each line of a `.jsonl` file parsed; `_BLANK`, `UNREADABLE` or `TOO_LONG` for a line that has no value."""
    for row, line in enumerate(_lines(path, None if max_chars is None else json_line_chars(max_chars))):
        if line is TOO_LONG or not line.strip():
            yield _BLANK if line is not TOO_LONG else TOO_LONG
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            log.warning("%s:%d: not valid JSON (%s); the row gets no tags", path, row + 1, exc)
            yield UNREADABLE


def _json_records(path: Path) -> list[Any]:
    """The rows of a `.json` file, read whole: a COCO captions file's annotations, or a top-level list."""
    with _open_text(path) as f:
        text = f.read(JSON_FILE_CHARS + 1)
    if len(text) > JSON_FILE_CHARS:
        raise InputError(f"{path}: over {JSON_FILE_CHARS:,} characters; a .json corpus is read whole: write its rows "
                         "to a .jsonl file (one object a line), which is streamed")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(document, dict) and isinstance(document.get("annotations"), list):
        return document["annotations"]
    if isinstance(document, list):
        return document
    found = f"an object with keys {list(document)[:10]}" if isinstance(document, dict) else type(document).__name__
    raise InputError(f'{path}: expected COCO captions ({{"annotations": [{{"caption": ..., "image_id": ...}}, ...]}}) '
                     f"or a list of objects, found {found}")


def _row(obj: Any, field: str, keep: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """The caption and kept fields of one JSON row (a row that is not an object has value None, no fields)."""
    if isinstance(obj, dict):
        return obj[field] if field in obj else MissingField(tuple(obj)), {k: obj[k] for k in keep if k in obj}
    return "" if obj is _BLANK else obj if obj is UNREADABLE or obj is TOO_LONG else None, {}


def _field_names(records: Iterable[Any]) -> dict[str, None]:
    """The fields of the JSON objects among `records`, in the order first seen."""
    return dict.fromkeys(k for obj in records if isinstance(obj, dict) for k in obj)


def _field_type(records: Sequence[Any], name: str) -> pa.DataType:
    """The type of field `name` over the objects of `records` (`_merged_type` of the JSON values' types, an
    integer beyond int64 being of none); ValueError when no one type holds them all."""
    values = [obj.get(name) for obj in records if isinstance(obj, dict)]
    kinds = dict.fromkeys(map(type, values))  # in the order first seen, for messages
    ints = [v for v in values if type(v) is int]
    if ints and (min(ints) < -(1 << 63) or max(ints) >= 1 << 63):
        kinds[object] = None  # no kept type holds it
    return _merged_type(map(_ARROW_TYPES.get, kinds))


def _scalar_fields(records: Sequence[Any], field: str) -> dict[str, pa.DataType]:
    """The fields of a `.json` file's rows, other than `field`, whose values are scalars of one type, with it."""
    types = {}
    for name in _field_names(records):
        try:
            types[name] = _field_type(records, name)
        except ValueError:
            continue
    types.pop(field, None)
    return types


def _parquet_file(path: Path, field: str) -> pq.ParquetFile:
    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc
    if field not in file.schema_arrow.names:
        raise InputError(f"{path}: no column {field!r}; it has {file.schema_arrow.names}; choose one with --field")
    return file


def _batch_rows(file: pq.ParquetFile, columns: Sequence[str], batch_rows: int) -> int:
    """`batch_rows`, or fewer so that a record batch of `columns` holds about `PARQUET_BATCH_BYTES`, from the row
    group whose values are the longest on average (the row groups' uncompressed sizes)."""
    meta, widest = file.metadata, 1.0
    for group in map(meta.row_group, range(meta.num_row_groups)):
        if group.num_rows:
            width = sum(column.total_uncompressed_size for column in map(group.column, range(group.num_columns))
                        if column.path_in_schema in columns)
            widest = max(widest, width / group.num_rows)
    return max(1, min(batch_rows, int(PARQUET_BATCH_BYTES / widest)))


def _values(column: pa.Array) -> list[Any]:
    """A column's values; a string that is not UTF-8 decoded with surrogateescape, so that only its row is unreadable."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        return [v if v is None else v.decode("utf-8", "surrogateescape") for v in column.cast(pa.large_binary()).to_pylist()]


def _read_parquet(path: Path, field: str, keep: Sequence[str], batch_rows: int) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The `field` column's values and the kept columns the file has, in record batches (`_batch_rows`)."""
    file = _parquet_file(path, field)
    kept = [name for name in keep if name in file.schema_arrow.names]
    columns = [field, *kept]
    for batch in file.iter_batches(batch_size=_batch_rows(file, columns, batch_rows), columns=columns):
        captions, *others = map(_values, batch.columns)
        for i, caption in enumerate(captions):
            yield caption, {name: values[i] for name, values in zip(kept, others)}


def _parquet_type(path: Path, file: pq.ParquetFile, name: str) -> pa.DataType:
    t = file.schema_arrow.field(name).type
    for test, kept in ((pa.types.is_integer, pa.int64()), (pa.types.is_floating, pa.float64()),
                       (pa.types.is_boolean, pa.bool_()), (pa.types.is_null, pa.null())):
        if test(t):
            return kept
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    raise InputError(f"{path}: column {name!r} is {t}; a kept field holds integers, floats, booleans or strings")


def _input_fields(path: Path, kind: str, field: str, keep: Sequence[str],
                  max_chars: int | None) -> tuple[int | None, dict[str, pa.DataType], dict[str, None]]:
    """One input checked: its rows (None unless counted without reading it), the kept fields it has with their
    types, and the fields it has (of a `.jsonl` file, in its first `SAMPLE_ROWS` rows)."""
    if kind == ".txt" or kind == ".jsonl" and not keep:
        return None, {}, {}
    if kind == ".parquet":
        file = _parquet_file(path, field)
        names = dict.fromkeys(file.schema_arrow.names)
        return file.metadata.num_rows, {k: _parquet_type(path, file, k) for k in keep if k in names}, names
    records = _json_records(path) if kind == ".json" else list(islice(_jsonl_objects(path, max_chars), SAMPLE_ROWS))
    names = _field_names(records)
    if kind == ".json" and field not in names:
        raise InputError(f"{path}: no row has a field {field!r}; the rows have {list(names)[:20]}; choose one with --field")
    types = {}
    for name in (k for k in keep if k in names):
        try:
            types[name] = _field_type(records, name)
        except ValueError as exc:
            raise InputError(f"{path}: field {name!r} holds values of no one type ({exc}); a kept field holds integers, "
                             "floats, booleans or strings") from exc
    rows = len(records) if kind == ".json" else None
    return rows, types | (_scalar_fields(records, field) if kind == ".json" else {}), names


def check_corpus(paths: Sequence[str | Path], field: str = "caption", keep: Sequence[str] = (), *,
                 max_chars: int | None = None) -> CorpusSummary:
    """Refuse missing, unknown or unreadable inputs before any work; count their rows where that is cheap, and
    type the kept fields (those of `keep`, and the scalar fields of `.json` files) across all inputs.

    Refused: a file that is not there or whose name `read_captions` does not know; a Parquet file that does not
    open or has no column `field`; a `.json` file that does not parse, is not COCO captions or a list, or whose
    rows lack `field` all; a kept field that no input has, whose values are not scalars, or that holds two
    types that do not mix (a field of a `.jsonl` file is judged by its first `SAMPLE_ROWS` rows).
    """
    if not paths:
        raise InputError("no corpus files given")
    total: int | None = 0
    types: dict[str, pa.DataType] = {}
    first: dict[str, Path] = {}  # the input that typed each field, for messages
    seen: dict[str, None] = {}
    for raw in paths:
        path = Path(raw)
        kind = _kind(path)
        if not path.is_file():
            raise InputError(f"{path}: no such corpus file")
        rows, fields, names = _input_fields(path, kind, field, keep, max_chars)
        total = None if total is None or rows is None else total + rows
        seen.update(names)
        for name, t in fields.items():
            try:
                types[name] = _merged_type([types.get(name, pa.null()), t])
            except ValueError as exc:
                raise InputError(f"field {name!r} holds {types[name]} in {first[name]} but {t} in {path}") from exc
            first.setdefault(name, path)
    missing = [k for k in keep if k not in seen]
    if missing:
        raise InputError(f"no input has the field(s) {missing} to keep; they have {list(seen)[:20]}")
    return CorpusSummary(total, {name: pa.string() if t == pa.null() else t for name, t in types.items()})
