"""Tokenizing with offsets: every token's character range in the original text, for any tokenizer.

Grounded words are character spans; `cmcaug.text.align` maps them onto tokens from each token's `(start, end)`.
`tokenize_with_offsets` produces those offsets for a batch, right-padded into a `TokenizedBatch`: for HF
fast tokenizers directly, for open_clip's `SimpleTokenizer` (which returns none) by decoding its
byte-pair tokens back to bytes and walking them along the original text (`OpenClipOffsets`), and for any
callable that returns ids and offsets, such as `tokenize_words` (one token per word or punctuation mark,
no vocabulary file).
"""
from __future__ import annotations

import contextlib
import difflib
import html.entities
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError


def as_pairs(values: Any) -> list[tuple[int, int]]:
    """`(start, end)` int pairs from a list, a NumPy array or a tensor of them."""
    if hasattr(values, "tolist"):  # numpy arrays, torch tensors
        values = values.tolist()
    return [(int(v[0]), int(v[1])) for v in values]


@dataclass(frozen=True)
class TokenizedBatch:
    """A right-padded batch: `input_ids` int64 `[B, L]`, `attention_mask` int64 `[B, L]`, `offsets` int32
    `[B, L, 2]`, `special_tokens_mask` bool `[B, L]`.

    Special tokens and padding have offset `(0, 0)`, so `align_spans(spans, batch.offsets[b])` works as is;
    [UNK] keeps its offsets (it stands for a word of the text). `special_tokens_mask` marks padding and the
    tokenizer's `all_special_ids` ([UNK] included, as HF's MLM collator does), the tokens MLM never picks.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    offsets: np.ndarray
    special_tokens_mask: np.ndarray


def _pad(ids: Sequence[Sequence[int]], offsets: Sequence[Sequence[tuple[int, int]]], masks: Sequence[Sequence[int]] | None,
         *, width: int | None = None, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, offsets) of per-text lists cut after `max_length` tokens, right-padded
    with id 0 to `width` (default: the longest)."""
    if len(ids) != len(offsets):
        raise InputError(f"tokenizer returned {len(ids)} id lists but {len(offsets)} offset lists")
    kept = [len(x) if max_length is None else min(len(x), max_length) for x in ids]
    width = width if width is not None else max(kept, default=0)
    input_ids = np.zeros((len(ids), width), dtype=np.int64)
    attention_mask = np.zeros((len(ids), width), dtype=np.int64)
    offset_array = np.zeros((len(ids), width, 2), dtype=np.int32)
    for b, (row_ids, row_offsets, n) in enumerate(zip(ids, offsets, kept)):
        if len(row_offsets) != len(row_ids):
            raise InputError(f"text {b}: tokenizer returned {len(row_ids)} ids but {len(row_offsets)} offsets")
        input_ids[b, :n] = row_ids[:n]
        attention_mask[b, :n] = masks[b][:n] if masks is not None else 1
        if n:
            offset_array[b, :n] = row_offsets[:n]
    return input_ids, attention_mask, offset_array


def _batch(tokenizer: Any, input_ids: np.ndarray, attention_mask: np.ndarray, offsets: np.ndarray) -> TokenizedBatch:
    special_ids = np.asarray(getattr(tokenizer, "all_special_ids", None) or (), dtype=np.int64)
    special = (attention_mask == 0) | np.isin(input_ids, special_ids)
    return TokenizedBatch(input_ids, attention_mask, offsets, special)


def _is_hf_fast(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "is_fast", False)) and callable(tokenizer)


def _is_open_clip(tokenizer: Any) -> bool:
    return all(hasattr(tokenizer, a) for a in ("byte_decoder", "decoder", "encode", "clean_fn", "sot_token_id"))


def _hf_batch(tokenizer: Any, texts: list[str], max_length: int | None) -> TokenizedBatch:
    options = {"return_offsets_mapping": True, "return_token_type_ids": False,
               "truncation": max_length is not None, "max_length": max_length}
    if getattr(tokenizer, "pad_token_id", None) is not None:  # padded lists -> NumPy: faster than padding here
        enc = tokenizer(texts, padding="longest", padding_side="right", **options)
        input_ids = np.asarray(enc["input_ids"], dtype=np.int64)
        arrays = (input_ids, np.asarray(enc["attention_mask"], dtype=np.int64),
                  np.asarray(enc["offset_mapping"], dtype=np.int32).reshape(*input_ids.shape, 2))
    else:  # byte-level BPE tokenizers (GPT-2 style) often have no pad token: padded here, with id 0
        enc = tokenizer(texts, **options)
        arrays = _pad(enc["input_ids"], enc["offset_mapping"], enc["attention_mask"])
    batch = _batch(tokenizer, *arrays)
    unk = getattr(tokenizer, "unk_token_id", None)
    batch.offsets[batch.special_tokens_mask & (batch.input_ids != unk)] = 0  # some give specials a span
    return batch


