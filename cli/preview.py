"""`cmcaug preview BANK -o OUT.png`: a picture of a bank, one row of sampled patches per concept;
`cmcaug preview BANK --captions FILE -o OUT.html`: the CMC views of the first captions of FILE."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preview",
        help="write a PNG of sampled bank patches, or an HTML page of CMC views of captions",
        description="Without --captions: draw one row per concept (name, patch count, then sampled patches labelled "
        "with their source image). With --captions: collate the first --rows captions with CMCTransform against the "
        "bank and write each caption with its replaced words marked and its CMC view (text tokens with the bank "
        "patches inline), as a self-contained HTML page, or a PNG when OUT ends in .png.",
    )
    parser.add_argument("bank", metavar="BANK", help="patch bank folder")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="file to write: .png, or .html for --captions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patch sampling and of the CMC draws (default 0)")
    parser.add_argument("--tile-size", type=int, help="draw patches at this side in pixels (default: the bank's patch "
                        "size, at least 48 for --captions)")
    bank = parser.add_argument_group("bank preview")
    bank.add_argument("--concepts", help="comma-separated concept names (default: every concept with patches)")
    bank.add_argument("--per-concept", type=int, default=8, help="patches per concept (default 8)")
    views = parser.add_argument_group("CMC views (--captions)")
    views.add_argument("--captions", metavar="FILE", help="a tag-text .parquet file, or .txt / .jsonl / .parquet "
                       "captions (tagged here with the bank's vocabulary)")
    views.add_argument("--rows", type=int, default=16, help="captions to show, from the start of FILE (default 16)")
    views.add_argument("--ratio", type=float, default=0.5,
                       help="probability that a grounded word is replaced (default 0.5)")
    views.add_argument("--tokenizer", choices=("words", "open_clip"), default="words",
                       help="words: one token per word or punctuation mark (default); open_clip: open_clip's "
                       "ViT-B-32 byte-pair tokenizer (needs open_clip_torch; downloads nothing)")
    views.add_argument("--field", default="caption",
                       help="JSON field / Parquet column holding the caption (default caption)")
    views.add_argument("--mode", choices=("tagger", "lookup"), default="tagger",
                       help="spaCy grounding mode for captions without tags (default tagger)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cmcaug.bank import PatchBank

    bank = PatchBank.open(args.bank)
    if args.captions:
        from cmcaug.views import preview_captions

        from .render import summary

        stats = preview_captions(bank, args.captions, args.output, tokenizer=args.tokenizer, rows=args.rows,
                                 ratio=args.ratio, seed=args.seed, field=args.field, mode=args.mode,
                                 tile_size=args.tile_size)
        print(summary("preview: CMC views", stats))
        return 0
    from cmcaug.preview import preview_bank

    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()] if args.concepts else None
    path = preview_bank(bank, args.output, concepts, args.per_concept, args.seed, tile_size=args.tile_size)
    print(f"wrote {path}")
    return 0
