"""The shapes world: a deterministic toy corpus of images, COCO boxes and paired captions.

Tests, the demo and experiments need a corpus that exists offline, costs nothing to make, and has exact
ground truth. Each image shows 1-4 flat-coloured shapes (circle, star, heart, ...) on a pale flat or
gradient background with light noise; `annotations.json` holds tight boxes of the visible pixels,
`captions.jsonl` one sentence per image naming every object ("Two small red stars and a blue disc."),
and `vocab.json` the shape concepts with synonyms (`ConceptVocab.from_json`).

By default a shape is independent of every other word of its caption: only its own word says which shape
it is. `make_corpus(context=p)` gives each object phrase, with probability p, a word or phrase that belongs
to its shape alone ("a twinkling red star", "a red heart beating"), as natural captions carry context ("a
dog catches a frisbee"); that is what lets masked-language modelling on a CMC view read a patch from its
surroundings. Context draws come from a second generator per image, so images and boxes do not change.

Image `i` is drawn from its own generator seeded by `(seed, i)`, so a corpus is byte-identical for a
seed and the first `n` images do not depend on how many are made. Object colours all have one channel
at most 90 and backgrounds all channels at least 150, so "any channel below 110" separates foreground
from background exactly, noise included (`is_foreground`).
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .concepts import ConceptVocab, pluralize
from .errors import InputError

log = logging.getLogger(__name__)

# Concept name -> synonyms. None of these is a COCO-80 class name or synonym.
SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("disc", "disk"),
    "square": ("block", "tile"),
    "triangle": ("wedge",),
    "star": ("pentagram",),
    "heart": ("valentine",),
    "cross": ("plus symbol",),
    "hexagon": ("honeycomb cell",),
    "diamond": ("rhombus", "lozenge"),
}

# Every colour has a channel <= 90 (after jitter), every background channel is >= 150.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (45, 165, 70),
    "blue": (45, 90, 215),
    "yellow": (235, 200, 35),
    "orange": (240, 135, 30),
    "purple": (140, 65, 185),
    "pink": (235, 70, 160),
    "black": (35, 35, 35),
}
_COLOR_JITTER = 15
_NOISE = 3
_BACKGROUND_RANGE = (160, 240)
FOREGROUND_THRESHOLD = 110

# Size class -> range of the shape's longer side as a fraction of the image side.
SIZES: dict[str, tuple[float, float]] = {"small": (0.14, 0.2), "medium": (0.2, 0.3), "large": (0.3, 0.42)}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": (), "large": ("large", "big")}
_MAX_OVERLAP = 0.15  # of the smaller object's square; keeps every object mostly visible
_PLACEMENT_TRIES = 40
_SYNONYM_RATE = 0.25
_REPEAT_RATE = 0.3  # an object copies an earlier one's shape and colour, so captions count ("two red stars")
# Shape -> (words put before the colour, words put after the noun). Each word belongs to one shape, and none is
# a shape's name, synonym or inflection, a colour, a size or a COCO word: only the context says which shape.
CONTEXT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "circle": (("rolling", "spinning", "bouncing"), ("rolling", "rolling downhill", "bouncing along")),
    "square": (("stacked", "checkered", "framed"), ("stacked high", "framed", "laid in a grid")),
    "triangle": (("pointy", "sharp", "upright"), ("pointing upward", "standing upright", "like a pyramid")),
    "star": (("twinkling", "shining", "glittering"), ("twinkling", "glittering", "shining in the night")),
    "heart": (("beating", "loving", "romantic"), ("beating", "beating fast", "in love")),
    "cross": (("medical", "positive", "healing"), ("on an ambulance", "marking a hospital", "adding numbers")),
    "hexagon": (("waxy", "buzzing", "tessellated"), ("full of honey", "buzzing with bees", "dripping honey")),
    "diamond": (("sparkling", "precious", "faceted"), ("sparkling", "set in a ring", "on a necklace")),
}

IMAGES_DIR, ANNOTATIONS, CAPTIONS, VOCAB = "images", "annotations.json", "captions.jsonl", "vocab.json"


@dataclass(frozen=True)
class CorpusInfo:
    """Where a shapes-world corpus was written and what it holds."""

    root: Path
    num_images: int
    num_objects: int
    objects_per_concept: dict[str, int] = field(default_factory=dict)
    context: float = 0.0  # the share of object phrases given a context word (`make_corpus(context=...)`)

    @property
    def images_dir(self) -> Path:
        return self.root / IMAGES_DIR

    @property
    def annotations(self) -> Path:
        return self.root / ANNOTATIONS

    @property
    def captions(self) -> Path:
        return self.root / CAPTIONS

    @property
    def vocab(self) -> Path:
        return self.root / VOCAB

    @property
    def concepts(self) -> list[str]:
        return list(SHAPES)

    def stats(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "images": self.num_images,
            "objects": self.num_objects,
            "concepts": len(SHAPES),
            "annotations": str(self.annotations),
            "captions": str(self.captions),
            "vocab": str(self.vocab),
            **({"context": self.context} if self.context else {}),
        }


def is_foreground(pixels: np.ndarray) -> np.ndarray:
    """Boolean `[H, W]` mask of shape pixels in a shapes-world image `[H, W, 3]` (exact, by construction)."""
    return pixels.min(axis=-1) < FOREGROUND_THRESHOLD


# -- shape outlines: unit polygons, centred, longer side 2 ---------------------------------------
def _ring(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star() -> np.ndarray:
    points = _ring(10)
    points[1::2] *= 0.45
    return points


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


def _cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)])


_OUTLINES: dict[str, Callable[[], np.ndarray]] = {
    "circle": lambda: _ring(64),
    "square": lambda: np.array([(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]),
    "triangle": lambda: _ring(3),
    "star": _star,
    "heart": _heart,
    "cross": _cross,
    "hexagon": lambda: _ring(6, phase=0.0),
    "diamond": lambda: np.array([(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)]),
}
_MAX_TILT = {"circle": 0.0, "square": 15.0, "triangle": 15.0, "star": 36.0, "heart": 12.0, "cross": 15.0, "hexagon": 30.0, "diamond": 10.0}


def _polygon(shape: str, side: float, center: tuple[float, float], tilt_deg: float) -> list[tuple[float, float]]:
    """The shape's outline tilted by `tilt_deg`, scaled so its longer side is `side`, centred at `center`."""
    points = _OUTLINES[shape]()
    angle = math.radians(tilt_deg)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = points @ rotation.T
    low, high = points.min(axis=0), points.max(axis=0)
    points = (points - (low + high) / 2) * (side / (high - low).max())
    return [(float(x + center[0]), float(y + center[1])) for x, y in points]


