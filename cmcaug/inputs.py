"""What `CMCTransform.collate` accepts, each item's grounded spans, and datasets that give every item its index.

A batch item is one of
- a caption string (tagged on the fly by the transform's tagger);
- a dict with "caption" and optionally "spans" (`{"start", "end", "concept_id"}` character spans, as
  `cmcaug tag-text` writes them; `GroundedSpan`s and `(start, end, concept_id)` triples also work) and
  "index" (or tag-text's "row_id"); a dict without "spans" is tagged on the fly. Its other keys ("image_id",
  a file's "source" and "source_row", ...) are extra fields, handed through to `CMCBatch.fields`;
- an `(index, item)` pair.

The index is what keys a sample's random draws, so that its view does not depend on the worker or the
batch it lands in; an item without one is keyed by a hash of its caption instead. `indexed` (behind
`CMCTransform.dataset`) gives every item of a corpus its position in the corpus as its index:
`IndexedItems` for corpora with random access (lists, HF `datasets.Dataset`s, tags files, caption files read
into memory), `IndexedStream` for streams, which in DataLoader worker w of W reads the whole stream and
yields positions w, w + W, w + 2W, ..., so every item is collated once and keeps its index whatever
`num_workers`.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .concepts import ConceptVocab
from .errors import InputError
from .text.corpus import check_corpus, fits_column, read_captions

if TYPE_CHECKING:
    from typing import Self  # Python 3.11

_ITEM_KEYS = frozenset({"caption", "spans", "index"})  # what collate reads; every other key is an extra field
_CAPTIONS_SCHEMA = pa.schema([("caption", pa.string()), ("source", pa.string()), ("source_row", pa.int64())])
_RESERVED = frozenset([*_CAPTIONS_SCHEMA.names, *_ITEM_KEYS, "row_id"])  # no kept field of a caption file takes these
_READ_ROWS = 8192  # rows per record batch when a caption file is read into memory


class Item(NamedTuple):
    """One parsed batch item."""

    caption: str
    spans: list[tuple[int, int, int]] | None  # (start, end, concept_id) character spans; None: tag on the fly
    index: int | None  # dataset index; None: key the draws by the caption's text
    fields: dict[str, Any] = {}  # the item's extra fields (never mutated)


def _span_triple(span: Any) -> tuple[int, int, int]:
    if isinstance(span, Mapping):
        return int(span["start"]), int(span["end"]), int(span["concept_id"])
    if hasattr(span, "concept_id"):  # GroundedSpan
        return int(span.start), int(span.end), int(span.concept_id)
    start, end, concept_id = span
    return int(start), int(end), int(concept_id)


def _index(value: Any, position: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"batch item {position}: the index must be an integer >= 0, got {value!r}")
    return int(value)


def parse_item(item: Any, position: int) -> Item:
    """`item` (batch position `position`, for messages) as an `Item`; exact-type checks first, for speed."""
    index = None
    if type(item) is tuple and len(item) == 2 and isinstance(item[0], (int, np.integer)):
        index, item = _index(item[0], position), item[1]
    if isinstance(item, str):
        return Item(item, None, index)
    if not (type(item) is dict or isinstance(item, Mapping)) or "caption" not in item:
        raise InputError(
            f"batch item {position}: expected a caption string, a dict with 'caption' (and optionally 'spans' "
            f"and 'index'), or an (index, item) pair; got {type(item).__name__}"
        )
    caption, spans = item["caption"], item.get("spans")
    if caption is None:  # tag-text keeps unreadable rows (caption null) so that row ids line up
        caption = ""
    if not isinstance(caption, str):
        raise InputError(f"batch item {position}: 'caption' must be a string, got {type(caption).__name__}")
    raw_index = item.get("index")
    raw_index = item.get("row_id") if raw_index is None else raw_index
    if raw_index is not None:
        index = _index(raw_index, position)
    fields = {k: v for k, v in item.items() if k not in _ITEM_KEYS}
    if spans is None:
        return Item(caption, None, index, fields)
    try:
        if all(type(s) is dict for s in spans):  # tag rows: the common case
            return Item(caption, [(int(s["start"]), int(s["end"]), int(s["concept_id"])) for s in spans], index, fields)
        return Item(caption, [_span_triple(s) for s in spans], index, fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"batch item {position}: spans must be {{'start', 'end', 'concept_id'}} dicts, GroundedSpans or "
            f"(start, end, concept_id) triples ({exc!r})"
        ) from exc


def item_spans(items: Sequence[Item], tagger: Any) -> list[list[tuple[int, int, int]]]:
    """Each item's `(start, end, concept_id)` character spans; `tagger` (a `GroundingTagger`) tags, in one
    call, the items that came without any."""
    missing = [i for i, item in enumerate(items) if item.spans is None]
    spans = [item.spans or [] for item in items]
    if missing:
        if tagger is None:
            raise InputError(
                f"{len(missing)} batch items came without spans (e.g. item {missing[0]}) and there is no tagger: "
                "pass tagger=GroundingTagger(bank.vocab), or give items as tag rows with 'spans'"
            )
        for i, tagged in zip(missing, tagger.tag([items[i].caption for i in missing])):
            spans[i] = [(int(s.start), int(s.end), int(s.concept_id)) for s in tagged]
    return spans


def item_fields(items: Sequence[Item]) -> dict[str, list[Any]]:
    """The items' extra fields as columns: one value per item, None where an item lacks the field."""
    names = dict.fromkeys(name for item in items for name in item.fields)
    return {name: [item.fields.get(name) for item in items] for name in names}


