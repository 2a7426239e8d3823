"""Benchmark the memory of caption tagging: peak RSS of `GroundingTagger.tag` (the CMC collate path) and of
`tag_corpus` (the `cmcaug tag-text` path), tagger mode, as captions grow from a sentence to 100 million
characters; each measurement runs in a fresh process.

    cmcaug bench tag_memory [--out DIR]           # writes tag-memory-<cpu>.json
    cmcaug bench tag_memory --smoke               # a row of each kind in one process: the code paths (tag-memory-smoke-<cpu>.json)
    python -m cmcaug.benchmarks.bench_tag_memory [--smoke] [--out DIR]   # the same as a module

Rows: 3 captions of N characters through `tag` (given as strings, made before the measurement starts) and
through `tag_corpus` (a `.txt.gz` file of 3 lines, then the same as a `.jsonl.gz`); 256 captions of
`DEFAULT_MAX_CHARS` characters (a full batch of the longest captions tagged by default, which `BATCH_CHARS`
splits into batches spaCy can hold); and one caption of 100,000 characters with `max_chars` raised to
tag it, for the cost of a character. `grown_mb` is the peak RSS while tagging over the RSS before it (the
tagger loaded and warmed up, the captions made). Numbers are reported, never asserted.
"""
from __future__ import annotations

import gzip
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from . import common

SENTENCE = "A brown dog chases a red frisbee past two cats asleep on a sofa. "


def caption(length: int) -> str:
    """`length` characters of plain sentences."""
    return (SENTENCE * (length // len(SENTENCE) + 1))[:length]


def _write(path: Path, length: int, count: int) -> None:
    """`count` captions of `length` characters into a gzip file, a line each (a JSON object a line for .jsonl.gz),
    written a piece at a time."""
    piece = caption(min(length, 1 << 24))
    with gzip.open(path, "wt", compresslevel=1) as f:
        for _ in range(count):
            f.write('{"caption": "' if path.name.endswith(".jsonl.gz") else "")
            for start in range(0, length, len(piece)):
                f.write(piece[:length - start])
            f.write('"}\n' if path.name.endswith(".jsonl.gz") else "\n")


def _reset_peak() -> None:
    """Make the peak RSS the RSS now (Linux: /proc/self/clear_refs), so that a peak of the set-up (making a
    100 MB caption) does not hide the one measured."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_mb() -> float:
    """The peak RSS since the last `_reset_peak` (Linux: VmHWM), in MB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:", 1)[1].split()[0]) / 1024


def _measure(path: str, length: int, count: int, max_chars: int | None) -> dict[str, Any]:
    """Runs in a fresh process: load and warm the tagger, then tag `count` captions of `length` characters
    with `GroundingTagger.tag` (path "tag") or from a file with `tag_corpus` (path ".txt.gz" or ".jsonl.gz")."""
    from cmcaug.text.grounding import DEFAULT_MAX_CHARS, GroundingTagger
    from cmcaug.text.tags import tag_corpus

    tagger = GroundingTagger(mode="tagger", max_chars=max_chars or DEFAULT_MAX_CHARS)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "warm.txt").write_text(SENTENCE + "\n")
        tag_corpus([folder / "warm.txt"], folder / "warm.parquet", tagger, progress=False)
        captions = [caption(length)] * count if path == "tag" else []
        if path != "tag":
            _write(folder / f"corpus{path}", length, count)
        _reset_peak()
        before, start = _peak_mb(), time.perf_counter()
        if path == "tag":
            tagged = sum(bool(spans) for spans in tagger.tag(captions))
        else:
            tagged = tag_corpus([folder / f"corpus{path}"], folder / "tags.parquet", tagger, progress=False)["grounded"]
        seconds = time.perf_counter() - start
    return {"path": "GroundingTagger.tag" if path == "tag" else f"tag_corpus {path}", "chars": length, "captions": count,
            "max_chars": tagger.max_chars, "tagged": tagged, "seconds": round(seconds, 3),
            "base_mb": round(before), "grown_mb": round(max(0.0, _peak_mb() - before))}


def _in_fresh_process(*args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure, *args).result()


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("bench_tag_memory", __doc__)
    parser.add_argument("--smoke", action="store_true", help="small sizes: checks the code path only")
    args = parser.parse_args(argv)
    from cmcaug.text.grounding import BATCH_CHARS, DEFAULT_MAX_CHARS

    if args.smoke:  # one process, a row of each kind: the code paths, not the numbers
        plan, run = [("tag", 20_000, 3, None), (".jsonl.gz", 20_000, 3, None), ("tag", 1_000, 4, 2_000)], _measure
    else:
        lengths = (100, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000)
        plan = [(path, n, 3, None) for path in ("tag", ".txt.gz", ".jsonl.gz") for n in lengths]
        plan += [("tag", DEFAULT_MAX_CHARS, 256, None), ("tag", 100_000, 1, 100_000)]
        run = _in_fresh_process
    rows = [run(*step) for step in plan]
    common.print_table(rows, ["path", "chars", "captions", "max_chars", "tagged", "seconds", "base_mb", "grown_mb"],
                       title="peak memory of tagging (tagger mode)")
    cpu = common.device_name("cpu")
    payload = {"benchmark": "tag_memory", "cpu": cpu, "python": sys.version.split()[0], "batch_chars": BATCH_CHARS,
               "default_max_chars": DEFAULT_MAX_CHARS, "cores_visible": len(os.sched_getaffinity(0)), "rows": rows,
               "smoke": args.smoke}
    common.write_results("tag-memory-smoke" if args.smoke else "tag-memory", payload, out=args.out, device=cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