# -- drawing one image -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Object:
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of the visible pixels
    area: int


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    low, high = _BACKGROUND_RANGE
    start = rng.integers(low, high + 1, size=3).astype(np.float32)
    if rng.random() < 0.4:
        return np.broadcast_to(start, (size, size, 3)).copy(), "flat"
    end = rng.integers(low, high + 1, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    return start + ramp[..., None] * (end - start), "gradient"


def _place(rng: np.random.Generator, side: int, size: int, taken: list[tuple[int, int, int]]) -> tuple[int, int] | None:
    """Top-left corner of a `side` square inside the image overlapping earlier squares only slightly."""
    for _ in range(_PLACEMENT_TRIES):
        x, y = (int(v) for v in rng.integers(1, size - side, size=2, endpoint=True))
        if all(
            max(0, min(x + side, tx + ts) - max(x, tx)) * max(0, min(y + side, ty + ts) - max(y, ty))
            <= _MAX_OVERLAP * min(side, ts) ** 2
            for tx, ty, ts in taken
        ):
            return x, y
    return None


def _draw_image(rng: np.random.Generator, size: int, max_objects: int) -> tuple[np.ndarray, list[_Object], str]:
    canvas, background = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int8)
    drawn: list[tuple[str, str, str]] = []
    taken: list[tuple[int, int, int]] = []
    for _ in range(int(rng.integers(1, max_objects, endpoint=True))):
        if drawn and rng.random() < _REPEAT_RATE:
            shape, color, _ = drawn[int(rng.integers(len(drawn)))]
        else:
            shape, color = str(rng.choice(list(SHAPES))), str(rng.choice(list(COLORS)))
        size_class = str(rng.choice(list(SIZES)))
        side = max(4, int(rng.uniform(*SIZES[size_class]) * size))
        corner = _place(rng, side, size, taken)
        if corner is None:
            continue
        taken.append((*corner, side))
        tilt = rng.uniform(-1, 1) * _MAX_TILT[shape]
        mask_image = Image.new("L", (size, size), 0)
        polygon = _polygon(shape, side - 1, (corner[0] + (side - 1) / 2, corner[1] + (side - 1) / 2), tilt)
        ImageDraw.Draw(mask_image).polygon(polygon, fill=255)
        mask = np.asarray(mask_image) > 0
        rgb = np.clip(np.array(COLORS[color]) + rng.integers(-_COLOR_JITTER, _COLOR_JITTER, size=3, endpoint=True), 0, 255)
        canvas[mask] = rgb
        owner[mask] = len(drawn)
        drawn.append((shape, color, size_class))
    noise = rng.integers(-_NOISE, _NOISE, size=canvas.shape, endpoint=True)
    pixels = np.clip(np.rint(canvas) + noise, 0, 255).astype(np.uint8)
    objects = []
    for k, (shape, color, size_class) in enumerate(drawn):
        ys, xs = np.nonzero(owner == k)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(_Object(shape, color, size_class, box, int(xs.size)))
    return pixels, objects, background