# -- datasets ----------------------------------------------------------------------------------------


def indexed(source: Any, vocab: ConceptVocab | None = None, *, tagger: Any = None, field: str = "caption",
            keep: Sequence[str] = (), streaming: bool = False) -> IndexedItems | IndexedStream:
    """`source` as a dataset whose items are dicts carrying their position in `source` as "index".

    `source`: the path of a caption file (any format `cmcaug.text.corpus.read_captions` reads: .txt, .jsonl,
    .json, .parquet, gzipped) or of a `cmcaug tag-text` file (Parquet with "spans"); a `pyarrow.Table`; a
    sequence (list of captions or dicts, HF `datasets.Dataset`, map-style torch `Dataset`); or an iterable
    (torch `IterableDataset`, any object whose `__iter__` starts the stream afresh). `field` names the caption
    column or key (renamed "caption"); a caption file's rows are `{"caption", "source", "source_row"}` and
    the fields of `keep` (and a .json file's scalar fields), as in a tags file. Files and sequences give an
    `IndexedItems` (caption files are read into memory); `streaming=True`, and iterables, an
    `IndexedStream`. Refused: a mapping (an HF `DatasetDict`: pick a split), a one-shot iterator, a file
    `check_corpus` refuses, a tags file recorded with another vocabulary than `vocab`, and, without `tagger`,
    captions that come without spans. `tagger`'s `max_chars` bounds the line read from a text file.
    """
    if isinstance(source, (bytes, Mapping)):
        hint = ": pick a split, e.g. ds['train']" if isinstance(source, Mapping) else ""
        raise InputError(f"cmc.dataset takes a file path, a sequence or an iterable of items, got a {type(source).__name__}{hint}")
    if isinstance(source, Iterator) and not isinstance(source, torch.utils.data.IterableDataset):
        raise InputError(f"cmc.dataset needs a source it can read again every epoch and in every DataLoader worker, got "
                         f"a one-shot {type(source).__name__}: pass a list, a file path, or an object whose __iter__ "
                         "starts the stream afresh (a torch IterableDataset)")
    random_access = isinstance(source, (str, os.PathLike, pa.Table)) or (
        hasattr(source, "__len__") and hasattr(source, "__getitem__")
        and not isinstance(source, torch.utils.data.IterableDataset))
    if not (random_access or isinstance(source, Iterable)):
        raise InputError(f"cmc.dataset takes a file path, a sequence or an iterable of items, got {type(source).__name__}")
    kind = IndexedStream if streaming or not random_access else IndexedItems
    dataset = kind.of(source, vocab, field=field, keep=keep, max_chars=getattr(tagger, "max_chars", None))
    if tagger is None and (dataset.columns is not None or (  # a caption file, or items whose first has no spans
            kind is IndexedItems and len(dataset) > 0 and parse_item(dataset[0], 0).spans is None)):
        name = source if isinstance(source, (str, os.PathLike)) else f"this {type(source).__name__}"
        raise InputError(f"{name}: its captions come without spans and the transform has no tagger: pass "
                         "tagger=GroundingTagger(bank.vocab) to CMCTransform (tags them on the fly, in the workers), "
                         "or tag them first with `cmcaug tag-text FILE -o tags.parquet --bank BANK`")
    return dataset


