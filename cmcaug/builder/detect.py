"""Detectors: where a bank's boxes come from.

A `Detector` maps a batch of decoded RGB images (and their keys) to boxes in source pixels, with a
score and a class index into `names`. Two ship:

- `UltralyticsDetector`: any YOLO `.pt` file or model yaml, batched inference; its class names are the
  vocabulary unless the build is given one (a yaml model's numbered classes are named: `_classes`).
- `AnnotationDetector`: existing COCO-format boxes (COCO, Visual Genome or Objects365 converted to COCO),
  for building a bank without running a model.

Annotation policy (documented choice). A file that cannot mean one thing is an `InputError` naming it:
not COCO JSON, an annotation that is not an object, a missing or non-numeric bbox or score, an unknown
image or category id, an id given to two different images or categories (boxes would be cut from the
wrong image, or named after the wrong category), or a box with no overlap with its image (the annotations
belong to other images or use another box format). One bad value is not: an annotation with a
non-finite box coordinate (`box_not_finite`), a zero or negative width or height (`box_empty`) or a
non-finite score (`score_not_finite`) is skipped, and so is a crowd region (`crowd`, `iscrowd` 1 or
"1"); each is counted by reason in its image's `Detections.dropped`, which a build adds to its dropped
boxes. `strict=True` refuses the first three instead. Boxes partly outside the image are clipped to it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._deps import require
from ..bank.format import sha256_file
from ..errors import InputError
from ._classes import class_names
from .options import DEFAULT_CONF, DEFAULT_IMGSZ, DEFAULT_IOU, DEFAULT_MAX_DET

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detections:
    """Boxes found in one image: `boxes` float32 [n, 4] (x0, y0, x1, y1), `scores` float32 [n],
    `labels` int64 [n] (index into the detector's `names`); `dropped`: boxes of the image the source
    skipped, by reason (`AnnotationDetector`'s unusable annotations), for the build's counts."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    dropped: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.scores)


@runtime_checkable
class Detector(Protocol):
    """What `build_bank` needs from a detector."""

    names: list[str]  # class index -> class name

    def detect(self, images: Sequence[np.ndarray], keys: Sequence[str]) -> list[Detections]:
        """One `Detections` per image (RGB uint8 [H, W, 3]), in order."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance: everything that decides the boxes, nothing machine-specific."""
        ...


def box_problem(box: Sequence[float]) -> str | None:
    """Why `box` (x0, y0, x1, y1) is not a box: "box_not_finite", "box_empty" (x1 <= x0 or y1 <= y0), or None."""
    if not all(map(math.isfinite, box)):
        return "box_not_finite"
    return "box_empty" if box[2] <= box[0] or box[3] <= box[1] else None


def clip_box(box: Sequence[float], width: int, height: int, what: str) -> np.ndarray:
    """`box` (x0, y0, x1, y1) clipped to the image; `InputError` when it does not overlap the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if box_problem((x0, y0, x1, y1)):
        raise InputError(f"{what}: box {[x0, y0, x1, y1]} is not a box (expected finite x0 < x1, y0 < y1)")
    clipped = np.array([max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)], np.float32)
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise InputError(
            f"{what}: box {[x0, y0, x1, y1]} lies outside its {width}x{height} image; check that the annotations "
            "belong to these images and use COCO's [x, y, width, height] in pixels"
        )
    return clipped


# -- COCO annotations ------------------------------------------------------------------------------
_CROWD = {0: False, 1: True, "0": False, "1": True, None: False}  # `iscrowd` values (True and False are 1 and 0)
_UNHASHABLE = (list, dict)  # JSON values that cannot be ids or flags


def _norm(name: str) -> str:
    return PurePosixPath(name.replace("\\", "/").removeprefix("./")).as_posix()


def _is_tail(short: str, long: str) -> bool:
    return short == long or long.endswith("/" + short)


def _by_id(entries: list[tuple[int, Any]], key: str, kind: str, path: Path) -> dict[int, Any]:
    """id -> entry of the file's `key` list (of `kind`s); `InputError` naming the ids given to two different
    entries (an entry repeated as it is does no harm)."""
    out = dict(entries)
    repeated = sorted({i for i, entry in entries if out[i] != entry})
    if repeated:
        raise InputError(f"{path}: {len(repeated)} {kind} id(s) name more than one {kind} in '{key}', e.g. {repeated[:5]}; "
                         f"each id must name one {kind}, or its annotations would be read as another's: fix the file")
    return out


def _read_coco(path: Path) -> tuple[bytes, dict[int, str], dict[int, tuple[str, int | None, int | None]], list[Any]]:
    """The file's bytes, its categories (id -> name), images (id -> file name, width, height) and annotations."""
    try:
        raw = path.read_bytes()  # read once: parsed here, hashed for `describe`
        data = json.loads(raw.decode("utf-8"))
        categories = [(int(c["id"]), str(c["name"])) for c in data["categories"]]
        images = [(int(im["id"]), (_norm(str(im["file_name"])), int(im["width"]) if im.get("width") else None,
                                   int(im["height"]) if im.get("height") else None)) for im in data["images"]]
        annotations = data["annotations"]
        if not isinstance(annotations, list):
            raise TypeError(f"'annotations' is a {type(annotations).__name__}, not a list")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"{path}: expected COCO JSON with 'images' (id, file_name), 'annotations' "
                         f"(image_id, category_id, bbox) and 'categories' (id, name) ({type(exc).__name__}: {exc})") from exc
    return raw, _by_id(categories, "categories", "category", path), _by_id(images, "images", "image", path), annotations


def _number(ann: Mapping[str, Any], key: str, default: Any, what: str) -> Any:
    """`ann[key]` as a float (a list of floats for "bbox"); `InputError` naming the annotation when it is not one."""
    value = ann.get(key, default)
    try:
        if key == "bbox":
            x, y, w, h = map(float, value)
            return [x, y, x + w, y + h]
        return float(value)
    except (TypeError, ValueError) as exc:
        expected = "[x, y, width, height] (four numbers)" if key == "bbox" else "a number"
        raise InputError(f"{what}: {key} must be {expected}, got {value!r}") from exc


class AnnotationDetector:
    """Boxes from a COCO-format `annotations.json` (bbox = [x, y, width, height] in pixels).

    Images are matched to COCO `file_name`s by path: equal, or one is a trailing part of the other
    (`images/0001.png` matches `0001.png`). Crowd regions (`iscrowd` 1) are skipped and counted; an
    annotation's optional `score` is kept (pseudo-labels), otherwise the score is 1. Unusable boxes are
    skipped and counted, or refused with `strict=True` (the module docstring has the policy).
    """

    def __init__(self, coco_json: str | Path, *, strict: bool = False):
        self.path, self.strict = Path(coco_json), bool(strict)
        raw, categories, images, annotations = _read_coco(self.path)
        self.names = [categories[k] for k in sorted(categories)]
        label_of = {cid: i for i, cid in enumerate(sorted(categories))}
        kept: dict[str, list[tuple[list[float], float, int]]] = defaultdict(list)
        dropped: dict[str, Counter[str]] = defaultdict(Counter)
        skipped: Counter[str] = Counter()
        first_skipped: dict[str, int] = {}
        self._annotated: set[str] = set()  # images with a box that is not a crowd region, kept or not
        where = f"{self.path}: annotation "
        for index, ann in enumerate(annotations):
            name, reason, box, score, label = self._read_annotation(f"{where}{index}", ann, images, label_of)
            if reason is None:
                kept[name].append((box, score, label))
            else:
                dropped[name][reason] += 1
            if reason != "crowd":
                self._annotated.add(name)
            if reason not in (None, "crowd"):
                skipped[reason] += 1
                first_skipped.setdefault(reason, index)
        if skipped:
            counts = ", ".join(f"{n} annotation(s) as {r} (the first: annotation {first_skipped[r]})" for r, n in skipped.items())
            log.warning("%s: skipped %s; the build counts them as dropped boxes (strict=True, --strict, refuses them)",
                        self.path, counts)
        self._boxes = {name: Detections(np.array([r[0] for r in kept[name]], np.float32).reshape(-1, 4),
                                        np.array([r[1] for r in kept[name]], np.float32),
                                        np.array([r[2] for r in kept[name]], np.int64), dict(dropped[name]))
                       for name in kept.keys() | dropped.keys()}
        self._by_base: dict[str, list[str]] = defaultdict(list)
        for name, _, _ in images.values():
            self._by_base[PurePosixPath(name).name].append(name)
        self._sha256 = hashlib.sha256(raw).hexdigest()

    def _read_annotation(self, what: str, ann: Any, images: Mapping[int, tuple[str, int | None, int | None]],
                         label_of: Mapping[int, int]) -> tuple[str, str | None, list[float], float, int]:
        """The annotation `what` (file and number, for messages), checked: `InputError` when it cannot be read (or,
        with `strict`, when it would be skipped); else its image's COCO file name, the reason it is skipped (None:
        kept), its box (x0, y0, x1, y1), score and label."""
        if not isinstance(ann, dict):
            raise InputError(f"{what} is a {type(ann).__name__} ({ann!r:.40}), expected an object with image_id, category_id "
                             "and bbox")
        what += f" (id {ann['id']!r})" if "id" in ann else ""
        cid, iid, crowd = ann.get("category_id"), ann.get("image_id"), ann.get("iscrowd", 0)
        if isinstance(cid, _UNHASHABLE) or cid not in label_of:
            raise InputError(f"{what} has category_id {cid!r}, which is not among the file's categories {sorted(label_of)}")
        if isinstance(iid, _UNHASHABLE) or iid not in images:
            raise InputError(f"{what} refers to image_id {iid!r}, which the file's 'images' list does not hold")
        if isinstance(crowd, _UNHASHABLE) or crowd not in _CROWD:
            raise InputError(f"{what}: iscrowd must be 0 or 1 (or \"0\", \"1\"), got {crowd!r}")
        name, width, height = images[iid]
        if _CROWD[crowd]:
            return name, "crowd", [], 0.0, label_of[cid]
        box, score = _number(ann, "bbox", None, what), _number(ann, "score", 1.0, what)
        reason = box_problem(box) or (None if math.isfinite(score) else "score_not_finite")
        if reason is not None and self.strict:
            found = f"score {score}" if reason == "score_not_finite" else f"box {box} (x0, y0, x1, y1)"
            raise InputError(f"{what}: {found} is unusable ({reason}); fix the annotation, or build without strict (--strict) "
                             "to skip and count such boxes")
        if reason is None and width and height:
            clip_box(box, width, height, f"{what} (image {name})")
        return name, reason, box, score, label_of[cid]

    def _file_name(self, key: str) -> str | None:
        key = _norm(key)
        found = [n for n in self._by_base.get(PurePosixPath(key).name, ()) if _is_tail(n, key) or _is_tail(key, n)]
        if len(found) > 1:
            found = [n for n in found if n == key] or found
        if len(found) > 1:
            raise InputError(f"image {key!r} matches several images of {self.path}: {found[:4]}; pass inputs whose keys are unambiguous")
        return found[0] if found else None

    @property
    def annotated(self) -> frozenset[str]:
        """The COCO file names that hold at least one box that is not a crowd region (kept or skipped)."""
        return frozenset(self._annotated)

    def match(self, keys: Sequence[str], *, ignore_unmatched: bool = False) -> dict[str, str]:
        """Image key -> COCO file name, checking that every annotated image is among `keys`.

        `ignore_unmatched` lifts that check, for a build from part of a larger annotation file (5k of
        COCO's images, one shard): the boxes of the other images are simply never asked for.
        """
        matched: dict[str, str] = {}
        owner: dict[str, str] = {}
        for key in keys:
            name = self._file_name(key)
            if name is None:
                continue
            if name in owner:
                raise InputError(f"images {owner[name]!r} and {key!r} both match {name!r} in {self.path}; keys must be unambiguous")
            owner[name] = key
            matched[key] = name
        missing = sorted(self.annotated - set(owner))
        if missing and not ignore_unmatched:
            raise InputError(
                f"{self.path} annotates {len(missing)} image(s) that are not among the inputs, e.g. {missing[:3]}; "
                "pass the folder that holds them, remove their annotations, or pass --ignore-unmatched-annotations "
                "(Python: ignore_unmatched_annotations=True) to build from the inputs' images only"
            )
        return matched

    def detect(self, images: Sequence[np.ndarray], keys: Sequence[str]) -> list[Detections]:
        out = []
        for image, key in zip(images, keys, strict=True):
            name = self._file_name(key)
            found = self._boxes.get(name) if name is not None else None
            if found is None:
                out.append(Detections.empty())
                continue
            height, width = image.shape[:2]
            boxes = [clip_box(b, width, height, f"{self.path}: a box of image {key}") for b in found.boxes]
            out.append(Detections(np.array(boxes, np.float32).reshape(-1, 4), found.scores, found.labels, found.dropped))
        return out

    def describe(self) -> dict[str, Any]:
        """The file, by its resolved path (the same however it was spelled) and its bytes' sha256."""
        return {"type": "annotations", "path": str(self.path.resolve()), "sha256": self._sha256}


# -- ultralytics YOLO ------------------------------------------------------------------------------
def _usable_device(device: str) -> str:
    """`device` when ultralytics can run on it here; else an `InputError` now, not a traceback mid-build."""
    import torch
    from ultralytics.utils import LOGGER
    from ultralytics.utils.torch_utils import select_device

    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)  # it prints its version banner before refusing a device
    try:
        select_device(device, verbose=False)
    except ValueError as exc:
        found = str(exc).split(". ")[0]
        raise InputError(f"device {device!r} is not usable on this machine ({found}; torch sees {torch.cuda.device_count()} "
                         "CUDA device(s)); pass 'cpu', a CUDA index such as '0' or 'cuda:0', or no device to let ultralytics "
                         "choose") from exc
    finally:
        LOGGER.setLevel(level)
    return device


