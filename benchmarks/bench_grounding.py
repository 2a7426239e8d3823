"""Benchmark caption grounding: captions/s per process in both modes, with 1 and 2 processes, and the
precision/recall of both modes on the labelled evaluation set (cmcaug/data/grounding_eval.jsonl).

    cmcaug bench grounding [--out DIR] [-- --captions N]   # writes grounding-<cpu>.json
    cmcaug bench grounding --smoke                        # tiny sizes: checks the code path (grounding-smoke-<cpu>.json)
    python -m cmcaug.benchmarks.bench_grounding [--smoke] [--out DIR]   # the same as a module

Captions are short COCO-style sentences drawn from a seeded grammar (about 11 words; most name one to
three COCO objects). Every single-process measurement runs in a fresh spawned process with one BLAS
thread, so "per process" means "per core"; `n_process=2` is measured from a warm pool (worker start-up,
about a second per worker to load spaCy, is reported apart). Rates are the best of several runs (the
build machines are shared; the fastest run is the least disturbed one), medians are kept alongside.
The `pipeline` rows time spaCy alone (tok2vec + tagger, no matching) with thinc's default blis matrix
products and with numpy's BLAS, the choice `GroundingTagger` makes; `matching only` rows time the rest,
finding the forms in Docs already made; `tag_corpus` rows time the whole `cmcaug tag-text` path (Parquet
in, Parquet out).
"""
from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from . import common  # imports torch only inside its functions: main sets the thread variables first

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

_SUBJECTS = ("man", "woman", "young boy", "little girl", "group of people", "dog", "cat", "brown horse", "giraffe",
             "zebra", "elephant", "skier", "surfer", "person", "baseball player", "couple", "chef", "child")
_VERBS = ("riding", "holding", "sitting on", "standing next to", "walking past", "looking at", "eating", "carrying",
          "playing with", "leaning against", "parked near", "lying on", "throwing", "pulling")
_OBJECTS = ("bike", "surfboard", "red frisbee", "skateboard", "large pizza", "laptop", "umbrella", "teddy bear",
            "hot dog", "wooden bench", "white truck", "city bus", "kite", "cell phone", "tennis racket", "bowl of soup",
            "stop sign", "traffic light", "fire hydrant", "couch", "suitcase", "backpack", "cake", "book", "vase")
_PLACES = ("in a park", "on a busy street", "at the beach", "in the kitchen", "on a snowy hill", "in a field",
           "next to a building", "in the living room", "on the sidewalk", "under a tree", "near the water", "")
_ARTICLES = ("A", "The", "Two", "A small", "An old", "Three")


def make_captions(n: int, seed: int = 0) -> list[str]:
    """`n` short captions from a seeded grammar (deterministic)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    out = []
    for _ in range(n):
        place = pick(_PLACES)
        out.append(f"{pick(_ARTICLES)} {pick(_SUBJECTS)} {pick(_VERBS)} a {pick(_OBJECTS)}{' ' + place if place else ''}.")
    return out


def _rates(fn: Callable[[], Any], items: int, repeats: int) -> dict[str, float]:
    times = common.wall_times(fn, repeats, warmup=True)  # warm-up: caches, first-call allocations
    return {"best": items / min(times), "median": items / statistics.median(times)}


def _measure_tagger(mode: str, captions: list[str], repeats: int, batch_size: int) -> dict[str, Any]:
    """Runs in a fresh process: load time and captions/s of `GroundingTagger.tag`."""
    from cmcaug.text.grounding import GroundingTagger

    start = time.perf_counter()
    tagger = GroundingTagger(mode=mode, batch_size=batch_size)
    load_s = time.perf_counter() - start
    return {"load_s": load_s, **_rates(lambda: tagger.tag(captions), len(captions), repeats)}


def _measure_matching(mode: str, captions: list[str], repeats: int, batch_size: int) -> dict[str, Any]:
    """Runs in a fresh process: finding the vocabulary's forms in Docs spaCy has already made (the part of
    `tag` that is cmcaug's own)."""
    from cmcaug.text._clean import clean_text
    from cmcaug.text.grounding import GroundingTagger

    tagger = GroundingTagger(mode=mode, batch_size=batch_size)
    texts = [clean_text(c)[0] for c in captions]
    docs = list(zip(tagger.nlp.pipe(texts, batch_size=batch_size), [t.isascii() for t in texts]))
    return _rates(lambda: [tagger._matcher.find(doc, ascii_text, tagger._accept) for doc, ascii_text in docs],
                  len(captions), repeats)


def _measure_pipeline(blis: bool, captions: list[str], repeats: int, batch_size: int) -> dict[str, Any]:
    """Runs in a fresh process: spaCy's tok2vec + tagger alone, with blis or numpy's BLAS."""
    import spacy
    from thinc.api import use_ops

    from cmcaug.text.grounding import _FALLBACK_MODELS

    exclude = ["parser", "ner", "senter", "attribute_ruler", "lemmatizer"]
    for name in _FALLBACK_MODELS["en_core_web_sm"]:
        try:
            with use_ops("numpy", use_blis=blis):
                nlp = spacy.load(name, exclude=exclude)
            break
        except OSError:
            continue
    return _rates(lambda: list(nlp.pipe(captions, batch_size=batch_size)), len(captions), repeats)


