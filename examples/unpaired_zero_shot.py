"""Does cross-modal CutMix align modalities from unpaired data? Zero-shot patch classification, with and without CMC.

    python examples/unpaired_zero_shot.py      # 4 arms x 3 seeds x 2500 steps, 2 runs at a time: ~10 min on 2 cores
    python examples/unpaired_zero_shot.py --steps 4000 --seeds 0 1 2 3 4 --arms cmc cmc-all text-only --jobs 4

VLMixer (Wang et al., ICML 2022) claims that CMC teaches a model cross-modal alignment from unpaired text and
images. Each arm trains `train_bert_cmc.py`'s tiny BERT and patch encoder from the same seeds for the same
steps, then scores it with `train_bert_cmc.zero_shot_accuracy`: every patch of one held-out shapes-world
corpus (`--eval-seed`, images never seen in training) is classified by the concept name nearest to it.

Arms (the first four run by default):

- `cmc`: `--ratio 0.5`, the example as shipped: MLM on the CMC view + InfoNCE between text view and CMC view.
  Patches come from the bank by concept, never from the caption's own image: no image-caption pairing.
- `text-only`: `--ratio 0`, the floor: no patch ever enters training (MLM + InfoNCE between two identical
  text views), which is what the same recipe learns with no image data at all.
- `cmc-coded`: `cmc` on colour-coded captions (`--coded-colors`, see `shapes_world.code_colors`): every star
  is "yellow" in the text, so a caption's context says which shape it names, as natural captions' context
  does; in the shipped world nothing but the shape's own word does. Patches still come from the bank by
  concept, in their own random colours: still no pairing.
- `labelled`: the ceiling, not an unpaired method: the same model trained on (patch, concept name) pairs of
  the training bank, with the evaluation's own decision rule as its loss. It shows the evaluation can be passed.
- `cmc-all` (`--ratio 1.0`, every grounded word replaced) and `text-only-coded`, on request.

Prints one table row per run (final losses are the mean of the last 10 steps) and a summary per arm (mean and
standard deviation over seeds), and writes every row, per-concept accuracies included, to
`unpaired-zero-shot-<cpu>.json` in `--out`. Runs are reproducible: a seed fixes the corpus, the views, the
initialization and the batches, and every run uses one thread, so `--jobs` does not change a result.
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import train_bert_cmc as bert  # next to this file
from cmcaug.benchmarks.common import argument_parser, device_name, print_table, write_results
from cmcaug.losses import contrastive_logits
from shapes_world import shapes_world

# arm -> the example's options (None: the labelled ceiling, not the example)
ARMS = {
    "cmc": ["--ratio", "0.5"],
    "text-only": ["--ratio", "0"],
    "cmc-coded": ["--ratio", "0.5", "--coded-colors"],
    "labelled": None,
    "cmc-all": ["--ratio", "1.0"],
    "text-only-coded": ["--ratio", "0", "--coded-colors"],
}
DEFAULT_ARMS = ["cmc", "text-only", "cmc-coded", "labelled"]
LOSSES = ("mlm", "contrastive", "labelled")


def labelled_run(args: Any, seed: int) -> dict:
    """The ceiling arm: the example's model trained on (patch, concept name) pairs, then evaluated the same way."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="cmcaug-labelled-") as tmp:
        bank, rows = shapes_world(Path(tmp), args.images, seed)
        tokenizer = bert.wordpiece_tokenizer([r["caption"] for r in rows])
        model, patch_encoder = bert.build_model(len(tokenizer))
        optimizer = torch.optim.AdamW([*model.parameters(), *patch_encoder.parameters()], lr=args.lr)
        generator, names, history = torch.Generator().manual_seed(seed), bank.vocab.names, []
        for _ in range(args.steps):
            concepts = torch.randint(len(names), (args.batch_size,), generator=generator)
            pixels = bank.pixels(bank.sample(concepts, generator=generator))
            logits = contrastive_logits(bert.encode_patches(model, patch_encoder, tokenizer, pixels),
                                        bert.encode_names(model, tokenizer, names), args.temperature)
            loss = F.cross_entropy(logits, concepts)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append({"labelled": round(loss.item(), 4)})
        heldout, _ = shapes_world(Path(tmp) / "heldout", args.eval_images, args.eval_seed)
        return {"history": history, "zero_shot": bert.zero_shot_accuracy(model, patch_encoder, tokenizer, heldout)}


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread (float sums then do not depend on the core count), restoring the count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(arm: str, seed: int, args: Any) -> dict:
    """One arm from one seed: a table row, with the per-concept accuracies and predictions beside it."""
    start = time.perf_counter()
    with one_thread(), contextlib.redirect_stdout(io.StringIO()):  # the example's per-step log
        if ARMS[arm] is None:
            result = labelled_run(args, seed)
        else:
            result = bert.main([*ARMS[arm], "--seed", str(seed), "--steps", str(args.steps),
                                "--batch-size", str(args.batch_size), "--images", str(args.images),
                                "--lr", str(args.lr), "--temperature", str(args.temperature),
                                "--eval-images", str(args.eval_images), "--eval-seed", str(args.eval_seed)])
    zero_shot, tail = result["zero_shot"], result["history"][-10:]
    losses = {k: round(statistics.fmean(h[k] for h in tail), 4) for k in LOSSES if k in tail[0]}
    return {"arm": arm, "seed": seed, **{k: zero_shot[k] for k in ("accuracy", "chance", "majority", "patches")},
            **losses, "seconds": round(time.perf_counter() - start, 1),
            "per_concept": zero_shot["per_concept"], "predicted": zero_shot["predicted"]}


