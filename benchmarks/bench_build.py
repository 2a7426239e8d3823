"""Benchmark the bank build pipeline and bank reads.

    cmcaug bench build [--out DIR] [-- --workers N]    # writes build-<cpu>.json
    cmcaug bench build --smoke                        # tiny sizes: checks the code path (build-smoke-<cpu>.json)
    python -m cmcaug.benchmarks.bench_build [--smoke] [--out DIR]   # the same as a module

1. Build throughput on a shapes-world corpus, for COCO annotations and for a YOLO yaml model (random
   weights, conf 0 and a `max_det` cap so every image yields boxes to crop and embed): images/s of the
   whole `build_bank` (list, decode pool, detect, crop, embed, shards, finalize with the FAISS index)
   against the detector alone on the same pre-decoded images. `overhead` = 1 - build/detector rate:
   the share of build time spent outside the detector (for annotations, whose "detector" is a lookup,
   compare with decoding instead: `build_vs_decode`). `loop_img_s` counts the per-batch loop only
   (decode, detect, crop, embed, shard commit), without set-up and finalize. Decode-only images/s is
   shown for context.
2. Bank reads on a synthetic bank of >= 100k patches (random pixels, written with `write_bank`):
   `bank.sample` draws/s and `bank.pixels` MB/s (bytes of patches returned) for several batch sizes,
   random ids, warm page cache.

Rates are the best of 3 runs (after a warm-up), as the build machines are shared.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cmcaug.bank.reader import PatchBank
from cmcaug.bank.writer import write_bank
from cmcaug.builder.detect import AnnotationDetector, Detector, UltralyticsDetector
from cmcaug.builder.images import decode_stream, list_images
from cmcaug.builder.pipeline import build_bank
from cmcaug.concepts import ConceptVocab
from cmcaug.synth import make_corpus

from . import common

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")


REPEATS = 3  # best of: the machine is shared, so the fastest run is the least disturbed one


def best_rate(fn: Callable[[], Any], items: int) -> float:
    """Items/s of the fastest of `REPEATS` calls of `fn`."""
    return items / min(common.wall_times(fn, REPEATS))


def bench_pipeline(root: Path, work: Path, name: str, detector: Detector, n: int, batch_size: int, workers: int, **build_kwargs: Any) -> dict:
    refs = list_images([root / "images"])[:n]
    keys = [r.key for r in refs]
    decode_rate = best_rate(lambda: list(decode_stream(refs, workers=workers)), n)
    decoded = [d.pixels for d in decode_stream(refs, workers=workers)]
    detector.detect(decoded[:batch_size], keys[:batch_size])  # warm-up: model set-up
    det_rate = best_rate(lambda: [detector.detect(decoded[i:i + batch_size], keys[i:i + batch_size])
                                  for i in range(0, n, batch_size)], n)
    inputs = work / f"{name}-list.txt"
    inputs.write_text("\n".join(r.path for r in refs) + "\n")
    runs = [build_bank([inputs], work / f"{name}-bank", detector=detector, batch_size=batch_size, workers=workers,
                       overwrite=True, progress=False, **build_kwargs) for _ in range(REPEATS + 1)][1:]  # first: warm-up
    build_rate = n / min(r.seconds for r in runs)
    return {
        "detector": name, "images": n, "batch_size": batch_size, "workers": workers,
        "patches": runs[0].stats["boxes"]["kept"], "decode_img_s": decode_rate, "detector_img_s": det_rate,
        "build_img_s": build_rate, "loop_img_s": max(r.images_per_s for r in runs), "build_s": min(r.seconds for r in runs),
        "overhead": 1 - build_rate / det_rate, "build_vs_decode": build_rate / decode_rate,
    }


def synthetic_bank(path: Path, n: int, patch: int, dim: int, concepts: int, seed: int = 0) -> PatchBank:
    """A bank of `n` random patches spread unevenly over `concepts` concepts, written by `write_bank`."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    concept = np.minimum(rng.zipf(1.3, n) - 1, concepts - 1).astype(np.int32)
    pixels = np.lib.format.open_memmap(path.parent / "pixels-src.npy", "w+", np.uint8, (n, patch, patch, 3))
    for i in range(0, n, 8192):
        pixels[i:i + 8192] = rng.integers(0, 256, pixels[i:i + 8192].shape, dtype=np.uint8)
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    box = np.tile(np.float32([0, 0, 32, 32]), (n, 1))
    patches = pa.table({
        "concept_id": concept, "image": pa.array([f"img{i // 4:07d}.jpg" for i in range(n)]),
        "box": pa.FixedSizeListArray.from_arrays(pa.array(box.ravel()), 4), "score": np.ones(n, np.float32),
    })
    vocab = ConceptVocab({f"c{i}": [] for i in range(concepts)})
    write_bank(path, vocab=vocab, patches=patches, pixels=pixels, embeddings=emb, provenance={"synthetic": True}, stats={})
    del pixels
    (path.parent / "pixels-src.npy").unlink()
    return PatchBank.open(path, validate=False)


