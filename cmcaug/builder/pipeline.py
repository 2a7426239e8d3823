"""`build_bank`: image corpus -> concept patch bank, resumable and independent of the worker count.

    list images (sorted by key) -> decode pool -> detect in batches -> crops (`cmcaug.crops`) -> embed
      -> one shard per batch under BANK/.build/ -> finalize: stage the bank in .build/staged/ (`BankContents`)
      -> publish it into BANK -> remove .build/

The middle part (decode -> detect -> crop -> embed -> shard bytes) runs in a *batch runner*: `run_local`
(threads and models in this process) by default, or `cmcaug.builder.distributed.RayRunner` on a Ray cluster.
Runners call the same `process_batch` and may finish batches in any order; this module writes the shards.
Every runner reads the options from one `cmcaug.builder.options.BuildOptions`, checked before any work.

Determinism: batch b always holds images [b*B, (b+1)*B) of the key-sorted list and its shard depends on
nothing else, and the finalize step reads shards in batch order, so neither `workers`, the runner nor a
resume changes a byte of the bank. `max_per_concept` draws from a generator seeded by (seed, concept).

Resume: the shards and `state.json` under BANK/.build/ are the build's state (`cmcaug.builder._state`); a
build killed at any point and re-run with `resume=True` redoes only the batches without a shard. The
build holds BANK/.lock from start to end, and a bank already in BANK stays as it was until the new one
is published (see `cmcaug.builder._state`).
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm import tqdm

from ..bank._folder import Folder
from ..bank.writer import BankContents
from ..concepts import ConceptVocab
from ..crops import crop_patch
from ..errors import InputError
from ._classes import concept_map, read_names
from ._state import BuildFolder, crash_point, digest, encode_shard, locked_output, open_build, publish_build
from .detect import AnnotationDetector, Detector, UltralyticsDetector
from .embed import Embedder, make_embedder
from .images import FAILURE_REASONS, DecodedImage, ImageRef, decode_stream, list_images
from .options import BuildOptions, resolve_conf

log = logging.getLogger(__name__)

DROP_REASONS = ("unknown_concept", "low_score", "small", "max_per_concept")


@dataclass(frozen=True)
class BuildStats:
    """What a build did. `stats` is also stored in the bank's manifest (everything but timings)."""

    bank: Path
    stats: dict[str, Any]
    seconds: float
    images_per_s: float
    resumed_batches: int = 0
    already_built: bool = False
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)


# -- one batch -------------------------------------------------------------------------------------
def process_batch(first: int, decoded: Sequence[DecodedImage], detector: Detector, concept_of: np.ndarray,
                  embedder: Embedder, options: BuildOptions) -> bytes:
    """Detect, filter, crop and embed one batch of decoded images (image numbers `first`, `first + 1`, ...);
    return its build shard's bytes. The one per-batch step of every runner, so every runner writes the same shards."""
    ok = [(i, d) for i, d in enumerate(decoded) if d.pixels is not None]
    found = detector.detect([d.pixels for _, d in ok], [d.key for _, d in ok]) if ok else []
    dropped: Counter[str] = Counter()
    rows: dict[str, list[Any]] = {"concept_id": [], "image": [], "box": [], "score": []}
    crops: list[np.ndarray] = []
    for (i, d), det in zip(ok, found, strict=True):
        known = (det.labels >= 0) & (det.labels < len(concept_of))
        concept = np.full(len(det), -1, np.int32)
        concept[known] = concept_of[det.labels[known]]
        sides = np.stack([det.boxes[:, 2] - det.boxes[:, 0], det.boxes[:, 3] - det.boxes[:, 1]], axis=1)
        unknown = concept < 0
        broken = ~unknown & ~(np.isfinite(det.scores) & np.isfinite(det.boxes).all(axis=1))  # any detector's NaN
        low = ~unknown & ~broken & (det.scores < options.conf)
        small = ~unknown & ~broken & ~low & ((sides.max(axis=1) < options.min_box) | (sides.min(axis=1) < 1))
        dropped.update(unknown_concept=int(unknown.sum()), not_finite=int(broken.sum()), low_score=int(low.sum()),
                       small=int(small.sum()))
        dropped.update(det.dropped)  # what the detector skipped itself (unusable annotations, crowd regions)
        keep = np.flatnonzero(~(unknown | broken | low | small))
        image = Image.fromarray(d.pixels) if keep.size else None
        for k in keep:
            crops.append(crop_patch(image, det.boxes[k], options.patch_size, options.crop))
            rows["concept_id"].append(concept[k])
            rows["image"].append(first + i)
            rows["box"].append(det.boxes[k])
            rows["score"].append(det.scores[k])
    pixels = np.stack(crops) if crops else np.zeros((0, options.patch_size, options.patch_size, 3), np.uint8)
    arrays = {
        "concept_id": np.array(rows["concept_id"], np.int32), "image": np.array(rows["image"], np.int64),
        "box": np.array(rows["box"], np.float32).reshape(-1, 4), "score": np.array(rows["score"], np.float32),
        "pixels": pixels, "embeddings": embedder.embed(pixels).astype(np.float16),
    }
    failed = Counter(d.failure for d in decoded if d.failure)
    found_boxes = sum(len(f) + sum(f.dropped.values()) for f in found)  # found == kept + dropped
    stats = {"read": len(decoded), "decoded": len(ok), "failed": dict(failed), "found": int(found_boxes),
             "dropped": dict(+dropped)}  # reasons that happened; the summary adds the usual ones at 0
    return encode_shard(arrays, stats)