def tokenize_with_offsets(tokenizer: Any, texts: Sequence[str], *, max_length: int | None = None) -> TokenizedBatch:
    """Tokenize `texts` and report every token's character offsets into the original text.

    `tokenizer` is one of:
    - an HF fast tokenizer (`transformers.PreTrainedTokenizerFast`: BERT WordPiece, RoBERTa / CLIP
      byte-level BPE, ...); a raw `tokenizers.Tokenizer` works once wrapped as
      `PreTrainedTokenizerFast(tokenizer_object=tok)`. Pads to the longest text, truncates at `max_length`.
    - open_clip's `SimpleTokenizer` (`open_clip.get_tokenizer("ViT-B-32")`): ids equal `tokenizer(texts,
      max_length)`, i.e. `<start>` tokens `<end>` zero-padded to its context length, `<end>` replacing the
      last token when truncated.
    - any callable `f(texts) -> (ids, offsets)` with one id list and one `(start, end)` list per text;
      each text's tokens are cut after the first `max_length`, and padded with id 0 to the longest.
    """
    texts = list(texts)
    if not texts:
        return _batch(tokenizer, *_pad([], [], None))
    if not all(isinstance(t, str) for t in texts):
        bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
        raise InputError(f"texts[{bad}] is a {type(texts[bad]).__name__}, expected a str")
    if _is_hf_fast(tokenizer):
        return _hf_batch(tokenizer, texts, max_length)
    if _is_open_clip(tokenizer):
        return OpenClipOffsets.for_tokenizer(tokenizer).batch(texts, max_length)
    if getattr(tokenizer, "is_fast", None) is False:
        raise InputError(f"{type(tokenizer).__name__} is a slow (Python) HF tokenizer, which cannot return offsets: "
                         "load the fast one, e.g. AutoTokenizer.from_pretrained(name, use_fast=True)")
    if callable(tokenizer):
        result = tokenizer(texts)
        if not (isinstance(result, tuple) and len(result) == 2):
            hint = ""
            if _is_hf_fast(getattr(tokenizer, "tokenizer", None)):  # e.g. open_clip's HFTokenizer wrapper
                hint = f"; {type(tokenizer).__name__} wraps an HF fast tokenizer: pass its .tokenizer instead"
            raise InputError(f"a tokenizer callable must return (ids, offsets) per text, got {type(result).__name__}{hint}")
        ids, offsets = result
        return _batch(tokenizer, *_pad([list(map(int, r)) for r in ids], [as_pairs(o) for o in offsets], None,
                                       max_length=max_length))
    raise InputError(f"cannot tokenize with a {type(tokenizer).__name__}: expected an HF fast tokenizer, "
                     "open_clip's SimpleTokenizer, or a callable texts -> (ids, offsets)")


_WORD = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")