# -- captions ----------------------------------------------------------------------------------
_NUMBERS = {2: "two", 3: "three", 4: "four"}
_LIST_TEMPLATES = (
    "{L}.",
    "A picture of {L}.",
    "An image of {L} on a {bg} background.",
    "There {be} {L}.",
    "{L} on a {bg} background.",
    "This image shows {L}.",
    "Here we see {L}.",
    "A simple drawing of {L}.",
)
_RELATION_TEMPLATES = ("{A} {rel} {B}{rest}.", "There is {A} {rel} {B}{rest}.", "A picture of {A} {rel} {B}{rest}.")
_BACKGROUND_WORDS = {"flat": ("plain", "light", "pale"), "gradient": ("shaded", "gradient", "soft")}


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _group_phrase(rng: np.random.Generator, members: list[_Object], extra: np.random.Generator | None, context: float) -> str:
    """'a small red circle', 'two blue discs': count, optional size, colour, name or a synonym; with probability
    `context` a word of the shape's `CONTEXT` before the colour or after the noun, drawn from `extra` alone so
    that `rng` draws, and the rest of the caption, stay as they are without context."""
    shape, color = members[0].shape, members[0].color
    noun = _pick(rng, SHAPES[shape]) if SHAPES[shape] and rng.random() < _SYNONYM_RATE else shape
    sizes = {m.size for m in members}
    words = [color, noun if len(members) == 1 else pluralize(noun)]
    if len(sizes) == 1 and _SIZE_WORDS[members[0].size] and rng.random() < 0.5:
        words.insert(0, _pick(rng, _SIZE_WORDS[members[0].size]))
    if extra is not None and extra.random() < context:
        after = bool(extra.random() < 0.5)
        word = _pick(extra, CONTEXT[shape][after])
        words.insert(len(words) if after else len(words) - 2, word)
    phrase = " ".join(words)
    return _article(phrase) if len(members) == 1 else f"{_NUMBERS[len(members)]} {phrase}"


def _join(rng: np.random.Generator, phrases: list[str]) -> str:
    if len(phrases) <= 2:
        return " and ".join(phrases)
    comma = "," if rng.random() < 0.5 else ""
    return ", ".join(phrases[:-1]) + f"{comma} and {phrases[-1]}"


