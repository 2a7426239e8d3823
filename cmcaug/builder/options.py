"""The options of a bank build, each defined once: its type, default and the values it accepts.

- `BuildOptions`: every `build_bank` option but the box source, the vocabulary and the runner; the ones that
  change a bank's bytes are what a resume compares (`BuildOptions.fingerprinted`).
- `RayOptions`: the Ray runner's resources (`cmcaug.builder.distributed.RayRunner`).
- `Rule`: what one option accepts, kept in its field's metadata. Building either class checks every field
  against its rule (`InputError: patch_size must be >= 8, got 4`), and `cmcaug build-bank` makes its flags'
  types, choices and defaults from the same fields (`argument --patch-size: must be >= 8, got 4`).
- `EMBEDDERS`, `CROPS`: the embedder names and the crop modes (`cmcaug.crops`).
- `DEFAULT_CONF` and `resolve_conf`: how `conf=None` is resolved; `DEFAULT_IMGSZ`, `DEFAULT_IOU`, `DEFAULT_MAX_DET`:
  what a YOLO detector uses when `imgsz`, `iou`, `max_det` are None (ultralytics' own predict defaults).
- `DEFAULT_MAX_PIXELS`, `DEFAULT_MAX_FILE_BYTES`: the largest image a build decodes, the most bytes it
  reads of one image file or tar member (`cmcaug.builder.images` applies them).

Light on purpose: the CLI imports this module to build its parser, so it must not load NumPy, Pillow or torch.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

EMBEDDERS = ("pixels", "detector")  # the names `cmcaug.builder.embed.make_embedder` knows
CROPS = ("square", "tight", "pad-mean")  # the modes `cmcaug.crops.crop_patch` knows (here without NumPy, for the CLI)
DEFAULT_CONF = 0.25
DEFAULT_IMGSZ, DEFAULT_IOU, DEFAULT_MAX_DET = 640, 0.7, 300  # ultralytics' predict defaults (its cfg/default.yaml)
# Pillow's own decompression-bomb threshold (about 89 megapixels); larger images are skipped as "too_large".
DEFAULT_MAX_PIXELS = 89_478_485
# 256 MiB: the raw RGB size of an image at the pixel limit (3 x 89,478,485 bytes), so no compressed image
# the pixel limit lets through is refused for its bytes, and a decode thread holds at most that of one file.
DEFAULT_MAX_FILE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Rule:
    """What one option accepts: a value of `kind` (stored converted to it), at least `low` (more than
    `low` with `above`), at most `high`, or one of `choices`. None, "not set", always passes."""

    kind: type[int] | type[float] | type[str]
    low: float | None = None
    high: float | None = None
    above: bool = False
    choices: tuple[str, ...] = ()

    def problem(self, value: Any) -> str | None:
        """What is wrong with the number `value` ("must be >= 8, got 4"), or None when it is in range (NaN
        never is): the words after the option's name, the same in Python and on the command line."""
        if self.low is None or ((value > self.low if self.above else value >= self.low) and (self.high is None or value <= self.high)):
            return None
        rule = f"lie in [{self.low:g}, {self.high:g}]" if self.high is not None else f"be {'>' if self.above else '>='} {self.low:g}"
        return f"must {rule}, got {value}"

    def parse(self, text: str) -> Any:
        """`text` (a command-line value) as a checked `kind`; `ValueError` saying what is wrong."""
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError(f"expected {'an integer' if self.kind is int else 'a number'}, got {text!r}") from None
        problem = self.problem(value)
        if problem:
            raise ValueError(problem)
        return value

    def check(self, name: str, value: Any) -> Any:
        """`value` converted to `kind`, or `InputError` naming the option `name`."""
        if value is None:
            return None
        if self.choices and value not in self.choices:
            raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(self.choices)}")
        problem = self.problem(value)
        if problem:
            raise InputError(f"{name} {problem}")
        return self.kind(value)


def resolve_conf(conf: float | None, detector: Any) -> float:
    """The score threshold a build uses: `conf`, else the numeric `conf` of a given Detector object (so a
    detector made with conf=0.01 is not silently re-filtered at 0.25; weights paths and functions making a
    detector have none), else `DEFAULT_CONF`. (No isinstance check against `Detector`: `detect`, which
    defines it, takes its defaults from this module.)"""
    if conf is not None:
        return float(conf)
    own = getattr(detector, "conf", None)
    return float(own) if isinstance(own, numbers.Real) and not isinstance(own, bool) else DEFAULT_CONF


def _option(rule: Rule | None, default: Any, *, compared: bool = False, recorded_when_set: bool = False,
            source: str | None = None) -> Any:
    """A field with its `rule` (None: no range to check).

    `compared`: a resume compares it, because it changes the bank's bytes; `recorded_when_set`: an option added
    after banks existed, recorded (and compared) only when it is not its default, so the banks and unfinished builds
    made before it keep their fingerprints. `source`: the box source it is for ("yolo": a YOLO detector given as
    weights or a yaml; "annotations"); set for another source it is refused (`BuildOptions.check_source`).
    """
    return field(default=default, metadata={"rule": rule, "compared": compared, "recorded_when_set": recorded_when_set,
                                            "source": source})


_MISPLACED = {  # what check_source says of an option set for another box source
    "yolo": "{name}={value!r} is for a YOLO detector given as weights or a yaml (--detector); annotations run no model, "
            "and a Detector object keeps the settings it was made with (UltralyticsDetector(..., {name}=...))",
    "annotations": "{name} (--{flag}) is for annotations (--annotations), not a detector",
}


