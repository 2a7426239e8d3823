"""Character spans -> token ranges (`cmcaug.text.align`), on hand-made offsets and against the rule span by span.

Real tokenizers' offsets are tested in test_tokenize.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmcaug.errors import InputError
from cmcaug.text.align import align_batch, align_span_arrays, align_spans
from cmcaug.text.grounding import GroundedSpan

# -- align_spans on hand-made offsets --------------------------------------------------------------


def test_subtokens_special_tokens_and_order():
    #          [CLS]   skate    ##board  ##er     rides     [SEP]   [PAD]
    offsets = [(0, 0), (0, 5), (5, 10), (10, 12), (13, 18), (0, 0), (0, 0)]
    spans = [(13, 18), (0, 12), (5, 10)]
    assert align_spans(spans, offsets) == [(4, 5), (1, 4), (2, 3)]  # input order kept


def test_truncated_and_empty_spans_are_dropped():
    offsets = [(0, 0), (0, 3), (4, 8), (9, 12), (0, 0)]  # text continued past char 12, cut by truncation
    assert align_spans([(9, 12), (9, 16), (20, 23), (5, 5)], offsets) == [(3, 4), None, None, None]
    assert align_spans([(0, 3)], [(0, 0), (0, 0)]) == [None]  # nothing but special tokens
    assert align_spans([], offsets) == []


def test_left_truncation_window_drops_spans_that_start_before_it():
    offsets = [(0, 0), (10, 14), (15, 20), (0, 0)]  # a stride window starting at char 10
    assert align_spans([(8, 14), (10, 14), (15, 20)], offsets) == [None, (1, 2), (2, 3)]


def test_span_inside_whitespace_maps_to_nothing():
    assert align_spans([(3, 4)], [(0, 3), (5, 8)]) == [None]


def test_accepts_grounded_spans_numpy_and_torch():
    offsets = np.array([[0, 0], [0, 3], [4, 8], [0, 0]])
    span = GroundedSpan(4, 8, 16, "dog", "dogs")
    assert align_spans([span], offsets) == [(2, 3)]
    assert align_spans([span], torch.from_numpy(offsets)) == [(2, 3)]
    assert align_batch([[span], []], offsets[None].repeat(2, 0)) == [[(2, 3)], []]
    with pytest.raises(InputError, match="one span list per sequence"):
        align_batch([[span]], offsets[None].repeat(2, 0))


def test_align_batch_takes_ragged_offset_lists():
    assert align_batch([[(0, 3)], [(4, 8), (0, 3)], []], [[(0, 3)], [(0, 0), (4, 8), (9, 12)], []]) == [
        [(0, 1)], [(1, 2), None], []]


@st.composite
def tokenized_text(draw):
    """Words split into random sub-tokens, CLS/SEP/padding around them, possibly truncated on the right."""
    words = draw(st.lists(st.integers(1, 9), min_size=1, max_size=12))
    gaps = draw(st.lists(st.integers(1, 3), min_size=len(words), max_size=len(words)))
    offsets, word_spans, pos = [(0, 0)], [], 0
    for length, gap in zip(words, gaps):
        word_spans.append((pos, pos + length))
        cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=3))) if length > 1 else []
        bounds = [pos, *(pos + c for c in cuts), pos + length]
        offsets.extend(zip(bounds[:-1], bounds[1:]))
        pos += length + gap
    keep = draw(st.integers(1, len(offsets)))
    offsets = offsets[:keep] + [(0, 0)] * draw(st.integers(0, 3))
    return offsets, word_spans


@settings(max_examples=150, deadline=None, derandomize=True)
@given(tokenized_text())
def test_kept_spans_cover_exactly_their_tokens(case):
    offsets, word_spans = case
    last_end = max((e for s, e in offsets if e > s), default=0)
    for (start, end), result in zip(word_spans, align_spans(word_spans, offsets)):
        if end > last_end:
            assert result is None  # cut by truncation: dropped, never half-kept
            continue
        lo, hi = result
        assert [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start] == list(range(lo, hi))
        assert offsets[lo][0] == start and offsets[hi - 1][1] == end


def overlapping_tokens(spans: list[tuple[int, int]], offsets: np.ndarray) -> list[tuple[int, int] | None]:
    """The alignment rule, span by span: the content tokens a span overlaps, if the tokens cover it whole."""
    content = [(i, s, e) for i, (s, e) in enumerate(offsets.tolist()) if e > s]
    out = []
    for start, end in spans:
        if not content or end <= start or start < min(s for _, s, _ in content) or end > max(e for _, _, e in content):
            out.append(None)
            continue
        hit = [i for i, s, e in content if s < end and e > start]
        out.append((hit[0], hit[-1] + 1) if hit else None)
    return out


@st.composite
def token_rows(draw):
    """Offsets of a right-padded batch in text order (specials and padding at (0, 0)) plus char spans."""
    rows, spans = [], []
    for _ in range(draw(st.integers(1, 4))):
        pos, row = draw(st.integers(0, 3)), [(0, 0)]
        for _ in range(draw(st.integers(0, 8))):
            pos += draw(st.integers(0, 2))
            width = draw(st.integers(1, 4))
            row.append((pos, pos + width))
            pos += width
        row.append((0, 0))
        rows.append(row)
        spans.append([tuple(sorted(draw(st.lists(st.integers(0, pos + 3), min_size=2, max_size=2))))
                      for _ in range(draw(st.integers(0, 4)))])
    width = max(map(len, rows))
    offsets = np.zeros((len(rows), width, 2), np.int64)
    for b, row in enumerate(rows):
        offsets[b, : len(row)] = row
    return offsets, spans


@settings(max_examples=300, deadline=None)
@given(token_rows())
def test_align_span_arrays_equals_the_rule_span_by_span(case):
    offsets, spans = case
    row = np.repeat(np.arange(len(spans)), [len(s) for s in spans])
    flat = np.asarray([s for r in spans for s in r], np.int64).reshape(-1, 2)
    start, end, ok = align_span_arrays(row, flat[:, 0], flat[:, 1], offsets)
    expected = [overlapping_tokens(r, offsets[b]) for b, r in enumerate(spans)]
    assert [(int(s), int(e)) if k else None for s, e, k in zip(start, end, ok)] == [t for r in expected for t in r]
    assert align_batch(spans, offsets) == expected
    assert [align_spans(r, offsets[b]) for b, r in enumerate(spans)] == expected
