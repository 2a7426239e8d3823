"""Pictures of cross-modal CutMix views: which words a batch replaced, and by which bank patches.

`render_cmc_views` turns a collated `CMCBatch` into a self-contained HTML page (patches inlined as PNG
data URIs, no external assets) or a PNG: per caption, the caption with the replaced words marked (and
the grounded words that stayed text underlined, given their spans), then the view as the model reads
it, token by token, with each bank patch inline where it replaced its word, labelled with its concept.
`preview_captions` does the whole trip for the CLI (`cmcaug preview BANK --captions FILE`): read and tag
captions, collate them with `CMCTransform`, render; its default tokenizer, `cmcaug.tokenize.tokenize_words`,
needs no vocabulary file, so that trip needs no model download.

Where the plan puts two patches side by side, it does not say which of the replaced tokens each one
took: such words are marked as one run, labelled with both concepts.
"""
from __future__ import annotations

import base64
import colorsys
import dataclasses
import html
import io
import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .tokenize import tokenize_with_offsets, tokenize_words
from .errors import InputError
from .items import IndexedItems, item_spans, parse_item

if TYPE_CHECKING:
    from .bank import PatchBank
    from .concepts import ConceptVocab
    from .transform import CMCBatch


# -- the layout: what each caption row shows, shared by the HTML and the PNG ------------------------


@dataclasses.dataclass(frozen=True)
class _Token:
    text: str
    slot: int  # patch slot, or -1 for a text token
    concept: int  # of the patch, or -1
    special: bool
    glued: bool  # no whitespace before it in the caption


@dataclasses.dataclass(frozen=True)
class _Mark:
    start: int  # characters of the caption
    end: int
    concept: int  # colour key (first concept of a run)
    label: str
    replaced: bool  # False: grounded but kept as text


@dataclasses.dataclass(frozen=True)
class _Row:
    title: str
    caption: str
    marks: list[_Mark]
    tokens: list[_Token]


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


def _layout(batch: CMCBatch, tokenizer: Any, vocab: ConceptVocab | None, grounded: Sequence[Any] | None,
            rows: int) -> list[_Row]:
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
        marks = [_Mark(s, e, concepts[slots[0]], " + ".join(name(concepts[m]) for m in slots), True)
                 for slots, s, e in spans]
        for s, e, c in parse_item({"caption": caption, "spans": grounded[b]}, b).spans if grounded else ():
            if not any(m.start < e and s < m.end for m in marks):
                marks.append(_Mark(s, e, c, name(c), False))
        chars = {m: (s, e) for slots, s, e in spans for m in slots}  # slot -> the characters it replaced
        tokens, previous_end = [], None
        for v in order:
            if v < 0:
                start, end = chars.get(-1 - v, (0, 0))
                token = _Token(name(concepts[-1 - v]), -1 - v, concepts[-1 - v], False, False)
            else:
                start, end = (0, 0) if offsets is None else (int(offsets[b, v, 0]), int(offsets[b, v, 1]))
                text = caption[start:end] if end > start else _token_name(tokenizer, int(ids[b, v]))
                token = _Token(text, -1, -1, bool(special[b, v]) or (offsets is not None and end <= start), False)
            glued = end > start and previous_end == start  # no space between it and the token before
            tokens.append(dataclasses.replace(token, glued=glued))
            previous_end = end if end > start else previous_end
        title = f"#{indices[b]}" if indices[b] >= 0 else f"row {b}"
        out.append(_Row(title, caption, sorted(marks, key=lambda m: m.start), tokens))
    return out


# -- drawing ------------------------------------------------------------------------------------------


def _colour(concept: int, lightness: float) -> tuple[int, int, int]:
    """One hue per concept (golden-ratio steps around the wheel), so a mark and its patch match."""
    rgb = colorsys.hls_to_rgb((concept * 0.618033988749895) % 1.0, lightness, 0.75)
    return tuple(round(255 * c) for c in rgb)  # type: ignore[return-value]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _data_uri(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222;background:#f7f7f5}
