"""CMCTransform: collate throughput per DataLoader worker against the tokenizer alone; on a GPU, the CMC
path of a training step against a BERT-base forward + backward.

    cmcaug bench transform [--out DIR] [-- --batch-sizes 32 256 --step-device cuda]   # transform-<cpu>.json
    cmcaug bench transform --smoke          # B=8, fewer repeats: checks the code path (transform-smoke-<cpu>.json)
    python -m cmcaug.benchmarks.bench_transform [--smoke] [--out DIR]   # the same as a module

CPU section (one process = one worker), on everyday COCO-style captions (the grounding evaluation set,
`cmcaug/data/grounding_eval.jsonl`) against a bank over `ConceptVocab.default()` (COCO-80, 64x64 patches):

- `tokenizer`: what a text-only collate pays: `tok(texts, padding=True, truncation=True, return_tensors="pt")`;
- `tokenizer+offsets`: the same call with the character offsets CMC needs (lists -> NumPy, as collate does);
- `collate/spans`: `cmc.collate` on tag rows (spans precomputed by `cmcaug tag-text`): tokenize, align,
  choose, sample, plan, gather pixels;
- `collate/lookup`, `collate/tagger`: `cmc.collate` on bare captions, tagged on the fly by spaCy;
- `mask_tokens`: BERT 80/10/10 masking and label remapping of a collated batch;
- the same for open_clip's tokenizer, whose offsets cmcaug recovers in Python.

`planning_ms` = collate/spans - tokenizer+offsets (what CMC adds to a tokenizer call it needs anyway)
and `added_ms` = collate/spans - tokenizer (what CMC adds to a text-only collate). Target: added_ms
below the tokenizer's own time. Each time (`ms`) is the best of 15 rounds that time every provider in
turn (`median_ms` keeps the median): on a shared machine, the estimate least disturbed by others.

Tokenizer: no download is possible here, so a BERT-base-sized WordPiece (30,522 entries, BERT's
normalizer, pre-tokenizer and special tokens) is trained in a few seconds on spaCy's English word
frequencies (spacy-lookups-data `en_lexeme_prob`); its per-caption cost matches bert-base-uncased's, the
algorithm and vocabulary size being the same.

GPU section (skipped without CUDA, or run on any device with `--step-device`): per training step of
B=256 captions, the CMC path (pinned batch -> device, `mask_tokens`, `patch_pixels` in bf16, splice
forward + backward) against BERT-base (HF `BertForMaskedLM`, bf16 autocast) forward + backward on the
same batch. The user's patch encoder is not counted (it is their vision tower).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from cmcaug import CMCTransform, ConceptVocab, GroundingTagger, PatchBank
from cmcaug.bank.writer import write_bank

from .common import (argument_parser, cpu_time_ms, device_name, gpu_time_ms, grounding_eval_set, print_table,
                     write_results)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def bert_base_tokenizer(vocab_size: int = 30522):
    """A BERT-base-sized WordPiece tokenizer trained offline on spaCy's English word frequencies."""
    import spacy_lookups_data
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    table = Path(spacy_lookups_data.__file__).parent / "data" / "en_lexeme_prob.json.gz"
    with gzip.open(table, "rt", encoding="utf-8") as f:
        log_probs = json.load(f)
    words = sorted(((w, p) for w, p in log_probs.items() if w.strip() and not any(c.isspace() for c in w)),
                   key=lambda wp: -wp[1])[:300_000]

    def corpus():  # each word repeated in proportion to its frequency (capped), 1000 words per batch
        for i in range(0, len(words), 1000):
            yield [" ".join([w] * max(1, min(200, int(math.exp(p) * 2e6)))) for w, p in words[i:i + 1000]]

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    return BertTokenizer(vocab=tok.get_vocab())


def coco_bank(path: Path, per_concept: int = 100, patch_size: int = 64, seed: int = 0) -> PatchBank:
    """A bank over COCO-80 with `per_concept` random patches each (what matters here is sizes, not content)."""
    vocab = ConceptVocab.default()
    rng = np.random.default_rng(seed)
    n = per_concept * len(vocab)
    embeddings = rng.standard_normal((n, 32)).astype(np.float32)
    patches = pa.table({
        "concept_id": np.repeat(np.arange(len(vocab), dtype=np.int32), per_concept),
        "image": [f"{i:06d}.jpg" for i in range(n)],
        "box": pa.array(rng.uniform(0, 500, (n, 4)).astype(np.float32).tolist(), pa.list_(pa.float32(), 4)),
        "score": np.ones(n, np.float32),
    })
    write_bank(path, vocab=vocab, patches=patches, pixels=rng.integers(0, 256, (n, patch_size, patch_size, 3), dtype=np.uint8),
               embeddings=embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True),
               provenance={"benchmark": "bench_transform"}, stats={})
    return PatchBank.open(path, validate=False)