def _relation(a: _Object, b: _Object) -> str:
    """Where `a` is relative to `b`, from their box centres (image y grows downwards)."""
    dx = (a.box[0] + a.box[2] - b.box[0] - b.box[2]) / 2
    dy = (a.box[1] + a.box[3] - b.box[1] - b.box[3]) / 2
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _caption(rng: np.random.Generator, objects: list[_Object], background: str, extra: np.random.Generator | None = None,
             context: float = 0.0) -> str:
    groups: dict[tuple[str, str], list[_Object]] = {}
    for obj in objects:
        groups.setdefault((obj.shape, obj.color), []).append(obj)
    members = list(groups.values())
    phrases = [_group_phrase(rng, m, extra, context) for m in members]
    if len(members) >= 2 and len(members[0]) == len(members[1]) == 1 and rng.random() < 0.35:
        rest = ""
        if len(phrases) > 2:
            rest = (", and " if rng.random() < 0.5 else " with ") + _join(rng, phrases[2:])
        text = _pick(rng, _RELATION_TEMPLATES).format(A=phrases[0], B=phrases[1], rel=_relation(members[0][0], members[1][0]), rest=rest)
    else:
        be = "is" if len(members[0]) == 1 else "are"
        text = _pick(rng, _LIST_TEMPLATES).format(L=_join(rng, phrases), be=be, bg=_pick(rng, _BACKGROUND_WORDS[background]))
    return text[0].upper() + text[1:]


# -- the corpus --------------------------------------------------------------------------------
def _prepare(root: Path, overwrite: bool) -> None:
    outputs = [root / IMAGES_DIR, root / ANNOTATIONS, root / CAPTIONS, root / VOCAB]
    existing = [p for p in outputs if p.exists()]
    if existing and not overwrite:
        raise InputError(f"{root} already holds a corpus ({existing[0].name}); pass overwrite=True (CLI: --overwrite) to replace it")
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    (root / IMAGES_DIR).mkdir(parents=True)


def make_corpus(
    out_dir: str | Path,
    n_images: int,
    seed: int,
    image_size: int = 256,
    *,
    max_objects: int = 4,
    overwrite: bool = False,
    progress: bool = False,
    context: float = 0.0,
) -> CorpusInfo:
    """Write a shapes-world corpus under `out_dir`: `images/NNNNNN.png`, `annotations.json` (COCO),
    `captions.jsonl` and `vocab.json`. Deterministic: the same arguments give byte-identical files.

    `context` in [0, 1] is the chance that an object phrase carries a word of its shape's `CONTEXT`. Only
    `captions.jsonl` depends on it (`CorpusInfo.context` records it): the other files are byte-identical to
    those of `context=0`, which writes what this function wrote before the option existed.
    """
    if n_images < 1:
        raise InputError(f"n_images must be at least 1, got {n_images}")
    if image_size < 32:
        raise InputError(f"image_size must be at least 32 pixels so shapes stay recognisable, got {image_size}")
    if not 1 <= max_objects <= 4:
        raise InputError(f"max_objects must be between 1 and 4, got {max_objects}")
    if isinstance(context, bool) or not isinstance(context, numbers.Real) or not 0 <= context <= 1:
        raise InputError(f"context must lie in [0, 1], got {context!r}")
    context = float(context)
    root = Path(out_dir)
    _prepare(root, overwrite)
    category_ids = {name: i + 1 for i, name in enumerate(SHAPES)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    captions: list[str] = []
    per_concept = dict.fromkeys(SHAPES, 0)
    for index in tqdm(range(n_images), desc="shapes world", unit="img", disable=not progress):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
        pixels, objects, background = _draw_image(rng, image_size, max_objects)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels, "RGB").save(root / IMAGES_DIR / file_name, format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size, "background": background})
        for obj in objects:
            per_concept[obj.shape] += 1
            x0, y0, x1, y1 = obj.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_ids[obj.shape],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": obj.area, "iscrowd": 0,
                "color": obj.color, "size": obj.size,
            })
        extra = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 1))) if context else None
        caption = _caption(rng, objects, background, extra, context)
        captions.append(json.dumps({"image": file_name, "image_id": image_id, "caption": caption}))
    categories = [{"id": i, "name": name, "supercategory": "shape"} for name, i in category_ids.items()]
    coco = {"info": {"description": f"cmcaug shapes world, seed {seed}"}, "images": images, "annotations": annotations, "categories": categories}
    (root / ANNOTATIONS).write_text(json.dumps(coco, separators=(",", ":")) + "\n", encoding="utf-8")
    (root / CAPTIONS).write_text("\n".join(captions) + "\n", encoding="utf-8")
    ConceptVocab(SHAPES).to_json(root / VOCAB)
    log.info("shapes world: %d images, %d objects in %s", n_images, len(annotations), root)
    return CorpusInfo(root=root, num_images=n_images, num_objects=len(annotations), objects_per_concept=per_concept,
                      context=context)
