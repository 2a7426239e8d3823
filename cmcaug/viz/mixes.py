"""Pictures of TiMix mixes: each image, its partner with the window that was cut out, and the mixed image.

`render_mix` draws what `text_aware_mix` did to a batch, the windows outlined; `preview_timix` mixes
images in memory for it, with the share of each patch that an object box covers as relevance (no trained
head, no detector: the caller brings the boxes). Both write PNG, JPEG, WebP or an HTML page showing the
picture, as the path's extension says.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import InputError
from ._picture_files import picture_format, save_picture
from ._sheets import as_images, compose, resized

if TYPE_CHECKING:
    from ..timix import MixResult

_WINDOW = (255, 0, 200)  # window outlines: a magenta that photos rarely hold


def _outlined(image: np.ndarray, size: tuple[int, int], box: Sequence[int] | None) -> np.ndarray:
    """`image` drawn at `size`, with the pixel box (x0, y0, x1, y1), end-exclusive, outlined 2 pixels
    wide just inside its edge (drawn after scaling, so outlines stay crisp at any size).

    Pillow's rectangle, not torchvision's `draw_bounding_boxes` (which draws the same rectangle through
    Pillow): importing torchvision imports torch._dynamo, seconds that made `cmcaug preview --timix` 60% slower.
    """
    tile = resized(Image.fromarray(image, "RGB"), size)
    if box is not None and box[2] > box[0] and box[3] > box[1]:
        sx, sy = size[0] / image.shape[1], size[1] / image.shape[0]
        corners = (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx) - 1, round(box[3] * sy) - 1)
        ImageDraw.Draw(tile).rectangle(corners, outline=_WINDOW, width=2)
    return np.asarray(tile)


def render_mix(
    images: Any, result: MixResult, path: str | Path, *, max_rows: int = 8, tile_size: int | None = 128,
    heading: str | None = None,
) -> Path:
    """Write a picture of what `text_aware_mix` did: per sample, the image, its partner with the source window
    outlined, and the mixed image with the target window outlined, labelled with lam; `heading` (say, what
    the relevance was) is written above. The format is the one `path`'s extension names: .png, .jpg/.jpeg,
    .webp, or .html/.htm for a page showing the picture (`InputError` for another).

    `images` are the inputs of the mix, `[B, C, H, W]` uint8 or float in [0, 1] (array or tensor);
    `result.images` is read the same way. `tile_size` is the drawn length of an image's longer side
    (None: as is). Samples left unmixed (their own partner) show no outline and lam 1.
    """
    picture_format(path)
    originals, mixed = as_images(images, "images"), as_images(result.images, "result.images")
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
    return save_picture(compose(rows, size, heading=heading), path, heading or "TiMix mixes")


def preview_timix(
    images: Sequence[np.ndarray],
    boxes: Sequence[Any],
    path: str | Path,
    *,
    seed: int = 0,
    patch_size: int = 32,
    image_size: int = 224,
    label_mode: Literal["area", "relevance"] = "area",
    tile_size: int | None = 160,
    title: str = "TiMix",
) -> dict[str, Any]:
    """Write a picture of TiMix on `images` (uint8 `[H, W, 3]`, any sizes), mixed as one batch (`render_mix`,
    which says which formats `path` may name); returns what was mixed.

    `boxes[i]` holds image i's annotated object boxes, `[n, 4]` (x0, y0, x1, y1) in its pixels, say from COCO
    annotations (`cmcaug preview --timix` reads a corpus's). A patch's relevance is the share of it that one
    box covers (`patch_box_coverage`), standing in for a trained text-aware head where captions name every
    boxed object. Images are resized to `image_size` squared, a multiple of `patch_size`; `text_aware_mix`
    runs with its defaults (flip partners, one window side per batch) and `label_mode`, drawing from a
    generator seeded with `seed`. `title` opens the heading (say, "TiMix on corpus/").
    """
    from ..relevance import patch_box_coverage
    from ..timix import text_aware_mix

    picture_format(path)
    if patch_size < 1 or image_size < patch_size or image_size % patch_size:
        raise InputError(f"need an image_size that is a positive multiple of patch_size, got image_size {image_size}, "
                         f"patch_size {patch_size}")
    if len(images) == 0 or len(boxes) != len(images):
        raise InputError(f"need one box array per image and at least one image, got {len(images)} images and "
                         f"{len(boxes)} box arrays")
    side = image_size // patch_size
    fractions = [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) / torch.tensor([p.shape[1], p.shape[0]] * 2)
                 for b, p in zip(boxes, images)]
    # Boxes as fractions, which the resize does not move; float32 as ever, so equally covered windows tie alike.
    relevance = patch_box_coverage(fractions, (side, side))
    resized_images = [Image.fromarray(p, "RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
                      for p in images]
    batch = torch.from_numpy(np.stack([np.asarray(im) for im in resized_images])).permute(0, 3, 1, 2).contiguous()
    result = text_aware_mix(batch, relevance, patch_size=patch_size, label_mode=label_mode,
                            generator=torch.Generator().manual_seed(seed))
    window = int((result.source_box[:, 2] - result.source_box[:, 0]).max())
    heading = (f"{title}: {len(images)} images at {image_size} px, {side} x {side} patches of {patch_size} px, "
               f"window {window} x {window} patches. Each image (left) gets the window of its partner holding the "
               "most annotated-box area (middle, outlined) pasted over its own window holding the least (right). "
               f"lam ({label_mode}): the weight of the image's own caption in the mixed image's target.")
    out = render_mix(batch, result, path, max_rows=len(images), tile_size=tile_size, heading=heading)
    return {"output": str(out), "grid": [side, side], "window": window, "partner": result.partner.tolist(),
            "lam": [round(v, 4) for v in result.lam.tolist()]}
