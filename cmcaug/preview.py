"""Pictures of what cmcaug works with, for eyes rather than models: patch grids, bank previews, TiMix mixes.

A bank is only as good as its patches, and the fastest check is to look at them: `preview_bank` draws
one row per concept with a few sampled patches, `render_patch_grid` any stack of patches with labels.
`render_mix` shows what TiMix did to a batch: each image, its partner with the window that was cut out,
and the mixed image with the window it landed in; `preview_timix` mixes the first images of an annotated
corpus for it, with box coverage as relevance. Text uses Pillow's built-in bitmap font, so rendering
never needs a font file or the network. CMC views (HTML) are drawn by `cmcaug.views`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import InputError

if TYPE_CHECKING:
    from .bank import PatchBank
    from .timix import MixResult

_PAD = 4
_LABEL_HEIGHT = 13
_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_EMPTY = (225, 225, 225)
_WINDOW = (255, 0, 200)  # TiMix window outlines: a magenta that photos rarely hold

Cell = tuple[np.ndarray, str | None]


def _as_patches(pixels: Any) -> np.ndarray:
    """uint8 `[M, P, P, 3]` numpy view of a numpy array or a (CPU or GPU) tensor."""
    if hasattr(pixels, "detach"):
        pixels = pixels.detach().cpu().numpy()
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[1] != pixels.shape[2]:
        raise InputError(f"patches must be uint8 [M, P, P, 3], got {pixels.dtype} {list(pixels.shape)}")
    return pixels


def _fit(font: ImageFont.ImageFont, text: str, width: int) -> str:
    """`text` cut (with '..') to fit `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "..") > width:
        text = text[:-1]
    return text + ".."


def _wrap(font: ImageFont.ImageFont, text: str, width: int) -> list[str]:
    """`text` broken at spaces into lines of at most `width` pixels (a longer word gets a line of its own, cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += " " + word
        else:
            lines.append(_fit(font, word, width))
    return lines


def _compose(rows: Sequence[Sequence[Cell]], titles: Sequence[str] | None, tile: tuple[int, int],
             heading: str | None = None) -> Image.Image:
    """Rows of (image, label) cells drawn `tile` = (width, height) pixels on a white sheet; optional row
    titles on the left and a `heading` above, wrapped to the sheet's width."""
    font = ImageFont.load_default_imagefont()
    width, height = tile
    labelled = any(label for row in rows for _, label in row)
    cell_w, cell_h = width + _PAD, height + _PAD + (_LABEL_HEIGHT if labelled else 0)
    title_w = int(max(font.getlength(t) for t in titles)) + 2 * _PAD if titles else 0
    columns = max(1, max(len(row) for row in rows))
    sheet_w = title_w + columns * cell_w + _PAD
    lines = _wrap(font, heading, sheet_w - 2 * _PAD) if heading else []
    head_h = len(lines) * _LABEL_HEIGHT + (_PAD if lines else 0)
    sheet = Image.new("RGB", (sheet_w, head_h + len(rows) * cell_h + _PAD), _BACKGROUND)
    draw = ImageDraw.Draw(sheet, "RGB")
    for k, line in enumerate(lines):
        draw.text((_PAD, _PAD + k * _LABEL_HEIGHT), line, fill=_INK, font=font)
    for r, row in enumerate(rows):
        top = head_h + _PAD + r * cell_h
        if titles:
            draw.text((_PAD, top + max(0, (height - _LABEL_HEIGHT) // 2)), titles[r], fill=_INK, font=font)
            if not row:
                draw.rectangle((title_w + _PAD, top, title_w + _PAD + width - 1, top + height - 1), fill=_EMPTY)
        for c, (pixels, label) in enumerate(row):
            left = title_w + _PAD + c * cell_w
            sheet.paste(_resized(Image.fromarray(pixels, "RGB"), tile), (left, top))
            if label:
                draw.text((left, top + height + 1), _fit(font, label, width), fill=_INK, font=font)
    return sheet


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` at `size`: nearest-neighbour when enlarging (pixels stay crisp), box filter when shrinking."""
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.NEAREST if size[0] > image.width else Image.Resampling.BOX)


def _save(sheet: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def render_patch_grid(
    pixels: Any, labels: Sequence[str] | None, path: str | Path, columns: int = 8, *, tile_size: int | None = None
) -> Path:
    """Write patches `[M, P, P, 3]` (uint8 array or tensor) as a PNG grid, each tile with its label.

    `tile_size` rescales tiles (nearest-neighbour when enlarging), so small patches stay visible.
    """
    patches = _as_patches(pixels)
    if len(patches) == 0:
        raise InputError("render_patch_grid needs at least one patch, got none")
    if labels is not None and len(labels) != len(patches):
        raise InputError(f"got {len(labels)} labels for {len(patches)} patches; pass one label per patch or None")
    if columns < 1:
        raise InputError(f"columns must be at least 1, got {columns}")
    cells = [(patch, None if labels is None else str(labels[i])) for i, patch in enumerate(patches)]
    rows = [cells[i : i + columns] for i in range(0, len(cells), columns)]
    side = tile_size or patches.shape[1]
    return _save(_compose(rows, None, (side, side)), path)


def preview_bank(
    bank: PatchBank,
    path: str | Path,
    concepts: Sequence[str | int] | None = None,
    per_concept: int = 8,
    seed: int = 0,
    *,
    tile_size: int | None = None,
) -> Path:
    """Write a PNG with one row per concept: its name and patch count, then up to `per_concept`
    distinct patches drawn at random (all of them when it has fewer), each labelled with its source image.

    `concepts` (names or ids) defaults to every concept that has patches; a requested concept with
    none gets an empty row, so a preview also shows what is missing.
    """
    if per_concept < 1:
        raise InputError(f"per_concept must be at least 1, got {per_concept}")
    vocab = bank.vocab
    counts, offsets = bank.counts, bank.offsets
    if concepts is None:
        ids = [int(i) for i in np.flatnonzero(counts)]
        if not ids:
            raise InputError("the bank has no patches to preview")
    else:
        ids = [vocab.resolve(c) for c in concepts]
    rng = np.random.default_rng(seed)
    chosen = [offsets[i] + rng.choice(counts[i], size=min(counts[i], per_concept), replace=False) for i in ids]
    flat = np.concatenate(chosen).astype(np.int64)
    pixels = _as_patches(bank.pixels(flat))
    labels = [Path(str(record["image"])).name for record in bank.records(flat)]
    cells = list(zip(pixels, labels))
    bounds = np.cumsum([0, *(len(c) for c in chosen)])
    rows = [cells[bounds[r] : bounds[r + 1]] for r in range(len(ids))]
    titles = [f"{vocab.name(i)} ({counts[i]})" for i in ids]
    side = tile_size or bank.patch_size
    return _save(_compose(rows, titles, (side, side)), path)


def _as_images(images: Any, name: str) -> np.ndarray:
    """uint8 `[B, H, W, 3]` from images `[B, C, H, W]` (C = 1 or 3): uint8, or float in [0, 1] (clipped)."""
    if hasattr(images, "detach"):
        images = images.detach()
        images = (images.float() if images.is_floating_point() else images).cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"{name} must be [B, C, H, W] with C = 1 or 3, got shape {list(images.shape)}")
    if images.dtype.kind == "f":
        images = (np.clip(np.nan_to_num(images), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    elif images.dtype != np.uint8:
        raise InputError(f"{name} must be uint8 or float in [0, 1] (undo any normalization first), got {images.dtype}")
    images = images.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images)


def _outlined(image: np.ndarray, size: tuple[int, int], box: Sequence[int] | None) -> np.ndarray:
    """`image` drawn at `size`, with the pixel box (x0, y0, x1, y1), end-exclusive, outlined 2 pixels
    wide just inside its edge (drawn after scaling, so outlines stay crisp at any size)."""
    tile = _resized(Image.fromarray(image, "RGB"), size)
    if box is not None and box[2] > box[0] and box[3] > box[1]:
        sx, sy = size[0] / image.shape[1], size[1] / image.shape[0]
        corners = (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx) - 1, round(box[3] * sy) - 1)
        ImageDraw.Draw(tile).rectangle(corners, outline=_WINDOW, width=2)
    return np.asarray(tile)


def render_mix(
    images: Any, result: MixResult, path: str | Path, *, max_rows: int = 8, tile_size: int | None = 128,
    heading: str | None = None,
) -> Path:
    """Write a PNG of what `text_aware_mix` did: per sample, the image, its partner with the source window
    outlined, and the mixed image with the target window outlined, labelled with lam; `heading` (say, what
    the relevance was) is written above.

    `images` are the inputs of the mix, `[B, C, H, W]` uint8 or float in [0, 1] (array or tensor);
    `result.images` is read the same way. `tile_size` is the drawn length of an image's longer side
    (None: as is). Samples left unmixed (their own partner) show no outline and lam 1.
    """
    originals, mixed = _as_images(images, "images"), _as_images(result.images, "result.images")
    if originals.shape != mixed.shape:
        raise InputError(f"images {list(originals.shape)} and result.images {list(mixed.shape)} differ in shape "
                         "(as [B, H, W, C]); pass the batch that was mixed")
    if max_rows < 1 or (tile_size is not None and tile_size < 1):
        raise InputError(f"max_rows and tile_size must be at least 1, got {max_rows} and {tile_size}")
    height, width = originals.shape[1:3]
    scale = 1.0 if tile_size is None else tile_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    lam, partner = result.lam.tolist(), result.partner.tolist()
    source_box = (result.source_box * result.patch_size).tolist()
    target_box = (result.target_box * result.patch_size).tolist()
    rows = []
    for i in range(min(len(originals), max_rows)):
        j = partner[i]
        rows.append([
            (_outlined(originals[i], size, None), f"image {i}"),
            (_outlined(originals[j], size, source_box[i] if j != i else None), f"partner {j}"),
            (_outlined(mixed[i], size, target_box[i] if j != i else None), f"mixed, lam {lam[i]:.3f}"),
        ])
    if not rows:
        raise InputError("render_mix needs at least one image, got an empty batch")
    return _save(_compose(rows, None, size, heading), path)


def preview_timix(
    corpus: str | Path,
    path: str | Path,
    *,
    rows: int = 8,
    seed: int = 0,
    patch_size: int = 32,
    image_size: int = 224,
    label_mode: Literal["area", "relevance"] = "area",
    tile_size: int | None = 160,
) -> dict[str, Any]:
    """Write a PNG of TiMix on the first `rows` images (by file name) of a COCO-annotated corpus, a folder with
    `images/` and `annotations.json` as `cmcaug synth` writes it (`render_mix`); returns what was mixed.

    A patch's relevance is the share of it that one annotated box covers (`patch_box_coverage`), standing in
    for a trained text-aware head: shapes-world captions name every annotated object. Images are resized to
    `image_size` squared, a multiple of `patch_size`; `text_aware_mix` runs with its defaults (flip partners,
    one window side per batch) and `label_mode`, drawing from a generator seeded with `seed`.
    """
    import torch

    from .detect import AnnotationDetector
    from .images import ImageDecodeError, decode_image, list_images
    from .relevance import patch_box_coverage
    from .synth import ANNOTATIONS, IMAGES_DIR
    from .timix import text_aware_mix

    if rows < 1 or patch_size < 1 or image_size < patch_size or image_size % patch_size:
        raise InputError(f"need rows >= 1 and an image_size that is a positive multiple of patch_size, got rows "
                         f"{rows}, image_size {image_size}, patch_size {patch_size}")
    root = Path(corpus)
    if not (root / IMAGES_DIR).is_dir() or not (root / ANNOTATIONS).is_file():
        raise InputError(f"{root}: expected a corpus folder holding {IMAGES_DIR}/ and {ANNOTATIONS} (COCO boxes), "
                         "as `cmcaug synth` writes one")
    refs = list_images([root / IMAGES_DIR])[:rows]
    pixels = []
    for ref in refs:
        try:
            pixels.append(decode_image(ref.read()))
        except ImageDecodeError as exc:
            raise InputError(f"{ref.path}: cannot decode it ({exc}); remove it from the corpus") from exc
    found = AnnotationDetector(root / ANNOTATIONS).detect(pixels, [ref.key for ref in refs])
    boxes = [torch.from_numpy(d.boxes) / torch.tensor([p.shape[1], p.shape[0]] * 2) for d, p in zip(found, pixels)]
    side = image_size // patch_size
    relevance = patch_box_coverage(boxes, (side, side))  # boxes as fractions: the resize does not move them
    resized = [Image.fromarray(p, "RGB").resize((image_size, image_size), Image.Resampling.BILINEAR) for p in pixels]
    images = torch.from_numpy(np.stack([np.asarray(im) for im in resized])).permute(0, 3, 1, 2).contiguous()
    result = text_aware_mix(images, relevance, patch_size=patch_size, label_mode=label_mode,
                            generator=torch.Generator().manual_seed(seed))
    window = int((result.source_box[:, 2] - result.source_box[:, 0]).max())
    heading = (f"TiMix on {root}: {len(refs)} images at {image_size} px, {side} x {side} patches of {patch_size} "
               f"px, window {window} x {window} patches. Each image (left) gets the window of its partner holding the "
               "most annotated-box area (middle, outlined) pasted over its own window holding the least (right). "
               f"lam ({label_mode}): the weight of the image's own caption in the mixed image's target.")
    out = render_mix(images, result, path, max_rows=rows, tile_size=tile_size, heading=heading)
    return {"output": str(out), "images": [ref.key for ref in refs], "grid": [side, side], "window": window,
            "partner": result.partner.tolist(), "lam": [round(v, 4) for v in result.lam.tolist()]}