class _Checked:
    """Base of the option classes: checks and converts each field that has a `Rule`, in field order."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            rule = f.metadata.get("rule")
            if rule is not None:
                object.__setattr__(self, f.name, rule.check(f.name, getattr(self, f.name)))

    @classmethod
    def rule(cls, name: str) -> Rule:
        """The rule of option `name`: the CLI makes the option's flag from it."""
        rules = {f.name: f.metadata["rule"] for f in dataclasses.fields(cls) if f.metadata.get("rule")}  # type: ignore[arg-type]
        return rules[name]


@dataclass(frozen=True, kw_only=True)
class BuildOptions(_Checked):
    """The options of one `build_bank` call, checked when made; the same meaning as `build_bank`'s arguments.

    `conf` is the threshold in force (`resolve_conf` turns `build_bank`'s `conf=None` into it); `workers`,
    `device`, `progress`, `ignore_unmatched_annotations` and `strict` never change a byte of the bank, so a resume
    does not compare them; `embedder` is compared by what the embedder describes. `max_pixels` and
    `max_file_bytes` decide which images are skipped (as "too_large" and "file_too_big"), so a resume compares them.
    `crop` is how a box becomes a patch (`cmcaug.crops`); recorded only when it is not "square", the crop of every
    earlier bank. `imgsz`, `iou`, `max_det`, `classes` (names or indices) and `names` (one per class) are a YOLO
    detector's (None: its defaults); they change its boxes, so a resume compares them, through the detector's
    description (`UltralyticsDetector.describe`), which records the values in force.
    """

    patch_size: int = _option(Rule(int, low=8), 64, compared=True)
    min_box: float = _option(Rule(float, low=0), 16, compared=True)
    conf: float = _option(Rule(float, low=0, high=1), DEFAULT_CONF, compared=True)
    max_per_concept: int | None = _option(Rule(int, low=1), None, compared=True)
    batch_size: int = _option(Rule(int, low=1), 16, compared=True)
    seed: int = _option(Rule(int), 0, compared=True)
    max_pixels: int = _option(Rule(int), DEFAULT_MAX_PIXELS, compared=True)
    max_file_bytes: int = _option(Rule(int, low=1), DEFAULT_MAX_FILE_BYTES, compared=True)
    embedder: str = _option(Rule(str, choices=EMBEDDERS), "pixels")
    crop: str = _option(Rule(str, choices=CROPS), "square", compared=True, recorded_when_set=True)
    workers: int | None = _option(Rule(int, low=0), None)  # decode threads; None: the runner's default
    device: str | None = _option(None, None, source="yolo")  # a YOLO detector's ultralytics device
    imgsz: int | None = _option(Rule(int, low=32), None, source="yolo")  # None: DEFAULT_IMGSZ
    iou: float | None = _option(Rule(float, low=0, high=1), None, source="yolo")  # None: DEFAULT_IOU
    max_det: int | None = _option(Rule(int, low=1), None, source="yolo")  # None: DEFAULT_MAX_DET
    classes: tuple[int | str, ...] | None = _option(None, None, source="yolo")  # None: every class
    names: tuple[str, ...] | None = _option(None, None, source="yolo")  # None: the model's own (see UltralyticsDetector)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    ignore_unmatched_annotations: bool = _option(None, False, source="annotations")
    strict: bool = _option(None, False, source="annotations")  # refuse unusable annotations instead of skipping them

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resume and self.overwrite:
            raise InputError("resume and overwrite exclude each other: pass one")
        for name, unset in (("classes", "every class"), ("names", "the model's own")):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (list, tuple)) or not value:
                    raise InputError(f"{name} must be a non-empty list (or None: {unset}), got {value!r}")
                object.__setattr__(self, name, tuple(value))

    def fingerprinted(self) -> dict[str, Any]:
        """The options a resume compares, as the build's state and the bank's manifest store them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("compared")
                and not (f.metadata["recorded_when_set"] and getattr(self, f.name) == f.default)}

    def check_source(self, detector: object, annotations: object) -> None:
        """`InputError` unless exactly one box source is given, and for an option set for another box source
        (`imgsz` with annotations, `strict` with a detector, ...)."""
        if (detector is None) == (annotations is None):
            raise InputError("pass exactly one box source: a YOLO detector (--detector WEIGHTS_OR_YAML) or COCO annotations "
                             "(--annotations FILE)")
        given = "annotations" if annotations is not None else "yolo" if isinstance(detector, (str, Path)) else "detector"
        for f in dataclasses.fields(self):
            source, value = f.metadata.get("source"), getattr(self, f.name)
            if source not in (None, given) and value is not None and value is not False:  # 0 is set
                raise InputError(_MISPLACED[source].format(name=f.name, value=value, flag=f.name.replace("_", "-")))

    def detector_settings(self) -> dict[str, Any]:
        """The YOLO settings that were set, as `UltralyticsDetector` takes them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("source") == "yolo" and getattr(self, f.name) is not None}


@dataclass(frozen=True, kw_only=True)
class RayOptions(_Checked):
    """What each Ray task and actor of a distributed build asks for (`cmcaug.builder.distributed.RayRunner`)."""

    num_cpus_per_task: float = _option(Rule(float, low=0, above=True), 1.0)
    num_gpus_per_task: float = _option(Rule(float, low=0), 0.0)
    actors: int | None = _option(Rule(int, low=1), None)  # None: autoscale up to what the cluster fits
