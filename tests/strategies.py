"""Hypothesis strategies for ragged splice plans, and the plain per-row construction they are checked against.

`plan_specs()` draws the arguments of `SplicePlan.build` (rows of any length, spans at the edges, adjacent
spans, rows made entirely of spans, rows with none, a `max_length` that truncates, a padded text width);
`spliced_rows(spec)` lays every row out token by token in plain Python, the way one would by hand. Tests of
the plan, the splice and anything built on them (the CMC transform) compare against that layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from cmcaug.plan import SplicePlan

Token = tuple[str, int, int]
"""One output token: ("text", j, 0) is token j of its row's text; ("patch", m, k) is token k of patch slot m."""


@dataclass(frozen=True)
class PlanSpec:
    """The arguments of `SplicePlan.build`, as drawn."""

    text_lengths: tuple[int, ...]
    spans: tuple[tuple[tuple[int, int], ...], ...]
    patch_tokens: int = 1
    max_length: int | None = None
    text_length: int | None = None

    @property
    def width(self) -> int:
        """L: the padded text width the plan applies to."""
        return self.text_length if self.text_length is not None else max(self.text_lengths)

    def build(self) -> SplicePlan:
        return SplicePlan.build(
            list(self.text_lengths), [list(row) for row in self.spans], self.patch_tokens, self.max_length,
            text_length=self.text_length,
        )


@st.composite
def row_spans(draw: st.DrawFn, length: int, max_spans: int = 5) -> tuple[tuple[int, int], ...]:
    """Sorted, non-overlapping, non-empty spans inside a row of `length` tokens (gaps of 0 make them adjacent)."""
    spans, position = [], 0
    for gap, size in draw(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), max_size=max_spans)):
        start = position + gap
        if start + size > length:
            break
        spans.append((start, start + size))
        position = start + size
    return tuple(spans)


@st.composite
def plan_specs(
    draw: st.DrawFn, max_batch: int = 6, max_text: int = 20, max_patch_tokens: int = 4, max_spans: int = 5,
) -> PlanSpec:
    """Ragged `SplicePlan.build` arguments, edge cases included."""
    lengths = draw(st.lists(st.integers(0, max_text), min_size=1, max_size=max_batch))
    spans = []
    for length in lengths:
        if length and draw(st.booleans()) and draw(st.booleans()):  # a row made entirely of spans
            cuts = sorted(draw(st.sets(st.integers(1, max(1, length - 1)), max_size=max_spans - 1)) | {0, length})
            spans.append(tuple(zip(cuts[:-1], cuts[1:])))
        else:
            spans.append(draw(row_spans(length, max_spans)))
    k = draw(st.integers(1, max_patch_tokens))
    longest = max(n - sum(e - s for s, e in row) + k * len(row) for n, row in zip(lengths, spans))
    max_length = draw(st.none() | st.integers(1, longest + 2))
    text_length = draw(st.none() | st.integers(max(lengths), max(lengths) + 3))
    return PlanSpec(tuple(lengths), tuple(spans), k, max_length, text_length)


def random_spec(rng: np.random.Generator, batch: int, max_text: int = 40, max_patch_tokens: int = 4) -> PlanSpec:
    """A large random spec without hypothesis (many rows per plan: thousands of rows checked cheaply)."""
    lengths = rng.integers(0, max_text + 1, batch)
    spans = []
    for length in lengths:
        flags = rng.random(length) < rng.uniform(0.0, 0.6)  # tokens inside some span
        cuts = np.flatnonzero(np.diff(np.concatenate(([0], flags, [0]))))
        pieces = []
        for start, end in zip(cuts[0::2].tolist(), cuts[1::2].tolist()):
            while start < end:  # split runs at random points, so adjacent spans occur
                stop = int(rng.integers(start + 1, end + 1))
                pieces.append((start, stop))
                start = stop
        spans.append(tuple(pieces))
    k = int(rng.integers(1, max_patch_tokens + 1))
    max_length = None if rng.random() < 0.5 else int(rng.integers(1, max_text + 2))
    width = int(lengths.max()) + int(rng.integers(0, 3))
    return PlanSpec(tuple(lengths.tolist()), tuple(spans), k, max_length, width)


def spliced_rows(spec: PlanSpec) -> list[list[Token]]:
    """Every output row of `spec`, built token by token: the contract of `SplicePlan.build` in plain Python."""
    rows, slot, k, cap = [], 0, spec.patch_tokens, spec.max_length
    for length, spans in zip(spec.text_lengths, spec.spans):
        row: list[Token] = []
        j = 0
        for start, end in spans:
            row += [("text", t, 0) for t in range(j, start)]
            if cap is None or len(row) + k <= cap:
                row += [("patch", slot, i) for i in range(k)]
                slot += 1
            else:
                row += [("text", t, 0) for t in range(start, end)]
            j = end
        row += [("text", t, 0) for t in range(j, length)]
        rows.append(row if cap is None else row[:cap])
    return rows