def tokenize_words(texts: Sequence[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Words (hyphens and apostrophes kept inside) and punctuation marks as tokens: `(ids, offsets)` per text.

    A tokenizer callable for `tokenize_with_offsets` and `CMCTransform` that needs no vocabulary file, for
    previews and tests: a token's id is a CRC-32 of its lowercased text (stable across runs and processes;
    no special tokens, no padding id of its own).
    """
    ids, offsets = [], []
    for text in texts:
        words = list(_WORD.finditer(text))
        ids.append([zlib.crc32(m.group().lower().encode()) & 0x7FFFFFFF for m in words])
        offsets.append([m.span() for m in words])
    return ids, offsets


# -- open_clip: offsets recovered from the byte-pair decoding -------------------------------------

# A character with its combining marks, or an HTML entity (which open_clip unescapes), is one unit. Named
# entities end at ";", or without it only the legacy names html.unescape knows ("&ampdog" is "&" + "dog").
_LEGACY_ENTITIES = "|".join(sorted((k for k in html.entities.html5 if not k.endswith(";")), key=len, reverse=True))
_UNIT = re.compile(rf"&(?:amp;)*(?:#[0-9]{{1,7}};?|#[xX][0-9a-fA-F]{{1,6}};?|[A-Za-z][A-Za-z0-9]{{0,31}};|{_LEGACY_ENTITIES})"
                   r"|.[\u0300-\u036f]*", re.S)


class OpenClipOffsets:
    """Character offsets for open_clip's `SimpleTokenizer`, which returns ids only.

    The tokenizer cleans the text (ftfy, HTML unescaping, whitespace collapsing, lowercasing) before
    byte-pair encoding, and every non-space byte of the cleaned text lands in exactly one token. So the
    token bytes, concatenated, equal the cleaned text without whitespace. Cleaning the original text
    unit by unit (a character, or an HTML entity) gives the same string with each character's origin
    known; the tokens then take the origins of their bytes. Where cleaning in context differs from
    cleaning unit by unit (mojibake repair, final sigma), a sequence alignment maps what it can and
    tokens with no origin get `(0, 0)`, so spans over them are dropped rather than misplaced.
    """

    def __init__(self, tokenizer: Any):
        if getattr(tokenizer, "reduction_fn", None) is not None:
            raise InputError("open_clip tokenizers with a reduction_mask drop tokens at random, so offsets cannot be "
                             "recovered: build the tokenizer with reduction_mask='' (the default)")
        self.tokenizer = tokenizer
        self._token_bytes: dict[int, bytes] = {}
        self._clean_units: dict[str, str] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> OpenClipOffsets:
        """One instance per tokenizer, stored on it (so it lives and dies with it; its caches make it fast)."""
        cached = getattr(tokenizer, "_cmcaug_offsets", None)
        if cached is None:
            cached = cls(tokenizer)
            with contextlib.suppress(AttributeError):  # a tokenizer with __slots__: no caching across calls
                tokenizer._cmcaug_offsets = cached
        return cached

    def _bytes_of(self, token_id: int) -> bytes:
        piece = self._token_bytes.get(token_id)
        if piece is None:
            text = self.tokenizer.decoder[token_id].replace("</w>", "")
            piece = bytes(self.tokenizer.byte_decoder[c] for c in text)
            self._token_bytes[token_id] = piece
        return piece

    def _clean(self, unit: str) -> str:
        out = self._clean_units.get(unit)
        if out is None:
            out = "".join(self.tokenizer.clean_fn(unit).split())
            self._clean_units[unit] = out
        return out

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (as `tokenizer.encode`) and each token's `(start, end)` in `text`."""
        ids = self.tokenizer.encode(text)
        pieces = [self._bytes_of(i) for i in ids]
        raw = b"".join(pieces)
        stream = raw.decode("utf-8")  # the bytes of valid text, split into tokens
        origins = self._origins(text, stream)
        if len(raw) == len(stream):
            char_of: Sequence[int] = range(len(raw))
        else:  # byte b lies in character char_of[b]; a multi-byte character may span two tokens
            char_of = [k for k, ch in enumerate(stream) for _ in range(len(ch.encode("utf-8")))]
        offsets, b = [], 0
        for piece in pieces:
            known = [o for o in origins[char_of[b]:char_of[b + len(piece) - 1] + 1] if o is not None] if piece else []
            b += len(piece)
            offsets.append((known[0][0], known[-1][1]) if known else (0, 0))  # origins are in text order
        return ids, offsets

    def _origins(self, text: str, stream: str) -> list[tuple[int, int] | None]:
        """The `(start, end)` in `text` of each character of `stream` (the cleaned text without spaces)."""
        kept = [i for i, ch in enumerate(text) if not ch.isspace()]
        if len(kept) == len(stream) and "".join([text[i] for i in kept]).lower() == stream:
            return [(i, i + 1) for i in kept]  # cleaning only lowercased and dropped whitespace
        cleaned: list[str] = []
        spans: list[tuple[int, int]] = []
        for m in _UNIT.finditer(text):
            for ch in self._clean(m.group()):
                cleaned.append(ch)
                spans.append(m.span())
        if "".join(cleaned) == stream:
            return list(spans)
        origins: list[tuple[int, int] | None] = [None] * len(stream)
        matcher = difflib.SequenceMatcher(None, stream, "".join(cleaned), autojunk=False)
        for tag, i0, i1, j0, j1 in matcher.get_opcodes():
            if tag == "equal" or (tag == "replace" and i1 - i0 == j1 - j0):
                origins[i0:i1] = spans[j0:j1]
            elif tag == "replace":
                whole = (spans[j0][0], spans[j1 - 1][1])
                origins[i0:i1] = [whole] * (i1 - i0)
        return origins

    def batch(self, texts: Sequence[str], context_length: int | None = None) -> TokenizedBatch:
        """Ids exactly as `tokenizer(texts, context_length)` returns them, with offsets and a mask."""
        tok = self.tokenizer
        length = context_length or tok.context_length
        if not length or length < 2:
            raise InputError(f"open_clip context length must be >= 2, got {length}")
        ids, offsets = [], []
        for text in texts:
            row_ids, row_offsets = self.encode(text)
            row_ids = [tok.sot_token_id, *row_ids, tok.eot_token_id]
            row_offsets = [(0, 0), *row_offsets, (0, 0)]
            if len(row_ids) > length:
                row_ids, row_offsets = row_ids[:length], row_offsets[:length]
                row_ids[-1], row_offsets[-1] = tok.eot_token_id, (0, 0)
            ids.append(row_ids)
            offsets.append(row_offsets)
        return _batch(tok, *_pad(ids, offsets, None, width=length))