def eval_rows(batch_size: int, tagger: GroundingTagger) -> tuple[list[dict], list[tuple[int, str]]]:
    """`batch_size` captions of the evaluation set as tag rows (spans from the tagger) and as bare captions."""
    captions = [row["caption"] for row in grounding_eval_set()]
    captions = [captions[i % len(captions)] for i in range(batch_size)]
    spans = tagger.tag(captions)
    rows = [{"caption": c, "spans": [s._asdict() for s in found], "index": i}
            for i, (c, found) in enumerate(zip(captions, spans))]
    return rows, list(enumerate(captions))


def interleaved_ms(fns: dict[Any, Any], repeat: int, min_seconds: float) -> dict[Any, tuple[float, float]]:
    """(best, median) ms of each function over `repeat` rounds that time every function in turn.

    On a shared machine other processes slow some rounds down; timing round-robin spreads that over all
    functions, and the best round is the estimate least disturbed by them (as `timeit` advises).
    """
    times: dict[Any, list[float]] = {key: [] for key in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            times[key].append(cpu_time_ms(fn, repeat=1, min_seconds=min_seconds))
    return {key: (min(t), statistics.median(t)) for key, t in times.items()}


def cpu_rows(bank: PatchBank, tokenizer: Any, clip_tokenizer: Any, taggers: dict[str, GroundingTagger],
             batch_sizes: list[int], repeat: int, min_seconds: float) -> list[dict[str, Any]]:
    rows = []
    for b in batch_sizes:
        spans_rows, bare = eval_rows(b, taggers["tagger"])
        texts = [c for _, c in bare]
        cmc = CMCTransform(bank, tokenizer, ratio=0.5, max_length=64)
        batch = cmc.collate(spans_rows)
        timings = {
            ("bert-wordpiece", "tokenizer"): lambda: tokenizer(
                texts, padding=True, truncation=True, max_length=64, return_tensors="pt"),
            ("bert-wordpiece", "tokenizer+offsets"): lambda: [np.asarray(v) for v in tokenizer(  # as collate calls it
                texts, padding=True, truncation=True, max_length=64, return_offsets_mapping=True).values()],
            ("bert-wordpiece", "collate/spans"): lambda: cmc.collate(spans_rows),
            ("bert-wordpiece", "mask_tokens"): lambda: cmc.mask_tokens(batch),
        }
        for mode, tagger in taggers.items():
            tagging = CMCTransform(bank, tokenizer, tagger=tagger, ratio=0.5, max_length=64)
            timings[("bert-wordpiece", f"collate/{mode}")] = lambda t=tagging: t.collate(bare)
        clip = CMCTransform(bank, clip_tokenizer, ratio=0.5)
        timings[("open_clip", "tokenizer")] = lambda: clip_tokenizer(texts)
        timings[("open_clip", "collate/spans")] = lambda: clip.collate(spans_rows)
        timed = interleaved_ms(timings, repeat, min_seconds)
        measured = {key: best for key, (best, _) in timed.items()}
        for (tok_name, provider), ms in measured.items():
            row = {"tokenizer": tok_name, "provider": provider, "B": b, "ms": ms,
                   "median_ms": timed[(tok_name, provider)][1], "captions_per_s": b / ms * 1e3}
            if provider == "collate/spans":
                base = measured[(tok_name, "tokenizer")]
                row["added_ms"] = ms - base
                row["added_vs_tokenizer"] = (ms - base) / base
                if (tok_name, "tokenizer+offsets") in measured:
                    row["planning_ms"] = ms - measured[(tok_name, "tokenizer+offsets")]
            rows.append(row)
        rows.append({"tokenizer": "bert-wordpiece", "provider": "batch facts", "B": b, "L": int(batch.input_ids.shape[1]),
                     "L_out": batch.plan.output_length, "patches": batch.num_patches,
                     "grounded": batch.stats.spans, "pixels_bytes": int(batch.pixels.numel())})
    return rows


def step_rows(bank: PatchBank, tokenizer: Any, device: torch.device, batch_size: int,
              tagger: GroundingTagger) -> list[dict[str, Any]]:
    """The CMC path of one step vs BERT-base forward + backward, on `device`."""
    from transformers import BertConfig, BertForMaskedLM

    spans_rows, _ = eval_rows(batch_size, tagger)
    cmc = CMCTransform(bank, tokenizer, ratio=0.5, max_length=64)
    host = cmc.collate(spans_rows)
    host = host.pin_memory() if device.type == "cuda" else host
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer))).to(device)
    words = model.get_input_embeddings()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = cmc.mask_tokens(host.to(device))
    text_labels = torch.where(batch.attention_mask.bool(), batch.input_ids, -100)  # the MLM head's cost is per token
    patch_emb = torch.randn(batch.num_patches, 1, model.config.hidden_size, device=device, requires_grad=True)
    text_emb = words(batch.input_ids).detach().requires_grad_(True)
    grad = torch.ones(len(batch), batch.plan.output_length, model.config.hidden_size, device=device)

    def model_step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=text_labels).loss
        loss.backward()

    def transfer():
        return host.to(device, non_blocking=True)

    def cmc_path():
        moved = cmc.mask_tokens(host.to(device, non_blocking=True))
        moved.patch_pixels(MEAN, STD, dtype)
        cmc.splice(text_emb, patch_emb, moved).embeds.backward(grad)

    timer = gpu_time_ms if device.type == "cuda" else (lambda fn: cpu_time_ms(fn, repeat=3, min_seconds=0.5))
    parts = {
        "bert-base fwd+bwd": model_step,
        "transfer": transfer,
        "mask_tokens": lambda: cmc.mask_tokens(batch),
        "patch_pixels": lambda: batch.patch_pixels(MEAN, STD, dtype),
        "splice fwd+bwd": lambda: cmc.splice(text_emb, patch_emb, batch).embeds.backward(grad),
        "cmc path": cmc_path,
    }
    measured = {name: timer(fn) for name, fn in parts.items()}
    base = measured["bert-base fwd+bwd"]
    return [{"device": device_name(device), "part": name, "B": batch_size, "L_out": batch.plan.output_length,
             "patches": batch.num_patches, "ms": ms, "fraction_of_bert_step": ms / base} for name, ms in measured.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("bench_transform", __doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--smoke", action="store_true", help="B=8 and fewer repeats: checks the code path only")
    parser.add_argument("--step-device", default="cuda", help="device of the training-step section (skipped if unavailable)")
    parser.add_argument("--step-batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.step_batch_size = [8], 8
    import open_clip

    torch.set_num_threads(1)  # one DataLoader worker = one core: no intra-op or Rust tokenizer threads
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = bert_base_tokenizer()
    clip_tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with tempfile.TemporaryDirectory(prefix="cmcaug-bench-") as tmp:
        bank = coco_bank(Path(tmp) / "bank")
        taggers = {mode: GroundingTagger(bank.vocab, mode=mode) for mode in ("lookup", "tagger")}
        repeat, min_seconds = (3, 0.05) if args.smoke else (15, 0.1)
        rows = cpu_rows(bank, tokenizer, clip_tokenizer, taggers, args.batch_sizes, repeat, min_seconds)
        columns = ["tokenizer", "provider", "B", "ms", "median_ms", "captions_per_s", "added_ms", "added_vs_tokenizer",
                   "planning_ms"]
        print_table([r for r in rows if "ms" in r], columns, "collate, one worker (CPU)")
        device = torch.device(args.step_device)
        steps: list[dict[str, Any]] = []
        if device.type == "cuda" and not torch.cuda.is_available():
            print(f"\nno CUDA device: skipping the training-step section (--step-device {args.step_device})")
        else:
            steps = step_rows(bank, tokenizer, device, args.step_batch_size, taggers["tagger"])
            print_table(steps, ["device", "part", "B", "L_out", "patches", "ms", "fraction_of_bert_step"],
                        "CMC path per training step")
    payload = {"device": device_name("cpu"), "torch": torch.__version__, "threads": 1, "collate": rows, "step": steps,
               "tokenizer": "BERT-base-sized WordPiece (30522) trained offline on spaCy en_lexeme_prob; open_clip ViT-B-32 BPE"}
    suffix = "-smoke" if args.smoke else ""
    write_results(f"transform{suffix}", payload, out=args.out, device=device_name("cpu"))
    if steps:
        write_results(f"transform-step{suffix}", {"device": steps[0]["device"], "rows": steps}, out=args.out,
                      device=steps[0]["device"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
