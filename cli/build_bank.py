"""`cmcaug build-bank IMAGES... -o BANK`: detect, crop and embed concept patches into a patch bank."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from cmcaug.builder.options import (CROPS, DEFAULT_CONF, DEFAULT_IMGSZ, DEFAULT_IOU, DEFAULT_MAX_DET, EMBEDDERS, BuildOptions,
                                    RayOptions)

from .usage import UsageError

EPILOG = """\
inputs:
  folders (searched recursively, symlinked folders included, for .jpg .jpeg .png .webp .bmp in any
  letter case and for .tar shards), image files, text files listing one image path per line (relative
  to the list file), and uncompressed webdataset .tar shards as written by img2dataset (pass the shards
  or their folder). Unreadable, truncated, empty, non-image and oversized (decompression-bomb) images
  are skipped and counted by reason; CMYK, 16-bit, grayscale, palette and EXIF-rotated images are
  converted to upright RGB.

crops:
  --crop says how a box becomes a P x P patch (resized with an antialiased bicubic filter):
    square    (default) a square centred on the box, side = the box's longer side, black outside the
              image: the object and its surroundings (a tie's patch is mostly the hand holding it)
    tight     exactly the box, stretched to a square: only the object, its aspect ratio not kept
    pad-mean  exactly the box, its shorter side padded to a square with the box's mean colour: only
              the object, aspect ratio kept, no other pixel of the image
  (`cmcaug preview --crops CORPUS -o crops.png` draws the three side by side.)

yolo:
  --detector takes a local .pt file or a model yaml (random weights, seeded by --seed); weights are never
  downloaded. A yaml model numbers its classes 0, 1, ...: with 80 classes (every official ultralytics
  detection yaml, e.g. yolov8n.yaml) they are named after COCO's classes, so --vocab default matches;
  otherwise name them with --names FILE (a dataset yaml with names:, or one name a line) or a names:
  list in the model yaml. --imgsz, --iou, --max-det and --classes are passed to ultralytics' predict
  (defaults: ultralytics' own); they change the boxes, so --resume compares them.

resume:
  the build keeps its state in BANK/.build/. If it is killed at any point, rerun the same command with
  --resume: it redoes only the unfinished batches and writes exactly the bank an uninterrupted run
  writes. --resume on a missing bank starts one; on a finished bank of the same inputs and options it
  does nothing. Paths are compared resolved: corpus/images, ./corpus/images/ and its absolute path are
  the same input. Other inputs or options are refused (exit 3), naming each difference with both
  values; --overwrite then starts over, discarding the finished batches.

overwrite, failures and concurrent builds:
  the new bank is staged whole in BANK/.build/ and then published in one step (manifest.json last). Until
  then a bank already in BANK (--overwrite) stays readable and byte for byte unchanged: a build that
  fails (bad input, a full disk) or is killed leaves it as it was, and --resume continues the new one.
  A build killed while publishing is finished by the next --resume or --overwrite. A build holds
  BANK/.lock from start to end; a second build of the same BANK stops at once (exit 6) and names the
  process holding it. Nothing is read or written through a symbolic link inside BANK: a link there is
  refused (exit 4).

ray:
  --ray runs the read -> decode -> detect -> crop -> embed batches as Ray Data tasks and actors (one
  detector per actor) and writes the same bank, byte for byte, as a run without it; either can resume
  the other's unfinished build. ADDRESS: 'auto' joins the running cluster (ray start, RAY_ADDRESS) and
  fails if there is none; 'local' starts a private Ray on this machine; HOST:PORT or ray://HOST:PORT
  joins that cluster; no ADDRESS: Ray's default (RAY_ADDRESS or a cluster running here, else a private
  one). Every node must read IMAGES (and --annotations / --detector files) at the same absolute paths;
  only this machine writes BANK. With --ray-gpus, leave --device out: each actor then runs YOLO on the
  GPU Ray gives it (a --device must also exist on this machine). Needs pip install "cmcaug[distributed]".

subset of an annotation file:
  --annotations refuses a file that annotates images not among IMAGES (it usually means the wrong
  folder). To build from part of a large file (5k of COCO's images, one shard), pass
  --ignore-unmatched-annotations: those images' annotations are skipped and counted in the summary
  ("annotated images not among the inputs"). The flag never changes a bank, so it is not part of what
  --resume compares; resuming such a build without it is refused with the same error.

device:
  --device runs YOLO on cpu, 0, cuda:0 (or 0,1: ultralytics uses the first). Like --workers it is not
  part of what --resume compares, so a build may continue on another device; CPU and GPU boxes differ
  only by float rounding, and a byte-identical bank needs the same kind of device.

exit codes:
  0    the bank was built (or, with --resume, was already complete)
  1    unexpected internal error (a bug; please report it)
  2    bad usage: unknown flag, no -o, neither or both of --detector and --annotations,
       both --resume and --overwrite, --ray-cpus / --ray-gpus / --ray-actors without --ray,
       --device, --imgsz, --iou, --max-det, --classes or --names without --detector,
       --ignore-unmatched-annotations or --strict without --annotations; a number out of range,
       e.g. --patch-size below 8 or --conf outside [0, 1] (the message names the rule)
  3    bad input: an input path does not exist; no images found; BANK exists without --resume or
       --overwrite, or holds files that are not a bank's; --resume with other inputs or options than
       the unfinished build; annotations for an image not among the inputs (without
       --ignore-unmatched-annotations), an unknown category, a box outside its image; a detector
       class list that shares no name with --vocab; YOLO weights not found; --names that are not one
       per class; a --classes name the model lacks; a --device this machine
       lacks; --embedder detector without --detector; a Ray worker whose detector or embedder
       differs from this machine's; --ray-gpus on a cluster without GPUs
  4    malformed bank or build state: an unreadable BANK/manifest.json or BANK/.build shard
       (rerun with --overwrite); a symbolic link, FIFO or device inside BANK or BANK/.build
  5    a missing dependency: ultralytics (for --detector), ray (for --ray) or faiss
  6    BANK is being written by another build (the message names its pid, host and start time): wait
       for it to finish, or stop it
  7    the file system refused a write (disk full, quota, file too large, permissions, I/O error; the
       message names the file): the bank already in BANK is unchanged and the finished batches are
       kept in BANK/.build/: free space and rerun with --resume
  130  interrupted (Ctrl-C): rerun with --resume to continue
"""


def _add(group: Any, flag: str, options: type[BuildOptions | RayOptions], name: str, **kwargs: Any) -> None:
    """Add `flag` for the library option `name` of `options`, typed, range-checked and defaulted by that
    option's one definition, so `--patch-size 4` is a usage error with Python's words: `argument --patch-size:
    must be >= 8, got 4` (Python: `patch_size must be >= 8, got 4`)."""
    rule = options.rule(name)

    def parse(text: str) -> int | float:
        try:
            return rule.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    kwargs.setdefault("default", getattr(options, name))
    group.add_argument(flag, type=parse, **kwargs)


def _listed(text: str) -> tuple[str, ...]:
    """A comma-separated --classes value as its items."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected class names or indices separated by commas, got {text!r}")
    return items


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build-bank",
        help="build a concept patch bank from images",
        description="Find objects in IMAGES (YOLO detector or COCO annotations), cut a patch from each box (--crop), "
        "embed it and write a patch bank to BANK (patches sorted by concept, FAISS index, manifest).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGES", help="image folders, image files, path lists or .tar shards")
    parser.add_argument("-o", "--output", required=True, metavar="BANK", help="bank folder to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--detector", metavar="WEIGHTS_OR_YAML", help="ultralytics YOLO .pt file or model yaml (e.g. yolov8n.yaml)")
    source.add_argument("--annotations", metavar="COCO.json", help="COCO-format boxes instead of a detector")
    parser.add_argument("--ignore-unmatched-annotations", action="store_true",
                        help="skip and count the annotations of images not among IMAGES (a build from part of a COCO file)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse an annotation with a non-finite or empty box or a non-finite score (default: skip it "
                        "and count it among the dropped boxes)")
    yolo = parser.add_argument_group("YOLO (--detector)")
    yolo.add_argument("--device", metavar="DEVICE",
                      help="where YOLO runs: cpu, 0, cuda:0, ... (default: ultralytics' choice, a GPU if there is one)")
    _add(yolo, "--imgsz", BuildOptions, "imgsz", metavar="PX",
         help=f"inference size in pixels, rounded up to a multiple of 32 (default {DEFAULT_IMGSZ})")
    _add(yolo, "--iou", BuildOptions, "iou", help=f"IoU threshold of non-maximum suppression (default {DEFAULT_IOU:g})")
    _add(yolo, "--max-det", BuildOptions, "max_det", metavar="N",
         help=f"keep at most N boxes per image (default {DEFAULT_MAX_DET})")
    yolo.add_argument("--classes", type=_listed, metavar="LIST",
                      help="detect only these classes: names or indices, comma-separated, e.g. person,dog or 0,16 (default: all)")
    yolo.add_argument("--names", metavar="FILE", help="name the model's classes, one per class in class order: a dataset yaml "
                      "with names:, or a text file with one name a line (default: the model's own; COCO's for a yaml model "
                      "of 80 numbered classes such as yolov8n.yaml)")
    parser.add_argument("--vocab", metavar="FILE", help='concept vocabulary JSON {"name": [synonyms...]}, or "default" for the built-in COCO-80 (default: the class names)')
    _add(parser, "--patch-size", BuildOptions, "patch_size", metavar="P", help="patch side in pixels (default %(default)s)")
    _add(parser, "--min-box", BuildOptions, "min_box", metavar="PX", help="drop boxes whose longer side is shorter (default %(default)s)")
    _add(parser, "--conf", BuildOptions, "conf", default=None,  # None: build_bank's default (resolve_conf)
         help=f"drop boxes scoring below this (default {DEFAULT_CONF:g})")
    _add(parser, "--max-per-concept", BuildOptions, "max_per_concept", metavar="N",
         help="keep at most N patches per concept, drawn with --seed")
    parser.add_argument("--crop", choices=CROPS, default=BuildOptions.crop,
                        help="square: around the box on its longer side (default); tight: the box, stretched; pad-mean: "
                        "the box, padded with its mean colour (see crops below)")
    parser.add_argument("--embedder", choices=EMBEDDERS, default=BuildOptions.embedder,
                        help="pixels: model-free colour/layout descriptor (default); detector: pooled YOLO backbone features")
    _add(parser, "--batch-size", BuildOptions, "batch_size", help="images per detector batch and build shard (default %(default)s)")
    _add(parser, "--workers", BuildOptions, "workers", metavar="N", help="decode threads (default min(8, CPUs)); never changes the bank")
    _add(parser, "--max-file-bytes", BuildOptions, "max_file_bytes", metavar="BYTES",
         help="skip image files and tar members larger than this, unread, as file_too_big (default %(default)s: 256 MiB)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted build in BANK/.build/")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing bank in BANK (kept intact until the new one is published)")
    parser.add_argument("--seed", type=int, default=BuildOptions.seed,
                        help="seed of the --max-per-concept draw and of yaml models (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = parser.add_argument_group("distributed build (Ray)")
    ray.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                     help="run the batches on Ray: auto, local, HOST:PORT or ray://HOST:PORT (default: Ray's own choice)")
    _add(ray, "--ray-cpus", RayOptions, "num_cpus_per_task", metavar="C",
         help="CPUs per decode task and per detector actor (default %(default)g)")
    _add(ray, "--ray-gpus", RayOptions, "num_gpus_per_task", metavar="G", help="GPUs per detector actor (default %(default)g)")
    _add(ray, "--ray-actors", RayOptions, "actors", metavar="N", help="detector actors (default: autoscale up to what the cluster fits)")
    parser.set_defaults(run=run)


