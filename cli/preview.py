"""`cmcaug preview BANK -o OUT.png`: a picture of a bank, one row of sampled patches per concept."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preview",
        help="write a PNG of sampled bank patches",
        description="Draw one row per concept (name, patch count, then sampled patches labelled with their source image).",
    )
    parser.add_argument("bank", metavar="BANK", help="patch bank folder")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.png", help="PNG file to write")
    parser.add_argument("--concepts", help="comma-separated concept names (default: every concept with patches)")
    parser.add_argument("--per-concept", type=int, default=8, help="patches per concept (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--tile-size", type=int, help="draw patches at this side in pixels (default: the bank's patch size)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cmcaug.bank import PatchBank
    from cmcaug.preview import preview_bank

    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()] if args.concepts else None
    bank = PatchBank.open(args.bank)
    path = preview_bank(bank, args.output, concepts, args.per_concept, args.seed, tile_size=args.tile_size)
    print(f"wrote {path}")
    return 0
