"""What `CMCTransform.collate` accepts, each item's grounded spans, and a dataset that gives every item its index.

A batch item is one of
- a caption string (tagged on the fly by the transform's tagger);
- a tag row: a dict with "caption" and "spans" (`{"start", "end", "concept_id"}` character spans, as
  `cmcaug tag-text` writes them; `GroundedSpan`s and `(start, end, concept_id)` triples also work), and
  optionally "index" (or tag-text's "row_id"); a row without "spans" is tagged on the fly;
- an `(index, item)` pair.

The index is what keys a sample's random draws, so that its view does not depend on the worker or the
batch it lands in. `IndexedItems` supplies it for any corpus; an item without one is keyed by a hash of
its caption instead.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from .concepts import ConceptVocab
from .errors import InputError


class Item(NamedTuple):
    """One parsed batch item."""

    caption: str
    spans: list[tuple[int, int, int]] | None  # (start, end, concept_id) character spans; None: tag on the fly
    index: int | None  # dataset index; None: key the draws by the caption's text


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
    if spans is None:
        return Item(caption, None, index)
    try:
        if all(type(s) is dict for s in spans):  # tag rows: the common case
            return Item(caption, [(int(s["start"]), int(s["end"]), int(s["concept_id"])) for s in spans], index)
        return Item(caption, [_span_triple(s) for s in spans], index)
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


class IndexedItems(torch.utils.data.Dataset):
    """Map-style dataset whose items are `{"caption", "spans", ..., "index": i}`.

    Over a list of captions or tag rows, an HF `datasets.Dataset`, or a tag-text table: a
    `pyarrow.Table`, or the Parquet file's path (memory-mapped, and reopened by path in each DataLoader
    worker rather than pickled). `__getitems__` fetches a whole batch at once (DataLoader uses it).
    """

    def __init__(self, items: Any = None, path: str | os.PathLike | None = None):
        if (items is None) == (path is None):
            raise InputError("IndexedItems takes either items or the path of a tag-text Parquet file")
        self.items, self.path = items, None if path is None else os.fspath(path)

    @classmethod
    def of(cls, items: Any, vocab: ConceptVocab | None = None) -> IndexedItems:
        """Wrap `items` (or open a tags file by path), refusing tags recorded with a vocabulary other than `vocab`."""
        if isinstance(items, (str, os.PathLike)):
            import pyarrow.parquet as pq

            dataset, metadata = cls(path=items), pq.read_schema(items).metadata
        else:
            dataset, metadata = cls(items), items.schema.metadata if isinstance(items, pa.Table) else None
        recorded = (metadata or {}).get(b"cmcaug.vocab")
        if vocab is not None and recorded is not None and ConceptVocab(json.loads(recorded)) != vocab:
            raise InputError(f"{dataset.path or 'the tags table'} was tagged with another vocabulary than the bank's "
                             f"({vocab!r}): re-run cmcaug tag-text with --bank pointing to this bank")
        return dataset

    def __len__(self) -> int:
        return len(self._items())

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        items = self._items()
        fetched = items.take(list(indices)).to_pylist() if isinstance(items, pa.Table) else [items[i] for i in indices]
        return [{**item, "index": int(i)} if isinstance(item, Mapping) else {"caption": item, "index": int(i)}
                for i, item in zip(indices, fetched)]

    def _items(self) -> Any:
        if self.items is None:
            import pyarrow.parquet as pq

            self.items = pq.read_table(self.path, memory_map=True)
        return self.items

    def __getstate__(self) -> dict[str, Any]:
        return {"items": None if self.path else self.items, "path": self.path}