class _Source:
    """What both datasets share: the source (a `Path` for a file), how its rows are read, and opening with checks.

    `columns` is the schema of a caption file's rows, None for a tags file (read as it is, every column).
    """

    def __init__(self, source: Any, *, field: str = "caption", keep: Sequence[str] = (), max_chars: int | None = None,
                 columns: pa.Schema | None = None):
        self.source, self.field, self.keep, self.max_chars, self.columns = source, field, tuple(keep), max_chars, columns

    @classmethod
    def of(cls, source: Any, vocab: ConceptVocab | None = None, *, field: str = "caption", keep: Sequence[str] = (),
           max_chars: int | None = None) -> Self:
        """A dataset over `source`: items, or a file, checked before any work (a caption file by `check_corpus`);
        a tags file or table recorded with another vocabulary than `vocab` is refused."""
        metadata, columns = source.schema.metadata if isinstance(source, pa.Table) else None, None
        if isinstance(source, (str, os.PathLike)):
            source = Path(source)
            metadata = _tags_metadata(source)
            if metadata is None:
                columns = _caption_columns(source, field, keep, max_chars)
        recorded = (metadata or {}).get(b"cmcaug.vocab")
        if vocab is not None and recorded is not None and ConceptVocab(json.loads(recorded)) != vocab:
            raise InputError(f"{source if isinstance(source, Path) else 'the tags table'} was tagged with another "
                             f"vocabulary than the bank's ({vocab!r}): re-run cmcaug tag-text with --bank pointing to this bank")
        return cls(source, field=field, keep=keep, max_chars=max_chars, columns=columns)

    def _rows(self) -> Iterator[Any]:
        """The source's items, in order: a caption file's rows, a tags file's or a table's rows, an iterable's items."""
        if isinstance(self.source, Path) and self.columns is not None:
            return _caption_rows(self.source, self.field, self.keep, self.max_chars, self.columns)
        if isinstance(self.source, (Path, pa.Table)):
            batches = pq.ParquetFile(self.source).iter_batches() if isinstance(self.source, Path) else self.source.to_batches()
            return itertools.chain.from_iterable(batch.to_pylist() for batch in batches)
        return iter(self.source)

    def _indexed(self, item: Any, index: int) -> dict[str, Any]:
        """`item` as a dict with its caption under "caption" and `index` under "index"."""
        if not isinstance(item, Mapping):
            return {"caption": item, "index": index}
        if self.field != "caption" and self.field in item:
            item = {**{k: v for k, v in item.items() if k != self.field}, "caption": item[self.field]}
        return {**item, "index": index}