# -- finalize --------------------------------------------------------------------------------------
def select_per_concept(concept: np.ndarray, image: np.ndarray, box: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Boolean mask keeping at most `limit` rows per concept: a seeded draw per concept over the rows in
    (image, box) order, so the choice depends only on the rows, `limit` and `seed`."""
    keep = np.ones(len(concept), bool)
    if limit is None:
        return keep
    order = np.lexsort((box[:, 3], box[:, 2], box[:, 1], box[:, 0], image, concept))
    for rows in np.split(order, np.flatnonzero(np.diff(concept[order])) + 1):  # one group per concept, O(N) in all
        if len(rows) > limit:
            chosen = np.random.default_rng([seed, int(concept[rows[0]])]).choice(len(rows), size=limit, replace=False)
            keep[rows] = False
            keep[rows[chosen]] = True
    return keep


def _finalize(bank: Folder, build: BuildFolder, n_batches: int, keys: Sequence[str], vocab: ConceptVocab,
              options: BuildOptions, dim: int, provenance: dict[str, Any], unmatched: int) -> dict[str, Any]:
    """Gather the shards (in batch order) into the bank, keep `max_per_concept`, publish, remove `build`."""
    meta = [build.load(b, ("concept_id", "image", "box", "score")) for b in range(n_batches)]
    concept = np.concatenate([m["concept_id"] for m in meta])
    image = np.concatenate([m["image"] for m in meta])
    box = np.concatenate([m["box"] for m in meta])
    keep = select_per_concept(concept, image, box, options.max_per_concept, options.seed)
    n, p = int(keep.sum()), options.patch_size
    kept = np.split(keep, np.cumsum([len(m["concept_id"]) for m in meta])[:-1])
    pixels = build.gather("pixels", kept, (p, p, 3), np.dtype(np.uint8))
    embeddings = build.gather("embeddings", kept, (dim,), np.dtype(np.float16))
    counts = np.bincount(concept[keep], minlength=len(vocab))
    total: Counter[str] = Counter()
    failed: Counter[str] = Counter({r: 0 for r in FAILURE_REASONS})
    dropped: Counter[str] = Counter({r: 0 for r in DROP_REASONS})
    for m in meta:
        total.update(read=m["stats"]["read"], decoded=m["stats"]["decoded"], found=m["stats"]["found"])
        failed.update(m["stats"]["failed"])
        dropped.update(m["stats"]["dropped"])
    dropped["max_per_concept"] = int((~keep).sum())
    images: dict[str, Any] = {"read": total["read"], "decoded": total["decoded"], "failed": dict(failed)}
    if unmatched:  # only then: a bank with no annotated image outside its inputs keeps the stats it always had
        images["annotated_not_among_inputs"] = unmatched
    stats = {
        "images": images,
        "boxes": {"found": total["found"], "kept": n, "dropped": dict(dropped)},
        "patches_per_concept": {name: int(c) for name, c in zip(vocab.names, counts)},
    }
    patches = pa.table({
        "concept_id": pa.array(concept[keep], pa.int32()),
        "image": pa.array([keys[i] for i in image[keep]], pa.string()),
        "box": pa.FixedSizeListArray.from_arrays(pa.array(box[keep].ravel(), pa.float32()), 4),
        "score": pa.array(np.concatenate([m["score"] for m in meta])[keep], pa.float32()),
    })
    contents = BankContents.check(vocab=vocab, patches=patches, pixels=pixels, embeddings=embeddings, provenance=provenance,
                                  stats=stats)
    return publish_build(bank, build, lambda staged: contents.stage(staged, options.progress))


# -- batch runners ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """How to make a build's detector and embedder: plain values, so another process (a Ray actor) can
    make its own copy instead of receiving the driver's."""

    detector: str | Path | Detector | Callable[[], Detector] | None
    annotations: str | Path | None
    options: BuildOptions  # embedder; and for a YOLO model made here: conf, batch_size, seed, its detector_settings

    def make(self) -> tuple[Detector, Embedder]:
        """The detector and embedder (from one box source: `BuildOptions.check_source` checked it); `InputError`
        when the box source or the device cannot be used."""
        options = self.options
        if self.annotations is not None:
            det: Detector = AnnotationDetector(self.annotations, strict=options.strict)
        elif isinstance(self.detector, (str, Path)):
            det = UltralyticsDetector(self.detector, conf=options.conf, batch_size=options.batch_size, seed=options.seed,
                                      **options.detector_settings())
        else:
            det = self.detector() if callable(self.detector) and not isinstance(self.detector, Detector) else self.detector
            if not isinstance(det, Detector):
                raise InputError(f"detector must be a weights path, a model yaml, a Detector or a function making one, "
                                 f"got {type(det).__name__}")
        return det, make_embedder(options.embedder, det)


@dataclass(frozen=True)
class BuildJob:
    """What a batch runner gets: the key-sorted images, the models (made here; `spec` makes them
    elsewhere, and carries the build's options) and the detector-class -> concept map."""

    refs: Sequence[ImageRef]
    spec: ModelSpec
    detector: Detector
    embedder: Embedder
    concept_of: np.ndarray

    @property
    def options(self) -> BuildOptions:
        return self.spec.options

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    @property
    def n_batches(self) -> int:
        return -(-len(self.refs) // self.batch_size)

    def images(self, batch: int) -> Sequence[ImageRef]:
        return self.refs[batch * self.batch_size:(batch + 1) * self.batch_size]


# (job, batch numbers) -> (batch, shard bytes from `process_batch`) for each batch, in any order.
BatchRunner = Callable[[BuildJob, Sequence[int]], Generator[tuple[int, bytes], None, None]]


def run_local(job: BuildJob, batches: Sequence[int]) -> Generator[tuple[int, bytes], None, None]:
    """The default runner: decode in `job.options.workers` threads (default min(8, CPUs)), detect and embed in
    this process, batch after batch."""
    workers = min(8, os.cpu_count() or 1) if job.options.workers is None else job.options.workers
    refs = [r for b in batches for r in job.images(b)]
    stream = decode_stream(refs, workers=workers, max_pixels=job.options.max_pixels,
                           max_file_bytes=job.options.max_file_bytes, prefetch=2 * max(job.batch_size, workers))
    try:
        for b in batches:
            decoded = [next(stream) for _ in job.images(b)]
            yield b, process_batch(b * job.batch_size, decoded, job.detector, job.concept_of, job.embedder, job.options)
    finally:
        stream.close()


# -- the pipeline ----------------------------------------------------------------------------------
def empty_bank_warning(stats: dict[str, Any]) -> str:
    """One line saying a build kept no patches and why (its largest drop and failure counts)."""
    images, boxes = stats["images"], stats["boxes"]
    counts = {f"dropped {r}": n for r, n in boxes["dropped"].items()} | {f"images {r}": n for r, n in images["failed"].items()}
    counts["annotated images not among the inputs"] = images.get("annotated_not_among_inputs", 0)
    reasons = ", ".join(f"{n} {what}" for what, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n > 0)
    return (f"the bank holds 0 patches ({images['read']} images read, {images['decoded']} decoded, {boxes['found']} boxes found"
            f"{'; ' + reasons if reasons else ''}); check conf, min_box, the vocabulary and the box source")


def _run_batches(build: BuildFolder, job: BuildJob, todo: Sequence[int], runner: BatchRunner) -> float:
    """Run the batches `todo` with `runner`, saving each shard under `build` as it arrives, in any order;
    return the images/s of this run (the batches done before a resume are not counted)."""
    if len(todo) < job.n_batches:
        log.info("resuming %s: %d of %d batches already done", build.path, job.n_batches - len(todo), job.n_batches)
    todo_images = sum(len(job.images(b)) for b in todo)
    pending = set(todo)
    started = time.perf_counter()
    with tqdm(total=len(job.refs), initial=len(job.refs) - todo_images, unit="img", desc="build-bank",
              disable=not job.options.progress) as bar:
        results = runner(job, todo)
        try:
            for count, (b, shard) in enumerate(results, 1):
                if b not in pending:
                    raise RuntimeError(f"the batch runner returned batch {b}, which was not asked for or came twice")
                pending.discard(b)
                build.save(b, shard)
                crash_point(f"shard:{count}")
                bar.update(len(job.images(b)))
        finally:
            results.close()
    if pending:
        raise RuntimeError(f"the batch runner stopped without {len(pending)} batches, e.g. {sorted(pending)[:5]}")
    return todo_images / max(time.perf_counter() - started, 1e-9)


def build_bank(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    detector: str | Path | Detector | Callable[[], Detector] | None = None,
    annotations: str | Path | None = None,
    vocab: ConceptVocab | str | Path | None = None,
    patch_size: int = BuildOptions.patch_size,
    min_box: float = BuildOptions.min_box,
    conf: float | None = None,
    max_per_concept: int | None = BuildOptions.max_per_concept,
    embedder: str = BuildOptions.embedder,
    batch_size: int = BuildOptions.batch_size,
    workers: int | None = BuildOptions.workers,
    resume: bool = BuildOptions.resume,
    overwrite: bool = BuildOptions.overwrite,
    seed: int = BuildOptions.seed,
    progress: bool = BuildOptions.progress,
    max_pixels: int = BuildOptions.max_pixels,
    max_file_bytes: int = BuildOptions.max_file_bytes,
    runner: BatchRunner | None = None,
    ignore_unmatched_annotations: bool = BuildOptions.ignore_unmatched_annotations,
    strict: bool = BuildOptions.strict,
    device: str | None = BuildOptions.device,
    crop: str = BuildOptions.crop,
    imgsz: int | None = BuildOptions.imgsz,
    iou: float | None = BuildOptions.iou,
    max_det: int | None = BuildOptions.max_det,
    classes: Sequence[int | str] | None = BuildOptions.classes,
    names: Sequence[str] | str | Path | None = BuildOptions.names,
) -> BuildStats:
    """Build a patch bank at `out` from images (folders, image files, path lists, img2dataset .tar shards).

    Boxes come from `detector` (YOLO weights / yaml, any `Detector`, or a zero-argument function making
    one) or `annotations` (COCO JSON). Boxes are dropped when their class is not in `vocab` (default: the
    detector's class names), their score is below `conf` (default: the detector's own `conf` when
    `detector` is a Detector that has one, else 0.25), or their longer side is below `min_box` pixels; at
    most `max_per_concept` patches per concept are kept (a draw seeded by `seed`, which also seeds a yaml
    model's random weights). `workers` decode threads (default: min(8, CPUs)) never change the result.
    `crop` is how a box becomes a patch: "square" (around the box, on its longer side), "tight" (the box, stretched)
    or "pad-mean" (the box, padded with its mean colour); `cmcaug.crops` defines them. A YOLO detector given as
    weights or a yaml runs at `imgsz`, `iou`, `max_det` (None: ultralytics' 640, 0.7, 300) on `classes` (names or
    indices; None: all), its classes named `names` (a list or a file: `cmcaug.builder._classes.read_names`; None: the
    model's own, COCO's for a yaml model of 80 numbered classes). Inputs, annotations and weights files are
    compared by resolved path, so a resume may spell them differently. Images over `max_pixels` pixels are
    skipped as decompression bombs, files and tar members over
    `max_file_bytes` bytes unread ("file_too_big"). `runner` runs the batches (default `run_local`; Ray's
    `build_bank_distributed` passes its own) and never changes the result either, so a build can be
    resumed with another runner. Same as `cmcaug build-bank`.

    With `ignore_unmatched_annotations`, annotations of images not among the inputs are left out and
    counted (`stats["images"]["annotated_not_among_inputs"]`) instead of refused: a build from part of a
    large COCO file. An annotation with a non-finite or empty box or a non-finite score is skipped and
    counted among the dropped boxes, or refused with `strict`. `device` is the YOLO detector's ultralytics
    device ("cpu", "0", "cuda:0"; None: ultralytics' choice). Like `workers`, these three are not part of
    what `resume` compares: CPU and GPU boxes differ only by float rounding, so a build may resume on
    another device (a byte-identical bank needs the same kind of device). A build that keeps no patch logs
    a warning whose record has `empty_bank=True` (the CLI prints it once, after its tables).

    With `overwrite`, the bank already in `out` stays readable and unchanged until the new one is published
    in its place; a build that fails or is killed before that leaves it as it was. The build holds
    `out/.lock` throughout: a second build of `out` raises `BankLockedError` naming this one. A write the
    file system refuses (a full disk) raises `StorageError`; the finished batches stay for `resume`.
    """
    started = time.perf_counter()
    options = BuildOptions(
        patch_size=patch_size, min_box=min_box, conf=resolve_conf(conf, detector), max_per_concept=max_per_concept,
        embedder=embedder, batch_size=batch_size, workers=workers, resume=resume, overwrite=overwrite, seed=seed,
        progress=progress, max_pixels=max_pixels, max_file_bytes=max_file_bytes, crop=crop, imgsz=imgsz, iou=iou,
        max_det=max_det, classes=classes, names=read_names(names) if isinstance(names, (str, Path)) else names,
        ignore_unmatched_annotations=ignore_unmatched_annotations, strict=strict, device=device)
    options.check_source(detector, annotations)
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    refs: list[ImageRef] = list_images(inputs)
    keys = [r.key for r in refs]
    spec = ModelSpec(detector, annotations, options)
    det, emb = spec.make()
    unmatched = 0
    if isinstance(det, AnnotationDetector):
        unmatched = len(det.annotated - set(det.match(keys, ignore_unmatched=options.ignore_unmatched_annotations).values()))
        if unmatched:
            log.info("%s annotates %d image(s) that are not among the inputs: their annotations are left out "
                     "(ignore_unmatched_annotations)", det.path, unmatched)
    if not isinstance(vocab, ConceptVocab):
        vocab = ConceptVocab.from_names(det.names) if vocab is None else ConceptVocab.load(vocab)
    concept_of = concept_map(det.names, vocab)
    description = {
        "inputs": [str(Path(p).resolve()) for p in inputs],  # however spelled (`_state` reads older builds' as typed)
        "images": {"count": len(keys), "keys_sha256": digest(keys)}, "detector": det.describe(), "embedder": emb.describe(),
        "vocab": {"concepts": len(vocab), "sha256": digest(vocab.to_dict())}, "options": options.fingerprinted(),
    }
    state = {"fingerprint": digest(description), "description": description}
    out = Path(out)
    with locked_output(out) as bank:  # the whole build, on any runner: a second build of `out` is refused
        finished = open_build(bank, state, options.resume, options.overwrite)
        if finished is not None:
            log.info("%s is already a finished bank of these inputs and options", out)
            return BuildStats(out, finished.get("stats", {}), time.perf_counter() - started, 0.0, already_built=True,
                              manifest=finished)
        job = BuildJob(refs, spec, det, emb, concept_of)
        with BuildFolder(bank) as build:
            todo = build.missing(job.n_batches)
            images_per_s = _run_batches(build, job, todo, runner or run_local)
            provenance = {**description, "fingerprint": state["fingerprint"]}
            manifest = _finalize(bank, build, job.n_batches, keys, vocab, options, emb.dim, provenance, unmatched)
    if manifest["stats"]["boxes"]["kept"] == 0:
        log.warning("%s", empty_bank_warning(manifest["stats"]), extra={"empty_bank": True})
    return BuildStats(out, manifest["stats"], time.perf_counter() - started, images_per_s, job.n_batches - len(todo), manifest=manifest)