class UltralyticsDetector:
    """Batched YOLO inference with ultralytics on decoded RGB arrays.

    `weights` is a local `.pt` file or a model yaml (`yolov8n.yaml`: random weights, no download, drawn
    from `seed` so two builds get the same model). `names` renames the model's classes (one name per class,
    in class order); without it a model keeps its own names, except that a yaml model, whose classes
    ultralytics numbers "0", "1", ..., takes its yaml's `names:` list, or COCO's names when it has 80 classes
    (`cmcaug.builder._classes`). `classes` restricts detection to classes given by name or index (an int,
    or a string of digits that is not a class name). `conf`, `iou`, `imgsz` (rounded up to a multiple of 32 by
    ultralytics) and `max_det` are passed to ultralytics' predict, with its defaults. `device` is an
    ultralytics device string ("cpu", "0", "cuda:0"; of several GPUs, "0,1", ultralytics predicts on the
    first); None leaves the choice to ultralytics (its current GPU, else the CPU). A device this machine
    lacks is refused here. `device` says where the model runs, not which model: it is left out of
    `describe` (see there).
    """

    def __init__(self, weights: str | Path, conf: float = DEFAULT_CONF, iou: float = DEFAULT_IOU, device: str | None = None,
                 batch_size: int = 16, classes: Sequence[int | str] | None = None, *, imgsz: int = DEFAULT_IMGSZ,
                 max_det: int = DEFAULT_MAX_DET, seed: int = 0, names: Sequence[str] | None = None):
        self.weights = str(weights)
        local = Path(self.weights)
        if local.suffix not in (".yaml", ".yml") and not local.is_file():
            raise InputError(
                f"YOLO weights {self.weights!r} not found: pass a local .pt file or a model yaml such as yolov8n.yaml "
                "(random weights); cmcaug never downloads weights"
            )
        ultralytics = require("ultralytics", "Detecting objects with YOLO (--detector)")
        import torch

        if batch_size < 1 or imgsz < 32 or max_det < 1 or not 0.0 <= conf <= 1.0 or not 0.0 <= iou <= 1.0:
            raise InputError(f"UltralyticsDetector: need batch_size >= 1, imgsz >= 32, max_det >= 1, conf and iou in [0, 1]; "
                             f"got batch_size={batch_size}, imgsz={imgsz}, max_det={max_det}, conf={conf}, iou={iou}")
        self.device = None if device is None else _usable_device(str(device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                self.model = ultralytics.YOLO(self.weights)
            except (FileNotFoundError, RuntimeError, KeyError, ValueError) as exc:
                raise InputError(f"cannot load YOLO model {self.weights!r}: {exc}") from exc
        own = self.model.names
        self._own = [str(own[k]) for k in sorted(own)] if isinstance(own, Mapping) else [str(n) for n in own]
        spec = getattr(self.model.model, "yaml", None)
        self.names = class_names(self._own, spec.get("names") if isinstance(spec, dict) else None, names, self.weights)
        self.conf, self.iou, self.batch_size = float(conf), float(iou), int(batch_size)
        self.imgsz, self.max_det, self.seed = int(imgsz), int(max_det), int(seed)
        self.classes = None if classes is None else sorted({self._class_index(c) for c in classes})
        self._path = str(local.resolve()) if local.is_file() else self.weights  # a file by where it is, however spelled
        self._sha256 = sha256_file(local) if local.is_file() else None
        self._version = ultralytics.__version__

    def _class_index(self, cls: int | str) -> int:
        if isinstance(cls, str):
            lowered = [n.lower() for n in self.names]
            if cls.strip().lower() in lowered:
                return lowered.index(cls.strip().lower())
            if not cls.strip().isdigit():
                raise InputError(f"class {cls!r} is not one of the model's {len(self.names)} classes: {self.names[:8]}...")
        if not 0 <= int(cls) < len(self.names):
            raise InputError(f"class index {cls} is out of range [0, {len(self.names)})")
        return int(cls)

    def detect(self, images: Sequence[np.ndarray], keys: Sequence[str] | None = None) -> list[Detections]:
        out: list[Detections] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [np.ascontiguousarray(im[..., ::-1]) for im in images[start:start + self.batch_size]]  # RGB -> BGR
            results = self.model.predict(
                chunk, conf=self.conf, iou=self.iou, imgsz=self.imgsz, max_det=self.max_det, classes=self.classes,
                device=self.device, batch=len(chunk), verbose=False,
            )
            for r in results:
                b = r.boxes
                out.append(Detections(b.xyxy.cpu().numpy().astype(np.float32).reshape(-1, 4),
                                      b.conf.cpu().numpy().astype(np.float32), b.cls.cpu().numpy().astype(np.int64)))
        return out

    def describe(self) -> dict[str, Any]:
        """The model and its options, not `device`: where a model runs is machine-specific, and CPU and GPU
        inference differ only by float rounding, so a build may resume on another device. A bank byte-identical
        to another's needs the same kind of device, as it needs the same torch. A local weights file is named
        by its resolved path; `names` are listed only when they are not the model's own."""
        described = {
            "type": "ultralytics", "weights": self._path, "sha256": self._sha256, "ultralytics": self._version,
            "conf": self.conf, "iou": self.iou, "imgsz": self.imgsz, "max_det": self.max_det, "classes": self.classes,
            "seed": self.seed, "batch_size": self.batch_size,  # a batch is letterboxed to one shape: it moves boxes
        }
        if self.names != self._own:  # only then: a model's own names are in its weights
            described["names"] = self.names
        return described