def run_all(args: Any) -> list[dict]:
    """Every (arm, seed) run, `args.jobs` at a time in separate processes; each is reported as it comes in."""
    tasks = [(arm, seed) for seed in args.seeds for arm in args.arms]
    if args.jobs == 1:
        return [_reported(run(arm, seed, args)) for arm, seed in tasks]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run, arm, seed, args) for arm, seed in tasks]
        return [_reported(f.result()) for f in futures]


def _reported(row: dict) -> dict:
    print(f"{row['arm']} seed {row['seed']}: zero-shot accuracy {row['accuracy']:.3f} ({row['seconds']} s)", flush=True)
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation of the accuracy over seeds, per arm."""
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        acc = [r["accuracy"] for r in rows if r["arm"] == arm]
        first = next(r for r in rows if r["arm"] == arm)
        out.append({"arm": arm, "runs": len(acc), "mean": round(statistics.fmean(acc), 4),
                    "std": round(statistics.stdev(acc), 4) if len(acc) > 1 else 0.0,
                    "min": min(acc), "max": max(acc), "chance": first["chance"], "majority": first["majority"]})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser("unpaired_zero_shot", __doc__)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2500, help="training steps of every run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=240, help="training corpus size (images = captions)")
    parser.add_argument("--eval-images", type=int, default=120, help="held-out corpus size")
    parser.add_argument("--eval-seed", type=int, default=1000, help="seed of the held-out corpus (not a training seed)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one process and one thread each")
    args = parser.parse_args(argv)
    if args.eval_seed in args.seeds:
        parser.error(f"--eval-seed {args.eval_seed} is also a training seed: the held-out corpus would be trained on")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    start = time.perf_counter()
    rows = run_all(args)
    wall = round(time.perf_counter() - start, 1)
    print_table(rows, ["arm", "seed", "accuracy", "chance", "majority", *LOSSES, "seconds"],
                f"zero-shot patch classification on {rows[0]['patches']} held-out patches, {args.steps} steps per run")
    summary = summarize(rows)
    print_table(summary, ["arm", "runs", "mean", "std", "min", "max", "chance", "majority"], "per arm, over seeds")
    print(f"\nwall time {wall} s")
    payload = {"device": device_name("cpu"), "torch": torch.__version__, "threads_per_run": 1,
               "config": {k: v for k, v in vars(args).items() if k != "out"}, "wall_seconds": wall,
               "summary": summary, "rows": rows}
    write_results("unpaired-zero-shot", payload, out=args.out, device=device_name("cpu"))
    return payload


if __name__ == "__main__":
    main()