_NEEDS = {"yolo": ("detector", "is a YOLO setting, so it needs --detector (--annotations runs no model)"),
          "annotations": ("annotations", "needs --annotations")}  # an option's box source: its flag, and what to say


def _usage_problem(args: argparse.Namespace) -> str | None:
    """Flags that only mean something beside another flag, given without it (for the box source flags: each
    option's `source`, `BuildOptions.check_source`)."""
    ray_defaults = (RayOptions.num_cpus_per_task, RayOptions.num_gpus_per_task, RayOptions.actors)
    if args.ray is None and (args.ray_cpus, args.ray_gpus, args.ray_actors) != ray_defaults:
        return "--ray-cpus, --ray-gpus and --ray-actors need --ray"
    if args.embedder == "detector" and args.detector is None:
        return "--embedder detector pools the YOLO detector's features, so it needs --detector"
    for f in dataclasses.fields(BuildOptions):
        source = f.metadata.get("source")
        value = getattr(args, f.name) if source else None
        if value is not None and value is not False and getattr(args, _NEEDS[source][0]) is None:  # 0 is given
            return f"--{f.name.replace('_', '-')} {_NEEDS[source][1]}"
    return None


def run(args: argparse.Namespace) -> int:
    problem = _usage_problem(args)
    if problem:
        raise UsageError(problem)
    from cmcaug.builder.pipeline import build_bank, empty_bank_warning

    from .render import held_back, summary, table

    options = dict(
        detector=args.detector, annotations=args.annotations, vocab=args.vocab, patch_size=args.patch_size,
        min_box=args.min_box, conf=args.conf, max_per_concept=args.max_per_concept, embedder=args.embedder,
        batch_size=args.batch_size, workers=args.workers, resume=args.resume, overwrite=args.overwrite, seed=args.seed,
        progress=not args.no_progress, ignore_unmatched_annotations=args.ignore_unmatched_annotations, device=args.device,
        max_file_bytes=args.max_file_bytes, strict=args.strict, crop=args.crop, imgsz=args.imgsz, iou=args.iou,
        max_det=args.max_det, classes=args.classes, names=args.names,
    )
    with held_back("cmcaug.builder.pipeline", "empty_bank"):  # printed once, after the tables
        if args.ray is None:
            result = build_bank(args.images, args.output, **options)
        else:
            from cmcaug.builder.distributed import build_bank_distributed

            result = build_bank_distributed(args.images, args.output, address=args.ray or None, num_cpus_per_task=args.ray_cpus,
                                            num_gpus_per_task=args.ray_gpus, actors=args.ray_actors, **options)
    images, boxes = result.stats["images"], result.stats["boxes"]
    print(summary("patch bank", {
        "path": str(result.bank), "runner": "local" if args.ray is None else f"ray {args.ray or '(default)'}",
        "patches": boxes["kept"], "seconds": round(result.seconds, 2),
        "images/s": round(result.images_per_s, 1), "batches resumed": result.resumed_batches,
        "status": "already complete" if result.already_built else "built",
    }))
    rows = [("images read", images["read"]), ("images decoded", images["decoded"])]
    rows += [(f"  failed: {reason}", n) for reason, n in images["failed"].items()]
    if args.ignore_unmatched_annotations or "annotated_not_among_inputs" in images:
        rows.append(("annotated images not among the inputs", images.get("annotated_not_among_inputs", 0)))
    rows += [("boxes found", boxes["found"]), ("boxes kept", boxes["kept"])]
    rows += [(f"  dropped: {reason}", n) for reason, n in boxes["dropped"].items()]
    print(table(rows, ["stage", "count"]))
    print(table(list(result.stats["patches_per_concept"].items()), ["concept", "patches"]))
    if boxes["kept"] == 0:
        sys.stdout.flush()  # after the tables also when both streams go to one file (2>&1) and stdout is buffered
        print(f"cmcaug build-bank: warning: {empty_bank_warning(result.stats)}", file=sys.stderr)
    return 0