class IndexedItems(_Source, torch.utils.data.Dataset):
    """Map-style dataset whose item i is `{"caption", ..., "index": i}`; `__getitems__` fetches a batch at once.

    A file is read by path in each process that uses it (a tags file memory-mapped, a caption file into
    memory), so the dataset pickles small into spawned DataLoader workers.
    """

    _table: pa.Table | None = None  # the file's rows, once read

    def __len__(self) -> int:
        return len(self._items())

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        items, indices = self._items(), [int(i) for i in indices]
        if isinstance(items, pa.Table):
            fetched = items.take(indices).to_pylist()
        elif hasattr(items, "__getitems__"):  # HF datasets.Dataset, torch Subset: a batch in one call
            fetched = items.__getitems__(indices)
        else:
            fetched = [items[i] for i in indices]
        return [self._indexed(item, i) for i, item in zip(indices, fetched)]

    def _items(self) -> Any:
        if not isinstance(self.source, Path):
            return self.source
        if self._table is None and self.columns is None:
            self._table = pq.read_table(self.source, memory_map=True)
        elif self._table is None:
            rows, columns = self._rows(), self.columns
            chunks = iter(lambda: list(itertools.islice(rows, _READ_ROWS)), [])
            self._table = pa.Table.from_batches((pa.RecordBatch.from_pylist(c, schema=columns) for c in chunks), columns)
        return self._table

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_table": None}  # a file is read again by each worker, by path


class IndexedStream(_Source, torch.utils.data.IterableDataset):
    """Iterable dataset over a stream, each item given its position in the stream as "index".

    In DataLoader worker w of W it reads the whole stream and yields the items at positions w, w + W, ...:
    each item is collated once, with the same index (so the same view) whatever `num_workers`; every worker
    pays for reading (not collating) the whole stream. The source is read afresh each epoch, in order, and
    must not split itself among workers: a streaming HF `datasets.IterableDataset`, which does, is refused
    under more than one worker (key its items by a stable unique id instead, see `CMCTransform.dataset`).
    """

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers > 1 and type(self.source).__module__.split(".")[0] == "datasets":
            raise InputError(
                f"a streaming HF {type(self.source).__name__} splits itself among DataLoader workers, so positions "
                "would depend on num_workers: use num_workers<=1, or give each example a stable unique 'index' "
                "(ds.map(lambda x: {'index': x['id']})) and pass ds itself to the DataLoader with collate_fn=cmc.collate")
        rows = itertools.islice(self._rows(), worker, None, workers)
        for index, item in zip(itertools.count(worker, workers), rows):
            yield self._indexed(item, index)


def _tags_metadata(path: Path) -> dict[bytes, bytes] | None:
    """The schema metadata of a `cmcaug tag-text` file (Parquet with "spans"); None for any other file."""
    if not (path.name.lower().endswith(".parquet") and path.is_file()):
        return None
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return None  # check_corpus says what is wrong with it
    return (schema.metadata or {}) if "spans" in schema.names else None


def _caption_columns(path: Path, field: str, keep: Sequence[str], max_chars: int | None) -> pa.Schema:
    """The schema of a caption file's rows, once `check_corpus` has found the file readable."""
    fields = check_corpus([path], field, keep, max_chars=max_chars).fields
    return pa.schema([*_CAPTIONS_SCHEMA, *(pa.field(k, t) for k, t in fields.items() if k not in _RESERVED)])


def _caption_rows(path: Path, field: str, keep: Sequence[str], max_chars: int | None,
                  columns: pa.Schema | None = None) -> Iterator[dict[str, Any]]:
    """The rows of a caption file as `{"caption", "source", "source_row", **kept fields}`, the caption None where
    the row holds no readable text (as in a tags file, so positions match tag-text's row ids). With `columns`
    (the file's schema), a kept value that does not fit its column is None, as tag-text writes it."""
    for row in read_captions([path], field, keep=keep, max_chars=max_chars):
        kept = {k: v for k, v in row.fields.items() if k not in _RESERVED}
        if columns is not None:
            kept = {k: v if fits_column(v, columns.field(k).type) else None for k, v in kept.items()}
        yield {"caption": row.value if isinstance(row.value, str) else None, "source": row.source,
               "source_row": row.source_row, **kept}
