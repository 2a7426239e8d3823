"""`build_bank_distributed`: the `build_bank` pipeline with its batches spread over a Ray cluster.

    driver   list images, make and check the models, lock BANK, open BANK/.build/   (`build_bank`'s own code)
    Ray Data one row per batch still to do (its image refs)
      -> map_batches(decode_batches)   tasks: read + decode each image (`images.load_image`)
      -> map_batches(PatchWorker)      actor pool: detector + embedder made once per actor;
                                       `build.process_batch` -> the batch's shard bytes
    driver   writes each shard under BANK/.build/ as it arrives, in any order; stages and publishes the bank

Ray Data may fuse the two stages into the actors (it does when neither asks for a GPU); either way
decoded pixels never leave Ray and only shard bytes reach the driver.

Guarantees. The bank is byte-identical to `build_bank`'s for the same inputs and options: a shard
depends only on its batch's images (batch b = images [b*B, (b+1)*B) of the key-sorted list), shards are
named by batch number, not by arrival, and the finalize step is the local one. Each actor checks that
the detector and embedder it made describe themselves exactly as the driver's do (weights sha256,
ultralytics version, options), so a node with other weights or versions stops the build instead of
changing it; identical bytes also need the same device kind (CPU or GPU inference differ slightly).
Resume: the build state is the local one (`BANK/.build/`, same shard format, same fingerprint), so a
build interrupted on either path is resumed by either path, redoing only the batches without a shard.
Requirements: every node reads the images (and annotations / weights files) at the driver's absolute
paths (a shared file system); only the driver writes, so BANK need not be shared. The driver holds
BANK/.lock for the whole build, so a second build of BANK, local or on Ray, is refused (`BankLockedError`),
and a bank already in BANK is kept until the new one is published, as in a local build.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import os
import socket
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import errors
from .._deps import require
from ..errors import CMCAugError, InputError
from .detect import UltralyticsDetector
from .images import DecodedImage, ImageRef, decode_stream
from .options import RayOptions
from .pipeline import BuildJob, BuildStats, ModelSpec, build_bank, process_batch

log = logging.getLogger(__name__)

_PURPOSE = "Building a bank on Ray (build_bank_distributed, cmcaug build-bank --ray)"
_MAX_BLOCKS = 4096  # input rows are tiny; more blocks than this only adds scheduling work
_DECODED = pa.schema([
    ("batch", pa.int64()), ("key", pa.list_(pa.string())), ("failure", pa.list_(pa.string())),
    ("height", pa.list_(pa.int64())), ("width", pa.list_(pa.int64())), ("pixels", pa.large_binary()),
])
_SHARDS = pa.schema([("batch", pa.int64()), ("shard", pa.large_binary()), ("error", pa.string()), ("message", pa.string())])


# -- the two stages (run inside Ray workers) ---------------------------------------------------------
def _pack(batch: int, decoded: Sequence[DecodedImage]) -> dict[str, Any]:
    """One batch of decoded images as one Arrow row: the RGB bytes of every decoded image, back to back."""
    shapes = [d.pixels.shape[:2] if d.pixels is not None else (0, 0) for d in decoded]
    return {"batch": batch, "key": [d.key for d in decoded], "failure": [d.failure for d in decoded],
            "height": [h for h, _ in shapes], "width": [w for _, w in shapes],
            "pixels": b"".join(d.pixels.tobytes() for d in decoded if d.pixels is not None)}


def _unpack(row: dict[str, Any]) -> list[DecodedImage]:
    out, start = [], 0
    for key, failure, h, w in zip(row["key"], row["failure"], row["height"], row["width"], strict=True):
        pixels = None
        if failure is None:
            pixels = np.frombuffer(row["pixels"], np.uint8, h * w * 3, start).reshape(h, w, 3)
            start += h * w * 3
        out.append(DecodedImage(key, pixels, failure))
    return out


def decode_batches(table: pa.Table, *, threads: int, max_pixels: int, max_file_bytes: int) -> pa.Table:
    """Ray stage 1: read and decode the images of each batch row (bad images become counted failures)."""
    rows = []
    for row in table.to_pylist():
        refs = [ImageRef(*ref) for ref in zip(row["key"], row["path"], row["offset"], row["size"], row["failure"],
                                              strict=True)]
        decoded = decode_stream(refs, workers=threads, max_pixels=max_pixels, max_file_bytes=max_file_bytes)
        rows.append(_pack(row["batch"], list(decoded)))
    return pa.Table.from_pylist(rows, schema=_DECODED)


class PatchWorker:
    """Ray stage 2, an actor: makes the detector and embedder once, then turns decoded batches into shards.

    cmcaug's own errors (a box outside its image, a model that differs from the driver's) travel back as
    rows, so the driver re-raises them as they are instead of as Ray's wrappers.
    """

    def __init__(self, spec: ModelSpec, expected: str, concept_of: np.ndarray):
        self.concept_of, self.options, self.error = concept_of, spec.options, None
        try:
            self.detector, self.embedder = spec.make()
            found = _describe(self.detector, self.embedder)
            if found != expected:
                raise InputError(f"the Ray worker on {socket.gethostname()} made a detector/embedder that differs from the driver's "
                                 f"({found} instead of {expected}); install the same cmcaug, ultralytics and model files on every node")
        except CMCAugError as exc:
            self.error = exc

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = []
        for row in table.to_pylist():
            try:
                if self.error is not None:
                    raise self.error
                first = row["batch"] * self.options.batch_size
                shard = process_batch(first, _unpack(row), self.detector, self.concept_of, self.embedder, self.options)
                rows.append({"batch": row["batch"], "shard": shard, "error": None, "message": None})
            except CMCAugError as exc:
                rows.append({"batch": row["batch"], "shard": b"", "error": type(exc).__name__, "message": str(exc)})
        return pa.Table.from_pylist(rows, schema=_SHARDS)


def _describe(detector: Any, embedder: Any) -> str:
    return json.dumps({"detector": detector.describe(), "embedder": embedder.describe()}, sort_keys=True)


def _raise_shipped(name: str, message: str) -> None:
    cls = getattr(errors, name, None)
    raise (cls if isinstance(cls, type) and issubclass(cls, CMCAugError) else CMCAugError)(message)


# -- the runner (on the driver) ---------------------------------------------------------------------------
def _absolute(value: Any) -> Any:
    """A path that exists here, made absolute so workers with another working directory find it."""
    return str(Path(value).resolve()) if isinstance(value, (str, Path)) and Path(value).exists() else value


def _portable(job: BuildJob) -> tuple[ModelSpec, str]:
    """A spec every actor can make its own models from (its paths made absolute), and how those models must
    describe themselves: as the driver's do (detectors name their files by resolved path, however spelled).

    A YOLO model that has run does not pickle, so an `UltralyticsDetector` travels as its weights and options.
    """
    spec, detector = job.spec, job.spec.detector
    if isinstance(detector, UltralyticsDetector):
        detector = functools.partial(
            UltralyticsDetector, _absolute(detector.weights), conf=detector.conf, iou=detector.iou, device=detector.device,
            batch_size=detector.batch_size, classes=detector.classes, imgsz=detector.imgsz, max_det=detector.max_det,
            seed=detector.seed, names=detector.names)
    portable = dataclasses.replace(spec, detector=_absolute(detector), annotations=_absolute(spec.annotations))
    return portable, _describe(job.detector, job.embedder)


class RayRunner:
    """A `build_bank` batch runner on Ray Data; see the module docstring and `build_bank_distributed`."""

    def __init__(self, address: str | None = None, *, num_cpus_per_task: float = RayOptions.num_cpus_per_task,
                 num_gpus_per_task: float = RayOptions.num_gpus_per_task, actors: int | None = RayOptions.actors):
        self.options = RayOptions(num_cpus_per_task=num_cpus_per_task, num_gpus_per_task=num_gpus_per_task, actors=actors)
        if address is not None and not str(address).strip():
            raise InputError(f"address must be None, 'auto', 'local', HOST:PORT or ray://HOST:PORT, got {address!r}")
        self.address, self._in_session = address, False

    def _connect(self, ray: Any) -> bool:
        """Join Ray as `address` says; True when this call did (and must disconnect afterwards)."""
        if ray.is_initialized():
            if self.address is not None:
                raise InputError(f"Ray is already initialized in this process, so address={self.address!r} cannot be honoured; "
                                 "pass address=None to use that Ray, or call ray.shutdown() first")
            return False
        try:
            ray.init(address=self.address)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            raise InputError(f"could not connect to Ray at address={self.address or '(Ray default)'}: {exc}; start a cluster "
                             "with `ray start --head` (or point RAY_ADDRESS / the address at a running one), or use "
                             "address='local' (--ray local) for a private Ray on this machine") from exc
        return True

    @contextlib.contextmanager
    def session(self) -> Generator[Any, None, None]:
        """Ray, joined for the duration (disconnected after if this joined it); nested sessions share one
        connection, so `build_bank_distributed` can connect before writing anything and the batches reuse it."""
        ray = require("ray", _PURPOSE)
        require("ray.data", _PURPOSE)
        if self._in_session:
            yield ray
            return
        connected_here = self._connect(ray)
        self._in_session = True
        try:
            yield ray
        finally:
            self._in_session = False
            if connected_here:
                ray.shutdown()

    def _actor_pool(self, ray: Any, batches: int) -> Any:
        options = self.options
        if options.actors is not None:
            return ray.data.ActorPoolStrategy(size=min(options.actors, batches))
        resources = ray.cluster_resources()
        if options.num_gpus_per_task > 0:
            fits = int(resources.get("GPU", 0) // options.num_gpus_per_task)
            if fits < 1:
                raise InputError(f"the Ray cluster has {resources.get('GPU', 0)} GPUs, fewer than num_gpus_per_task="
                                 f"{options.num_gpus_per_task}; pass num_gpus_per_task=0, or actors=N for a cluster that autoscales")
        else:
            fits = int(resources.get("CPU", 1) // options.num_cpus_per_task)
        return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, min(fits, batches)))

    def _dataset(self, ray: Any, job: BuildJob, batches: Sequence[int]) -> Any:
        rows = [{"batch": b, "key": [r.key for r in refs], "path": [os.path.abspath(r.path) for r in refs],
                 "offset": [r.offset for r in refs], "size": [r.size for r in refs],
                 "failure": [r.failure for r in refs]}
                for b in batches for refs in [job.images(b)]]
        cpus, gpus = self.options.num_cpus_per_task, self.options.num_gpus_per_task
        threads = int(cpus) if job.options.workers is None else job.options.workers
        spec, expected = _portable(job)
        dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), _MAX_BLOCKS))
        dataset = dataset.map_batches(decode_batches, batch_size=1, batch_format="pyarrow", num_cpus=cpus,
                                      fn_kwargs={"threads": threads, "max_pixels": job.options.max_pixels,
                                                 "max_file_bytes": job.options.max_file_bytes})
        return dataset.map_batches(
            PatchWorker, batch_size=1, batch_format="pyarrow", compute=self._actor_pool(ray, len(rows)), num_cpus=cpus,
            num_gpus=gpus, fn_constructor_kwargs={"spec": spec, "expected": expected, "concept_of": job.concept_of},
        )

    def __call__(self, job: BuildJob, batches: Sequence[int]) -> Generator[tuple[int, bytes], None, None]:
        if not batches:
            return
        with self.session() as ray:
            log.info("running %d batches on Ray (%s): %g CPUs per task, %g GPUs per actor", len(batches),
                     self.address or "this process's Ray", self.options.num_cpus_per_task, self.options.num_gpus_per_task)
            context = ray.data.DataContext.get_current()
            bars, context.enable_progress_bars = context.enable_progress_bars, False  # build_bank draws its own
            try:
                for row in self._dataset(ray, job, batches).iter_rows():
                    if row["error"] is not None:
                        _raise_shipped(row["error"], row["message"])
                    yield int(row["batch"]), row["shard"]
            finally:
                context.enable_progress_bars = bars


def build_bank_distributed(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    address: str | None = None,
    num_cpus_per_task: float = RayOptions.num_cpus_per_task,
    num_gpus_per_task: float = RayOptions.num_gpus_per_task,
    actors: int | None = RayOptions.actors,
    **options: Any,
) -> BuildStats:
    """`build_bank` with its read -> decode -> detect -> crop -> embed batches run on Ray Data.

    `options` are `build_bank`'s (detector, annotations, vocab, patch_size, ..., resume, overwrite, seed,
    ignore_unmatched_annotations, device) and mean the same; the bank is byte-identical to `build_bank`'s,
    and either can resume the other's unfinished build. `workers` becomes the decode threads per Ray task
    (default `num_cpus_per_task`). Every actor runs YOLO on `device` as given, and this machine must have
    it too (it makes the driver's copy); with `num_gpus_per_task` > 0 leave it None: each actor then runs
    on the GPU Ray gives it.

    `address`: None uses the Ray this process is connected to, else Ray's default (`RAY_ADDRESS` or a
    cluster running on this machine, else a new private one); "auto" joins a running cluster (error if
    none); "local" starts a private one-machine Ray; "HOST:PORT" or "ray://HOST:PORT" joins that cluster.
    It connects before writing anything (an unreachable cluster is an `InputError`) and, when it
    connected, disconnects at the end. Each decode task and each detector actor asks
    for `num_cpus_per_task` CPUs; actors also ask for `num_gpus_per_task` GPUs. `actors` fixes the size
    of the actor pool (default: autoscale from 1 to what the cluster fits).
    """
    allowed = set(inspect.signature(build_bank).parameters) - {"inputs", "out", "runner"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(unknown)} for build_bank_distributed; expected address, num_cpus_per_task, "
                         f"num_gpus_per_task, actors or build_bank's options: {', '.join(sorted(allowed))}")
    runner = RayRunner(address, num_cpus_per_task=num_cpus_per_task, num_gpus_per_task=num_gpus_per_task, actors=actors)
    with runner.session():  # connect (or fail) before touching the output folder
        return build_bank(inputs, out, runner=runner, **options)
