"""Character spans -> token ranges, for any tokenizer that can say where its tokens came from.

Grounding finds words as character spans of the caption; the model sees token ids. `align_spans` maps
one onto the other from each token's character offsets (`(start, end)`, as HF fast tokenizers return
with `return_offsets_mapping=True`):

- a span maps to the half-open token range `[first, last + 1)` of every token that overlaps it, so a word
  split into sub-tokens ("skate", "##board") maps to all of them;
- tokens with an empty offset (`start == end`: special tokens, padding) never belong to a span;
- a span the token sequence does not cover completely (cut by truncation, or by a sliding window) is
  dropped, never half-kept: its entry is `None`. Results stay in input order, one per span.

`align_span_arrays` is the one implementation: a whole batch at once, vectorized (what `CMCTransform`
calls per batch); `align_spans` and `align_batch` are its list-in, list-out forms. Offsets for any
tokenizer come from `cmcaug.text.tokenize.tokenize_with_offsets`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .tokenize import as_pairs

TokenRange = tuple[int, int]


def _bounds(span: Any) -> tuple[int, int]:
    if hasattr(span, "start") and hasattr(span, "end"):
        return int(span.start), int(span.end)
    return int(span[0]), int(span[1])


def align_span_arrays(row: np.ndarray, start: np.ndarray, end: np.ndarray,
                      offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ranges of many character spans at once: `(token_start, token_end, ok)`, one entry per span.

    Span i covers characters `[start[i], end[i])` of sequence `row[i]`; `offsets` `[B, L, 2]` holds each
    token's `(start, end)`, `(0, 0)` on special tokens and padding, in text order (each token starts and
    ends no earlier than the one before: every tokenizer's). A span maps to the tokens from the first whose
    end is past its start to the last whose start is before its end (`token_end` exclusive); it is not
    ok (dropped, its range 0) when it is empty, reaches outside the characters its row's tokens cover (cut
    by truncation), or touches no token. Binary searches over the batch's content tokens, rows kept apart
    by a per-row key offset.
    """
    row, start, end = (np.asarray(a, dtype=np.int64) for a in (row, start, end))
    offsets = np.asarray(offsets)
    content = offsets[..., 1] > offsets[..., 0]
    token_row, token_pos = np.nonzero(content)
    if token_row.size == 0 or row.size == 0:
        zeros = np.zeros(row.size, np.int64)
        return zeros, zeros, np.zeros(row.size, bool)
    tok_start, tok_end = offsets[token_row, token_pos, 0], offsets[token_row, token_pos, 1]
    scale = int(max(offsets[..., 1].max(), end.max(initial=0))) + 2
    ends_key = np.maximum.accumulate(token_row * scale + tok_end)
    starts_key = np.minimum.accumulate((token_row * scale + tok_start)[::-1])[::-1]
    first = np.searchsorted(ends_key, row * scale + start, side="right")
    last = np.searchsorted(starts_key, row * scale + end, side="left") - 1
    n_rows = offsets.shape[0]
    low = np.full(n_rows, np.iinfo(np.int64).max)
    high = np.zeros(n_rows, np.int64)
    np.minimum.at(low, token_row, tok_start)
    np.maximum.at(high, token_row, tok_end)
    ok = (end > start) & (start >= low[row]) & (end <= high[row]) & (last >= first)
    first, last = np.clip(first, 0, token_pos.size - 1), np.clip(last, 0, token_pos.size - 1)
    ok &= (token_row[first] == row) & (token_row[last] == row)
    return np.where(ok, token_pos[first], 0), np.where(ok, token_pos[last] + 1, 0), ok


def _offset_rows(offsets: Any) -> np.ndarray:
    """`[B, L, 2]` int64 offsets from an array, a tensor or per-sequence lists (ragged ones padded with (0, 0))."""
    rows = [as_pairs(o) for o in offsets]
    out = np.zeros((len(rows), max(map(len, rows), default=0), 2), np.int64)
    for b, pairs in enumerate(rows):
        if pairs:
            out[b, : len(pairs)] = pairs
    return out


def align_spans(spans: Iterable[Any], offsets: Any) -> list[TokenRange | None]:
    """Token range `(token_start, token_end)` (end exclusive) of each character span, or `None` if dropped.

    `spans`: `GroundedSpan`s or `(start, end, ...)` tuples. `offsets`: one `(start, end)` per token of
    one sequence, in text order (list, numpy `[L, 2]` or torch `[L, 2]`). A span is dropped when no token
    overlaps it or when the tokens end before it ends (or start after it starts): the model sees only part
    of it. One sequence of `align_span_arrays`.
    """
    return align_batch([spans], [offsets])[0]


def align_batch(spans: Sequence[Iterable[Any]], offsets: Any) -> list[list[TokenRange | None]]:
    """`align_spans` for each sequence of a batch: `offsets` is `[B, L, 2]` (or a list of per-text lists)."""
    if len(spans) != len(offsets):
        raise InputError(f"align_batch needs one span list per sequence: got {len(spans)} span lists, {len(offsets)} sequences")
    bounds = [[_bounds(s) for s in row] for row in spans]
    counts = np.fromiter(map(len, bounds), np.int64, len(bounds))
    flat = np.asarray([b for row in bounds for b in row], dtype=np.int64).reshape(-1, 2)
    start, end, ok = align_span_arrays(np.repeat(np.arange(len(bounds)), counts), flat[:, 0], flat[:, 1],
                                       _offset_rows(offsets))
    ranges = [(s, e) if k else None for s, e, k in zip(start.tolist(), end.tolist(), ok.tolist())]
    edges = np.cumsum(counts).tolist()
    return [ranges[a - n:a] for a, n in zip(edges, counts.tolist())]
