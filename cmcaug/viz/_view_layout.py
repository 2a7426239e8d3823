"""What a CMC view picture shows per caption, read off a collated batch's plan: the layout that
`cmcaug.viz.cmc_views` draws as HTML or PNG.

A `Row` holds the caption with its `Mark`s (replaced words, and grounded words kept as text) and the view
as the model reads it, `Token` by token, a bank patch slot where a patch replaced its words. Where the plan
puts two patches side by side, it does not say which of the replaced tokens each one took: such words are
marked as one run, labelled with both concepts.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..inputs import parse_item
from ..text.tokenize import tokenize_with_offsets

if TYPE_CHECKING:
    from ..concepts import ConceptVocab
    from ..transform import CMCBatch


@dataclasses.dataclass(frozen=True)
class Token:
    """One cell of the view as the model reads it: a text token, or a bank patch where it replaced words."""

    text: str
    slot: int  # patch slot, or -1 for a text token
    concept: int  # of the patch, or -1
    special: bool
    glued: bool  # no whitespace before it in the caption


@dataclasses.dataclass(frozen=True)
class Mark:
    """Caption characters to mark: replaced by a bank patch, or grounded and kept as text."""

    start: int  # characters of the caption
    end: int
    concept: int  # colour key (first concept of a run)
    label: str
    replaced: bool  # False: grounded but kept as text


@dataclasses.dataclass(frozen=True)
class Row:
    """One caption's part of the picture."""

    title: str
    caption: str
    marks: list[Mark]
    tokens: list[Token]


def _token_offsets(batch: CMCBatch, tokenizer: Any, rows: int) -> np.ndarray:
    """`[rows, L, 2]` character offsets of the batch's tokens, re-tokenizing its captions with `tokenizer`,
    which must give the batch's token ids (else the offsets would point at other words)."""
    width = batch.input_ids.shape[1]
    tokens = tokenize_with_offsets(tokenizer, batch.captions[:rows], max_length=width)
    ids, offsets = np.zeros((rows, width), np.int64), np.zeros((rows, width, 2), np.int64)
    w = min(width, tokens.input_ids.shape[1])
    ids[:, :w], offsets[:, :w] = tokens.input_ids[:, :w], tokens.offsets[:, :w]
    real = batch.attention_mask[:rows].cpu().numpy().astype(bool)
    differ = np.flatnonzero(((ids != batch.input_ids[:rows].cpu().numpy()) & real).any(axis=1))
    if differ.size:
        raise InputError(f"the tokenizer gives other token ids than the batch holds (caption {int(differ[0])}): "
                         "pass the tokenizer that the CMCTransform collating the batch used")
    return offsets


def _token_name(tokenizer: Any, token_id: int) -> str:
    """A token's own spelling, for tokens that cover no caption text (special tokens)."""
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return str(tokenizer.convert_ids_to_tokens(token_id))
    decoder = getattr(tokenizer, "decoder", None)
    return str(decoder[token_id]) if isinstance(decoder, dict) and token_id in decoder else f"#{token_id}"


def _view_order(source_row: np.ndarray, length: int, row_start: int, k: int) -> list[int]:
    """One spliced row in order: text token j as j >= 0, patch slot m (its first token) as -1 - m."""
    return [int(s) - row_start if s >= 0 else -1 - (-1 - int(s)) // k
            for s in source_row[:length] if s >= 0 or (-1 - int(s)) % k == 0]


def _replaced_spans(order: list[int], replaced: np.ndarray, offsets: np.ndarray) -> list[tuple[list[int], int, int]]:
    """(slots, start, end): the caption characters that each run of adjacent patch slots replaced.

    The replaced tokens of a run lie between the text tokens on either side of it in the view.
    """
    runs = [(is_text, list(group)) for is_text, group in itertools.groupby(order, key=lambda v: v >= 0)]
    spans = []
    for r, (is_text, group) in enumerate(runs):
        if is_text:
            continue
        after = runs[r + 1][1][0] if r + 1 < len(runs) else len(replaced)
        words = [j for j in range(runs[r - 1][1][-1] + 1 if r else 0, after) if replaced[j]]
        if words and offsets[words[-1], 1] > offsets[words[0], 0]:
            spans.append(([-1 - v for v in group], int(offsets[words[0], 0]), int(offsets[words[-1], 1])))
    return spans


def layout(batch: CMCBatch, tokenizer: Any, vocab: ConceptVocab | None, grounded: Sequence[Any] | None,
            rows: int) -> list[Row]:
    """What each of the first `rows` captions shows, read off the plan's source map."""
    plan = batch.plan
    source, ids = plan.source_index.cpu().numpy(), batch.input_ids.cpu().numpy()
    replaced, special = batch.replaced_mask.cpu().numpy(), batch.special_tokens_mask.cpu().numpy()
    concepts, indices = batch.concept_ids.tolist(), batch.indices.tolist()
    offsets = _token_offsets(batch, tokenizer, rows) if tokenizer is not None else None
    name = vocab.name if vocab is not None else (lambda c: f"concept {c}")
    out = []
    for b in range(rows):
        caption = batch.captions[b]
        order = _view_order(source[b], plan.output_lengths[b], b * plan.text_length, plan.patch_tokens)
        spans = _replaced_spans(order, replaced[b], offsets[b]) if offsets is not None else []
        marks = [Mark(s, e, concepts[slots[0]], " + ".join(name(concepts[m]) for m in slots), True)
                 for slots, s, e in spans]
        for s, e, c in parse_item({"caption": caption, "spans": grounded[b]}, b).spans if grounded else ():
            if not any(m.start < e and s < m.end for m in marks):
                marks.append(Mark(s, e, c, name(c), False))
        chars = {m: (s, e) for slots, s, e in spans for m in slots}  # slot -> the characters it replaced
        tokens, previous_end = [], None
        for v in order:
            if v < 0:
                start, end = chars.get(-1 - v, (0, 0))
                token = Token(name(concepts[-1 - v]), -1 - v, concepts[-1 - v], False, False)
            else:
                start, end = (0, 0) if offsets is None else (int(offsets[b, v, 0]), int(offsets[b, v, 1]))
                text = caption[start:end] if end > start else _token_name(tokenizer, int(ids[b, v]))
                token = Token(text, -1, -1, bool(special[b, v]) or (offsets is not None and end <= start), False)
            glued = end > start and previous_end == start  # no space between it and the token before
            tokens.append(dataclasses.replace(token, glued=glued))
            previous_end = end if end > start else previous_end
        title = f"#{indices[b]}" if indices[b] >= 0 else f"row {b}"
        out.append(Row(title, caption, sorted(marks, key=lambda m: m.start), tokens))
    return out