def _measure_corpus(mode: str, captions: list[str], repeats: int, batch_size: int) -> dict[str, Any]:
    """Runs in a fresh process: `tag_corpus` from a Parquet file to a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cmcaug.text.grounding import GroundingTagger
    from cmcaug.text.tags import tag_corpus

    tagger = GroundingTagger(mode=mode, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "captions.parquet"
        pq.write_table(pa.table({"caption": captions}), source)
        return _rates(lambda: tag_corpus([source], Path(tmp) / "tags.parquet", tagger, progress=False), len(captions), repeats)


def _in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def measure_parallel(mode: str, captions: list[str], repeats: int, batch_size: int, n_process: int) -> dict[str, Any]:
    from cmcaug.text.grounding import GroundingTagger

    with GroundingTagger(mode=mode, batch_size=batch_size, n_process=n_process) as tagger:
        start = time.perf_counter()
        tagger.tag(captions[: batch_size * 4 * n_process])  # starts the workers
        startup_s = time.perf_counter() - start
        return {"startup_s": startup_s, **_rates(lambda: tagger.tag(captions), len(captions), repeats)}


def evaluate(mode: str) -> dict[str, Any]:
    """Micro precision/recall (exact offsets and concept) overall, per split and per category."""
    from cmcaug.text.grounding import GroundingTagger

    rows = common.grounding_eval_set()
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for row, found in zip(rows, GroundingTagger(mode=mode).tag([r["caption"] for r in rows])):
        gold = {(s["start"], s["end"], s["concept"]) for s in row["spans"]}
        got = {(s.start, s.end, s.concept) for s in found}
        for key in ("all", f"split:{row['split']}", f"category:{row['category']}"):
            c = counts[key]
            c[0], c[1], c[2] = c[0] + len(gold & got), c[1] + len(got - gold), c[2] + len(gold - got)
    out = {}
    for key, (tp, fp, fn) in sorted(counts.items()):
        out[key] = {"precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
                    "recall": round(tp / (tp + fn), 4) if tp + fn else 1.0, "tp": tp, "fp": fp, "fn": fn}
    out["all"]["captions"] = len(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser("bench_grounding", __doc__)
    parser.add_argument("--captions", type=int, default=20_000, help="captions per timed run (default 20000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is reported")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code path only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.captions, args.repeats = 300, 1
    for var in THREAD_VARS:  # inherited by every spawned process: one BLAS thread each, i.e. one core each
        os.environ[var] = "1"

    captions = make_captions(args.captions)
    words = sum(len(c.split()) for c in captions) / len(captions)
    load_before = os.getloadavg()
    rows = []
    for mode in ("lookup", "tagger"):
        single = _in_fresh_process(_measure_tagger, mode, captions, args.repeats, args.batch_size)
        rows.append({"what": "GroundingTagger.tag", "mode": mode, "n_process": 1, **single})
        pair = measure_parallel(mode, captions, args.repeats, args.batch_size, 2)
        rows.append({"what": "GroundingTagger.tag", "mode": mode, "n_process": 2, **pair})
        corpus = _in_fresh_process(_measure_corpus, mode, captions, args.repeats, args.batch_size)
        rows.append({"what": "tag_corpus parquet", "mode": mode, "n_process": 1, **corpus})
        matching = _in_fresh_process(_measure_matching, mode, captions, args.repeats, args.batch_size)
        rows.append({"what": "matching only (parsed Docs)", "mode": mode, "n_process": 1, **matching})
    for blis in (True, False):
        pipe = _in_fresh_process(_measure_pipeline, blis, captions, args.repeats, args.batch_size)
        what = f"spaCy pipeline only ({'blis' if blis else 'numpy BLAS'})"
        rows.append({"what": what, "mode": "tagger", "n_process": 1, **pipe})
    for row in rows:
        row["per_process_best"] = row["best"] / row["n_process"]
    quality = {mode: evaluate(mode) for mode in ("tagger", "lookup")}

    common.print_table(rows, ["what", "mode", "n_process", "best", "median", "per_process_best"], title="captions/s")
    prs = [{"mode": m, "set": k, **{x: v[x] for x in ("precision", "recall", "tp", "fp", "fn")}}
           for m, q in quality.items() for k, v in q.items() if not k.startswith("category")]
    common.print_table(prs, ["mode", "set", "precision", "recall", "tp", "fp", "fn"], title="evaluation set")
    cpu = common.device_name("cpu")
    payload = {
        "benchmark": "grounding", "cpu": cpu, "cores_visible": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0], "blas_threads_per_process": 1,
        "load_average_before_after": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        "captions": len(captions), "mean_words_per_caption": round(words, 2), "batch_size": args.batch_size,
        "repeats": args.repeats, "targets_per_core": {"tagger": 3000, "lookup": 20000},
        "throughput": rows, "evaluation": quality, "smoke": args.smoke,
    }
    common.write_results("grounding-smoke" if args.smoke else "grounding", payload, out=args.out, device=cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