def bench_reads(bank: PatchBank, sample_sizes: list[int], pixel_sizes: list[int], seed: int = 0) -> list[dict]:
    import torch

    rows = []
    rng = np.random.default_rng(seed)
    present = np.flatnonzero(bank.counts > 0)
    for size in sample_sizes:
        concepts = rng.choice(present, size)
        gen = torch.Generator().manual_seed(seed)
        ms = common.cpu_time_ms(lambda: bank.sample(concepts, generator=gen))
        rows.append({"op": "sample", "batch": size, "ms": ms, "per_s": size / ms * 1e3})
    patch_bytes = bank.patch_size**2 * 3
    for size in pixel_sizes:
        ids = rng.integers(0, len(bank), size)
        ms = common.cpu_time_ms(lambda: bank.pixels(ids))
        rows.append({"op": "pixels", "batch": size, "ms": ms, "per_s": size / ms * 1e3, "mb_s": size * patch_bytes / ms / 1e3})
    size = max(pixel_sizes)
    concepts = rng.choice(present, size)
    ms = common.cpu_time_ms(lambda: bank.pixels(bank.sample(concepts, generator=gen)))
    rows.append({"op": "sample+pixels", "batch": size, "ms": ms, "per_s": size / ms * 1e3, "mb_s": size * patch_bytes / ms / 1e3})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("bench_build", __doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code path only")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode threads")
    args = parser.parse_args(argv)
    n_ann, n_yolo, n_bank = (16, 8, 2_000) if args.smoke else (400, 96, 120_000)
    cpu = common.device_name("cpu")
    with tempfile.TemporaryDirectory(prefix="cmcaug-bench-build-") as tmp:
        work = Path(tmp)
        root = make_corpus(work / "corpus", n_ann, seed=0, image_size=256).root
        vocab = str(root / "vocab.json")
        pipeline = [bench_pipeline(root, work, "annotations", AnnotationDetector(root / "annotations.json"), n_ann, 16,
                                   args.workers, vocab=vocab)]
        yolo = UltralyticsDetector("yolov8n.yaml", conf=0.0, imgsz=320, max_det=10, batch_size=16)
        pipeline.append(bench_pipeline(root, work, "yolov8n.yaml", yolo, n_yolo, 16, args.workers, conf=0.0))
        common.print_table(pipeline, ["detector", "images", "patches", "decode_img_s", "detector_img_s", "build_img_s", "loop_img_s", "overhead",
                                      "build_vs_decode"],
                           title=f"build-bank throughput ({cpu}, {args.workers} decode workers)")
        start = time.perf_counter()
        bank = synthetic_bank(work / "bank", n_bank, 64, 256, 80)
        write_s = time.perf_counter() - start
        reads = bench_reads(bank, [256, 4096, 65536], [64, 256, 1024, 4096])
        common.print_table(reads, ["op", "batch", "ms", "per_s", "mb_s"],
                           title=f"bank reads: {len(bank):,} patches of 64x64 (write_bank took {write_s:.1f} s)")
    common.write_results("build-smoke" if args.smoke else "build", {
        "device": cpu, "cpu_count": os.cpu_count(), "workers": args.workers, "pipeline": pipeline,
        "bank": {"patches": n_bank, "patch_size": 64, "embedding_dim": 256, "concepts": 80, "write_s": write_s},
        "reads": reads,
    }, out=args.out, device=cpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