h1{font-size:1.35em;margin:0 0 .2em}h2{font-size:.85em;color:#777;margin:0;font-weight:normal}
.meta{color:#555;margin:.2em 0 1.2em}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em 1em .5em;margin:0 0 .9em}
.caption{margin:.15em 0 .5em}.caption.empty{color:#999;font-style:italic}
mark{border-radius:3px;padding:0 2px;color:inherit}
.grounded{text-decoration:underline dotted #2a7d5a;text-decoration-thickness:2px;text-underline-offset:3px}
.view{display:flex;flex-wrap:wrap;align-items:center;row-gap:6px}
.tok{font:13px ui-monospace,monospace;padding:1px 4px;margin-left:6px;
  background:#eef2f7;border:1px solid #d3dbe6;border-radius:3px}
.tok.special{color:#8a8f99;background:#f4f4f4;border-style:dashed}
figure{margin:0 0 0 6px;text-align:center;font-size:11px;line-height:1.2;color:#444}
figure img{display:block;image-rendering:pixelated;border:3px solid;border-radius:3px}
.glued{margin-left:1px}
"""


def _caption_html(row: _Row) -> str:
    if not row.caption.strip():
        return '<p class="caption empty">(empty caption)</p>'
    parts, at = [], 0
    for m in row.marks:
        if m.start < at:  # overlapping grounded spans given by the caller: the first one wins
            continue
        parts.append(html.escape(row.caption[at : m.start]))
        text, label = html.escape(row.caption[m.start : m.end]), html.escape(m.label)
        if m.replaced:
            parts.append(f'<mark class="replaced" style="background:{_hex(_colour(m.concept, 0.82))}" '
                         f'title="{label}: replaced by a bank patch">{text}</mark>')
        else:
            parts.append(f'<span class="grounded" title="{label}: grounded, kept as text">{text}</span>')
        at = m.end
    return f'<p class="caption">{"".join(parts)}{html.escape(row.caption[at:])}</p>'


def _view_html(row: _Row, uris: Mapping[int, str], patch_ids: Sequence[int], side: int) -> str:
    cells = []
    for t in row.tokens:
        glued, text = " glued" if t.glued else "", html.escape(t.text)
        if t.slot >= 0:
            cells.append(f'<figure class="patch{glued}"><img src="{uris[t.slot]}" width="{side}" height="{side}" '
                         f'alt="{text}" title="{text}: bank patch {patch_ids[t.slot]}" '
                         f'style="border-color:{_hex(_colour(t.concept, 0.45))}"/>'
                         f"<figcaption>{text}</figcaption></figure>")
        else:
            cells.append(f'<span class="tok{" special" if t.special else ""}{glued}">{text}</span>')
    return f'<div class="view">{"".join(cells)}</div>'


def _html(batch: CMCBatch, rows: list[_Row], side: int, title: str) -> str:
    pixels, patch_ids = batch.pixels.cpu().numpy(), batch.patch_ids.tolist()
    shown = {t.slot for row in rows for t in row.tokens if t.slot >= 0}
    uris = {m: _data_uri(pixels[m]) for m in sorted(shown)}
    stats = batch.stats
    meta = (f"{len(rows)} of {len(batch)} captions; {stats.spans_replaced} of {stats.spans} grounded words of the "
            f"batch replaced by bank patches. Marked: replaced by the patch shown below it; dotted underline: "
            f"grounded, kept as text.")
    sections = "".join(f"<section><h2>{html.escape(row.title)}</h2>{_caption_html(row)}"
                       f"{_view_html(row, uris, patch_ids, side)}</section>" for row in rows)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body><h1>{html.escape(title)}</h1>"
            f'<p class="meta">{html.escape(meta)}</p>\n'
            f"{sections}\n</body></html>\n")


_MARGIN, _GAP = 12, 6


def _png(batch: CMCBatch, rows: list[_Row], side: int) -> Image.Image:
    """The same page as a PNG (Pillow's built-in font): for reports and READMEs, where HTML does not show."""
    font, small = ImageFont.load_default(14), ImageFont.load_default(11)
    pixels = batch.pixels.cpu().numpy()
    resample = Image.Resampling.NEAREST if side >= pixels.shape[1] else Image.Resampling.BOX
    width = max(720, *(int(font.getlength(f"{r.title}  {r.caption}")) + 2 * _MARGIN for r in rows))
    line = side + 18

    def flow(row: _Row, top: int, sheet: Image.Image | None = None) -> int:
        """Lay out (and given a sheet, draw) one row from `top`; returns where the next row starts."""
        indent = _MARGIN + int(font.getlength(row.title + "  "))
        draw = ImageDraw.Draw(sheet) if sheet is not None else None
        if draw is not None:
            draw.text((_MARGIN, top), row.title, fill=(120, 120, 120), font=font)
            for m in row.marks:
                x0 = indent + font.getlength(row.caption[: m.start])
                x1 = indent + font.getlength(row.caption[: m.end])
                if m.replaced:
                    draw.rectangle((x0 - 1, top, x1, top + 17), fill=_colour(m.concept, 0.82))
                else:
                    draw.line((x0, top + 17, x1, top + 17), fill=(42, 125, 90), width=2)
            draw.text((indent, top), row.caption, fill=(20, 20, 20), font=font)
        x, y = _MARGIN, top + 26
        for t in row.tokens:
            w = side if t.slot >= 0 else int(font.getlength(t.text)) + 8
            gap = 1 if t.glued else _GAP
            if x + gap + w > width - _MARGIN and x > _MARGIN:
                x, y = _MARGIN, y + line
            x += gap
            if draw is not None:
                if t.slot >= 0:
                    draw.rectangle((x - 2, y - 2, x + side + 1, y + side + 1), fill=_colour(t.concept, 0.45))
                    patch = Image.fromarray(pixels[t.slot], "RGB").resize((side, side), resample)
                    sheet.paste(patch, (x, y))
                    draw.text((x + side / 2, y + side + 3), t.text, fill=(60, 60, 60), font=small, anchor="mt")
                else:
                    middle = y + side // 2
                    fill, ink = ((244, 244, 244), (138, 143, 153)) if t.special else ((238, 242, 247), (20, 20, 20))
                    draw.rectangle((x, middle - 10, x + w, middle + 10), fill=fill, outline=(211, 219, 230))
                    draw.text((x + 4, middle), t.text, fill=ink, font=font, anchor="lm")
            x += w
        return y + line + 10

    height = _MARGIN
    for row in rows:
        height = flow(row, height)
    sheet, top = Image.new("RGB", (width, height), (255, 255, 255)), _MARGIN
    for row in rows:
        top = flow(row, top, sheet)
    return sheet


def render_cmc_views(
    batch: CMCBatch,
    path: str | Path,
    *,
    tokenizer: Any = None,
    vocab: ConceptVocab | None = None,
    grounded: Sequence[Any] | None = None,
    max_rows: int = 16,
    tile_size: int | None = None,
    title: str = "CMC views",
) -> Path:
    """Write the CMC views of the first `max_rows` captions of `batch` as HTML, or as a PNG for a `.png` path.

    `tokenizer`: the one that made the batch; each token's character offsets give its text and the
    caption marks (without it tokens show as ids and nothing is marked). `vocab` names the concepts
    (default: their ids). `grounded`: each caption's grounded spans (tag rows' "spans", `GroundedSpan`s or
    `(start, end, concept_id)`), to also underline the grounded words that stayed text. Patches are drawn
    `tile_size` pixels wide (default: their own size, at least 48); the HTML inlines them as they are.
    """
    tile_size = max(48, int(batch.pixels.shape[1])) if tile_size is None else tile_size
    if max_rows < 1 or tile_size < 1:
        raise InputError(f"max_rows and tile_size must be at least 1, got {max_rows} and {tile_size}")
    if grounded is not None and len(grounded) < min(len(batch), max_rows):
        raise InputError(f"grounded holds spans for {len(grounded)} captions; pass one span list per caption "
                         "of the batch")
    rows = _layout(batch, tokenizer, vocab, grounded, min(len(batch), max_rows))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        _png(batch, rows, tile_size).save(path, format="PNG")
    else:
        path.write_text(_html(batch, rows, tile_size, title), encoding="utf-8")
    return path


# -- the CLI's trip: captions in, page out ---------------------------------------------------------------


def _read_items(captions: str | Path | Sequence[Any], vocab: ConceptVocab, rows: int, field: str) -> list[Any]:
    """The first `rows` items of a tags file, a caption file, or a list (captions or tag rows)."""
    if not isinstance(captions, (str, os.PathLike)):
        return list(itertools.islice(captions, rows))
    import pyarrow.parquet as pq

    from .tags import read_captions

    path = Path(captions)
    if not path.is_file():
        raise InputError(f"{path}: no such captions file")
    if path.suffix.lower() == ".parquet" and "spans" in pq.read_schema(path).names:
        tags = IndexedItems.of(path, vocab)
        return tags.__getitems__(range(min(rows, len(tags))))
    return [row.value if isinstance(row.value, str) else "" for row in itertools.islice(read_captions([path], field), rows)]


def _resolve_tokenizer(tokenizer: Any) -> Any:
    if tokenizer == "words":
        return tokenize_words
    if tokenizer == "open_clip":
        from .deps import require

        return require("open_clip", "The open_clip tokenizer").get_tokenizer("ViT-B-32")  # BPE ships in the wheel
    if isinstance(tokenizer, str):
        raise InputError(f"tokenizer must be 'words', 'open_clip' or a tokenizer object, got {tokenizer!r}")
    return tokenizer


def preview_captions(
    bank: PatchBank,
    captions: str | Path | Sequence[Any],
    path: str | Path,
    *,
    tokenizer: Any = "words",
    rows: int = 16,
    ratio: float = 0.5,
    seed: int = 0,
    field: str = "caption",
    mode: str = "tagger",
    tile_size: int | None = None,
) -> dict[str, Any]:
    """Render the CMC views of the first `rows` captions against `bank` (`render_cmc_views`); returns stats.

    `captions`: a `cmcaug tag-text` Parquet file (its spans are used), a .txt / .jsonl / .parquet caption
    file (`field` names the JSON field or column), or a list of captions or tag rows. Captions without
    spans are tagged with `GroundingTagger(bank.vocab, mode=mode)`. `tokenizer`: "words"
    (`tokenize_words`), "open_clip" (open_clip's ViT-B-32 byte-pair tokenizer, whose vocabulary ships
    with the package, so nothing is downloaded), or any tokenizer `CMCTransform` takes.
    """
    from .transform import CMCTransform

    if rows < 1:
        raise InputError(f"rows must be at least 1, got {rows}")
    items = [parse_item(item, i) for i, item in enumerate(_read_items(captions, bank.vocab, rows, field))]
    if not items:
        raise InputError(f"{captions}: holds no captions")
    tagger = None
    if any(item.spans is None for item in items):  # spaCy loads only when some caption needs it
        from .grounding import GroundingTagger

        tagger = GroundingTagger(bank.vocab, mode=mode)
    spans = item_spans(items, tagger)
    tok = _resolve_tokenizer(tokenizer)
    cmc = CMCTransform(bank, tok, ratio=ratio, seed=seed)
    batch = cmc.collate([(i if item.index is None else item.index, {"caption": item.caption, "spans": s})
                         for i, (item, s) in enumerate(zip(items, spans))])
    out = render_cmc_views(batch, path, tokenizer=tok, vocab=bank.vocab, grounded=spans, max_rows=rows,
                           tile_size=tile_size)
    stats = batch.stats.as_dict()
    absent = {bank.vocab.name(c): n for c, n in stats.pop("absent_concepts").items()}
    return {"output": str(out), **stats, "absent_concepts": absent}
