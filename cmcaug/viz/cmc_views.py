"""Pictures of cross-modal CutMix views: which words a batch replaced, and by which bank patches.

`render_cmc_views` turns a collated `CMCBatch` into a self-contained HTML page (patches inlined as PNG
data URIs, no external assets) or a picture (PNG, JPEG or WebP, drawn in DejaVu Sans: `_sheets.load_font`
says which scripts it covers): per caption, the caption with the replaced words marked (and
the grounded words that stayed text underlined, given their spans), then the view as the model reads
it, token by token, with each bank patch inline where it replaced its word, labelled with its concept
(the layout: `cmcaug.viz._view_layout`). `preview_captions` collates captions with `CMCTransform` and renders
them; its default tokenizer, `cmcaug.text.tokenize.tokenize_words`, needs no vocabulary file, so it needs no
model download.
"""
from __future__ import annotations

import colorsys
import html
import itertools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from ..errors import InputError
from ..inputs import item_spans, parse_item
from ..text.tokenize import tokenize_words
from ._picture_files import data_uri, picture_format, save_picture
from ._sheets import load_font, resized
from ._view_layout import Row, layout

if TYPE_CHECKING:
    from ..bank.reader import PatchBank
    from ..concepts import ConceptVocab
    from ..transform import CMCBatch


def _colour(concept: int, lightness: float) -> tuple[int, int, int]:
    """One hue per concept (golden-ratio steps around the wheel), so a mark and its patch match."""
    rgb = colorsys.hls_to_rgb((concept * 0.618033988749895) % 1.0, lightness, 0.75)
    return tuple(round(255 * c) for c in rgb)  # type: ignore[return-value]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


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


def _caption_html(row: Row) -> str:
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


def _view_html(row: Row, uris: Mapping[int, str], patch_ids: Sequence[int], side: int) -> str:
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


def _html(batch: CMCBatch, rows: list[Row], side: int, title: str) -> str:
    pixels, patch_ids = batch.pixels.cpu().numpy(), batch.patch_ids.tolist()
    shown = {t.slot for row in rows for t in row.tokens if t.slot >= 0}
    uris = {m: data_uri(Image.fromarray(pixels[m], "RGB")) for m in sorted(shown)}
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


def _picture(batch: CMCBatch, rows: list[Row], side: int) -> Image.Image:
    """The same page as a picture: for reports and READMEs, where HTML does not show."""
    font, small = load_font(14), load_font(11)
    pixels = batch.pixels.cpu().numpy()
    width = max(720, *(int(font.getlength(f"{r.title}  {r.caption}")) + 2 * _MARGIN for r in rows))
    line = side + 18

    def flow(row: Row, top: int, sheet: Image.Image | None = None) -> int:
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
                    sheet.paste(resized(Image.fromarray(pixels[t.slot], "RGB"), (side, side)), (x, y))
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
    """Write the CMC views of the first `max_rows` captions of `batch` in the format `path`'s extension names:
    an HTML page for .html/.htm, a picture for .png, .jpg/.jpeg and .webp (`InputError` for another).

    `tokenizer`: the one that made the batch; each token's character offsets give its text and the
    caption marks (without it tokens show as ids and nothing is marked). `vocab` names the concepts
    (default: their ids). `grounded`: each caption's grounded spans (tag rows' "spans", `GroundedSpan`s or
    `(start, end, concept_id)`), to also underline the grounded words that stayed text. Patches are drawn
    `tile_size` pixels wide (default: their own size, at least 48); the HTML inlines them as they are.
    """
    kind = picture_format(path)
    tile_size = max(48, int(batch.pixels.shape[1])) if tile_size is None else tile_size
    if max_rows < 1 or tile_size < 1:
        raise InputError(f"max_rows and tile_size must be at least 1, got {max_rows} and {tile_size}")
    if grounded is not None and len(grounded) < min(len(batch), max_rows):
        raise InputError(f"grounded holds spans for {len(grounded)} captions; pass one span list per caption "
                         "of the batch")
    rows = layout(batch, tokenizer, vocab, grounded, min(len(batch), max_rows))
    if kind != "HTML":
        return save_picture(_picture(batch, rows, tile_size), path, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_html(batch, rows, tile_size, title), encoding="utf-8")
    return path


def _resolve_tokenizer(tokenizer: Any) -> Any:
    if tokenizer == "words":
        return tokenize_words
    if tokenizer == "open_clip":
        from .._deps import require

        return require("open_clip", "The open_clip tokenizer").get_tokenizer("ViT-B-32")  # BPE ships in the wheel
    if isinstance(tokenizer, str):
        raise InputError(f"tokenizer must be 'words', 'open_clip' or a tokenizer object, got {tokenizer!r}")
    return tokenizer


def preview_captions(
    bank: PatchBank,
    captions: Iterable[Any],
    path: str | Path,
    *,
    tokenizer: Any = "words",
    rows: int = 16,
    ratio: float = 0.5,
    seed: int = 0,
    mode: str = "tagger",
    tile_size: int | None = None,
) -> dict[str, Any]:
    """Render the CMC views of the first `rows` captions against `bank` (`render_cmc_views`: `path`'s
    extension picks HTML or a picture); returns stats.

    `captions`: captions or tag rows (their spans are used), or any batch item `CMCTransform` takes; only
    the first `rows` are read, so a lazy iterable over a large file works (`cmcaug preview --captions` reads
    a file so). Captions without spans are tagged with `GroundingTagger(bank.vocab, mode=mode)`.
    `tokenizer`: "words" (`tokenize_words`), "open_clip" (open_clip's ViT-B-32 byte-pair tokenizer, whose
    vocabulary ships with the package, so nothing is downloaded), or any tokenizer `CMCTransform` takes.
    """
    from ..transform import CMCTransform

    picture_format(path)  # before any tagging or collating
    if rows < 1:
        raise InputError(f"rows must be at least 1, got {rows}")
    items = [parse_item(item, i) for i, item in enumerate(itertools.islice(captions, rows))]
    if not items:
        raise InputError("preview_captions needs at least one caption, got none")
    tagger = None
    if any(item.spans is None for item in items):  # spaCy loads only when some caption needs it
        from ..text.grounding import GroundingTagger

        tagger = GroundingTagger(bank.vocab, mode=mode)
    spans = item_spans(items, tagger)
    tok = _resolve_tokenizer(tokenizer)
    cmc = CMCTransform(bank, tok, ratio=ratio, seed=seed)
    batch = cmc.collate([(i if item.index is None else item.index, {"caption": item.caption, "spans": s})
                         for i, (item, s) in enumerate(zip(items, spans))])
    out = render_cmc_views(batch, path, tokenizer=tok, vocab=bank.vocab, grounded=spans, max_rows=rows,
                           tile_size=tile_size)
    return {"output": str(out), **batch.stats.as_dict()}  # absent_concepts by name
