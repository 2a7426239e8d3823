"""Mini-replication of VLMixer (ICML 2022): does cross-modal CutMix align modalities from unpaired data?

    python examples/replicate_vlmixer.py --out benchmarks/results     # the default size: ~15 min on 2 CPU cores

Question: pre-trained on unpaired captions and an image-only patch bank (no image is ever paired with a
caption), does the model learn that a patch of a star and the word "star" mean the same thing, and does
that pre-training help image-text retrieval when only a few pairs are labelled?

Arms (same seeds, corpus, steps, model and optimizer; only the objective differs):

- `text-only`: `--ratio 0`, no patch ever enters pre-training: the floor.
- `cmc`: the recipe as shipped before, MLM labels on text rows only, text-view / CMC-view InfoNCE with
  in-batch negatives, dropout on in both views.
- `cmc+targets`: a patch slot predicts the word it replaced (`patch_targets="word"`).
- `cmc+negatives`: one hard patch negative per view (the view with another concept's patches), contrast
  passes without dropout.
- `recipe`: both, contrast passes without dropout: `VLMixerObjective`'s defaults.
- `recipe+dropout` (on request): the recipe with dropout kept in the contrast passes (why it is off);
  `recipe-no-dropout`: no dropout anywhere (MLM included); `recipe+masked-targets`: a patch slot is a
  target with the MLM probability and then mostly hidden behind [MASK] (`patch_targets="masked"`).
- `labelled`: the ceiling, not an unpaired method: the same model trained on (patch, concept name) pairs
  with the zero-shot readout's own decision rule as its loss.
- `scratch`: no pre-training; only the retrieval fine-tuning below (its baseline).
- `*@context` (on request): the arm on captions whose context words say which shape they name
  (`cmcaug synth --context`), to show how much the result depends on context.

Evaluation (`vlmixer_eval.py`) on a held-out shapes world (`--eval-seed`, never trained on and never used to
choose anything): (1) zero-shot patch classification through the `[CLS]` readout and through in-context
retrieval, chance 1/8 (one over the concepts); (2) the paper's protocol in miniature: fine-tune each
pre-trained model on 5% and 20% of the training pairs for image-text retrieval, report R@1 / R@5 (mean of
both directions) on the held-out pairs, against the same fine-tuning from scratch. Every hyper-parameter
(steps, ratio, temperature, learning rates, fine-tuning budget) was fixed before the held-out numbers were
seen; diagnoses of a failing arm read a validation world (`--eval-seed 2000`), never this one.

Our choices (VLMixer leaves them open): a two-layer BERT of width 64 and a small CNN patch encoder, one token
per patch; ratio 0.5; patch-slot targets; one hard negative; an image in retrieval is the sequence of its
detected objects' patches (VLMixer feeds a ViT's patches). Writes JSON, a markdown table and a plot to --out.
Runs are reproducible: a seed fixes the corpus, the views, the initialization and the batches; each run uses
one thread, so `--jobs` does not change a result.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
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
import vlmixer_eval as evaluation
from cmcaug import PatchBank
from cmcaug.benchmarks.common import argument_parser, device_name, one_thread, print_table, write_results
from cmcaug.losses import contrastive_logits
from shapes_world import shapes_world

CONTEXT = 0.5  # share of object phrases with a context word in the `@context` arms
RECIPE = {"ratio": 0.5, "patch_targets": "word", "negatives": 1, "contrast_dropout": False}
ARMS: dict[str, dict[str, Any] | None] = {
    "text-only": {**RECIPE, "ratio": 0.0, "patch_targets": "none", "negatives": 0, "contrast_dropout": True},
    "cmc": {**RECIPE, "patch_targets": "none", "negatives": 0, "contrast_dropout": True},
    "cmc+targets": {**RECIPE, "negatives": 0},
    "cmc+negatives": {**RECIPE, "patch_targets": "none"},
    "recipe": RECIPE,
    "recipe+dropout": {**RECIPE, "contrast_dropout": True},
    "recipe-no-dropout": {**RECIPE, "dropout": 0.0},
    "recipe+masked-targets": {**RECIPE, "patch_targets": "masked"},
    "labelled": None,
    "scratch": None,
}
ARMS.update({f"{arm}@context": ARMS[arm] for arm in ("text-only", "cmc", "recipe")})
DEFAULT_ARMS = ["text-only", "cmc", "cmc+targets", "cmc+negatives", "recipe", "labelled", "scratch"]
READOUTS = ("zero_shot", "in_context")


def metrics_of(fractions: list[float]) -> list[str]:
    """The readouts, then R@1 / R@5 after fine-tuning on each share of the pairs."""
    return [*READOUTS, *(f"r{k}@{f:.0%}" for f in fractions for k in (1, 5))]


def world(root: Path, arm: str, seed: int, args: argparse.Namespace) -> tuple[Path, Path]:
    """Folders of the training world (`seed`) and the held-out world of an arm (built once, then reused)."""
    context = CONTEXT if arm.endswith("@context") else 0.0
    return root / f"train-{seed}-{context}", root / f"heldout-{args.eval_seed}-{context}"


def build_world(path: Path, images: int, seed: int, context: float) -> None:
    """A shapes world and its tagged caption rows (`rows.json`), built once and read by every run."""
    with one_thread(), contextlib.redirect_stdout(io.StringIO()):
        _, rows = shapes_world(path, images, seed, context)
    (path / "rows.json").write_text(json.dumps(rows))


def labelled(objective, bank: PatchBank, args: argparse.Namespace, seed: int) -> list[dict]:
    """The ceiling: (patch, concept name) pairs of the training bank, the zero-shot rule as the loss."""
    optimizer = torch.optim.AdamW(objective.parameters(), lr=args.lr)
    generator, names, history = torch.Generator().manual_seed(seed), list(bank.vocab.names), []
    for _ in range(args.steps):
        concepts = torch.randint(len(names), (args.batch_size,), generator=generator)
        patches = objective.encode_patches(bank.pixels(bank.sample(concepts, generator=generator))).pooled
        logits = contrastive_logits(patches, evaluation.encode_captions(objective, names), args.temperature)
        loss = F.cross_entropy(logits, concepts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"loss": round(loss.item(), 4)})
    return history


def run(arm: str, seed: int, args: argparse.Namespace, root: Path) -> dict:
    """Pre-train one arm from one seed, then every readout; a table row."""
    start = time.perf_counter()
    train_path, test_path = world(root, arm, seed, args)
    train, test = ((PatchBank.open(p / "bank"), json.loads((p / "rows.json").read_text())) for p in (train_path, test_path))
    options = ARMS[arm] or {**RECIPE, "ratio": 0.0}
    pretrained = ARMS[arm] is not None
    recipe = argparse.Namespace(**{**vars(args), "dropout": 0.1, **options, "seed": seed, "num_workers": 0,
                                   "steps": args.steps if pretrained else 0})
    with one_thread(), contextlib.redirect_stdout(io.StringIO()):
        objective, history = bert.pretrain(recipe, *train, log_every=0)
        if arm == "labelled":
            history = labelled(objective, train[0], args, seed)
        zero_shot = evaluation.zero_shot_accuracy(objective, test[0])
        row = {"arm": arm, "seed": seed, "zero_shot": zero_shot["accuracy"], "chance": zero_shot["chance"],
               "in_context": evaluation.in_context_accuracy(objective, *test, seed=args.eval_seed)["accuracy"]}
        for fraction in args.fractions:
            result = evaluation.retrieval(objective, train, test, fraction, steps=args.ft_steps, batch_size=args.batch_size,
                                          lr=args.ft_lr, temperature=args.temperature, seed=seed)
            row.update({f"r1@{fraction:.0%}": result["r1"], f"r5@{fraction:.0%}": result["r5"],
                        "test_pairs": result["test_pairs"]})
    tail = history[-10:]
    row.update({k: round(statistics.fmean(h[k] for h in tail), 4) for k in (tail[0] if tail else {})})
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def run_all(args: argparse.Namespace, root: Path) -> list[dict]:
    """Build every world, then every (arm, seed) run, `args.jobs` at a time; each is reported as it comes in."""
    worlds = {}
    for arm in args.arms:
        for seed in args.seeds:
            train_path, test_path = world(root, arm, seed, args)
            context = CONTEXT if arm.endswith("@context") else 0.0
            worlds[train_path] = (args.images, seed, context)
            worlds[test_path] = (args.eval_images, args.eval_seed, context)
    tasks = [(arm, seed) for seed in args.seeds for arm in args.arms]
    if args.jobs == 1:
        for path, spec in worlds.items():
            build_world(path, *spec)
        return [_reported(run(arm, seed, args, root)) for arm, seed in tasks]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(build_world, path, *spec) for path, spec in worlds.items()]:
            future.result()
        print(f"built {len(worlds)} shapes worlds", flush=True)
        futures = [pool.submit(run, arm, seed, args, root) for arm, seed in tasks]
        return [_reported(f.result()) for f in futures]


def _reported(row: dict) -> dict:
    shown = [m for m in row if m in READOUTS or m.startswith(("r1@", "r5@"))]
    print(f"{row['arm']} seed {row['seed']}: " + "  ".join(f"{m} {row[m]:.3f}" for m in shown)
          + f"  ({row['seconds']} s)", flush=True)
    return row


def summarize(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Mean and standard deviation over seeds of every metric, per arm."""
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        entry: dict[str, Any] = {"arm": arm, "runs": len(mine)}
        for m in metrics:
            values = [r[m] for r in mine]
            entry[m] = round(statistics.fmean(values), 4)
            entry[f"{m}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def markdown(summary: list[dict], metrics: list[str], chance: dict[str, float], steps: int) -> str:
    """The summary as a markdown table, mean ± std over seeds, chance in the last row."""
    lines = [f"| arm ({steps} pre-training steps) | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for s in summary:
        lines.append(f"| {s['arm']} | " + " | ".join(f"{s[m]:.3f} ± {s[m + '_std']:.3f}" for m in metrics) + " |")
    lines.append("| chance | " + " | ".join(f"{chance[m]:.3f}" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], metrics: list[str], chance: dict[str, float], path: Path) -> None:
    """Grouped bars: one group per metric, one bar per arm (mean ± std over seeds), chance as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(metrics)), 4.5))
    width = 0.8 / len(summary)
    for i, s in enumerate(summary):
        xs = [j + (i - (len(summary) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, [s[m] for m in metrics], width, yerr=[s[m + "_std"] for m in metrics], label=s["arm"], capsize=2)
    for j, m in enumerate(metrics):
        ax.hlines(chance[m], j - 0.45, j + 0.45, colors="black", linestyles="dotted")
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy / recall (held-out)")
    ax.set_title("VLMixer mini-replication: zero-shot readouts and few-pair retrieval (dotted: chance)")
    ax.legend(fontsize=8, ncol=min(len(summary), 5), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argument_parser("replicate_vlmixer", __doc__)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000, help="pre-training steps of every run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=2000, help="training corpus size (images = captions)")
    parser.add_argument("--eval-images", type=int, default=120, help="held-out corpus size")
    parser.add_argument("--eval-seed", type=int, default=1000, help="seed of the held-out corpus (not a training seed)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.05, 0.2],
                        help="shares of pairs to fine-tune on (none: skip retrieval)")
    parser.add_argument("--ft-steps", type=int, default=100, help="retrieval fine-tuning steps")
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one process and one thread each")
    parser.add_argument("--name", default="vlmixer-replication", help="results file stem (<name>-<device>.json/.md/.png)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the harness (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.images, args.eval_images, args.ft_steps, args.batch_size = 3, 24, 12, 2, 8
    if args.eval_seed in args.seeds:
        parser.error(f"--eval-seed {args.eval_seed} is also a training seed: the held-out corpus would be trained on")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cmcaug-vlmixer-") as tmp:
        rows = run_all(args, Path(tmp))
    wall = round(time.perf_counter() - start, 1)
    metrics = metrics_of(args.fractions)
    print_table(rows, ["arm", "seed", *metrics, "seconds"], f"held-out readouts, {args.steps} pre-training steps per run")
    summary = summarize(rows, metrics)
    print_table(summary, ["arm", "runs", *metrics], "per arm, mean over seeds")
    chance = {m: (rows[0]["chance"] if m in READOUTS else int(m[1]) / rows[0]["test_pairs"]) for m in metrics}
    print(f"\nwall time {wall} s")
    device = device_name("cpu")
    payload = {"device": device, "torch": torch.__version__, "threads_per_run": 1, "wall_seconds": wall,
               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
               "chance": chance, "summary": summary, "rows": rows}
    path = write_results(args.name, payload, out=args.out, device=device)
    path.with_suffix(".md").write_text(markdown(summary, metrics, chance, args.steps))
    plot(summary, metrics, chance, path.with_suffix(".png"))
    return payload


if __name__ == "__main__":
    main()
