"""`cmcaug inspect BANK`: a bank's summary (sizes, index, provenance, build stats) and per-concept counts."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print a patch bank's summary and per-concept counts",
        description="Open BANK (checking its format, shapes, offsets and, unless --no-validate, every file's sha256) "
        "and print its summary and patches per concept. Exit code 4 if the bank is malformed.",
    )
    parser.add_argument("bank", metavar="BANK", help="patch bank folder")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")
    parser.add_argument("--no-validate", action="store_true", help="skip the checksums (fast on large banks; structure is still checked)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from cmcaug.bank.reader import PatchBank

    from .render import summary, table

    info = PatchBank.open(args.bank, validate=not args.no_validate).summary()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    concepts = info.pop("concepts")
    print(summary("patch bank", info))
    print(table([(c["concept_id"], c["name"], c["count"]) for c in concepts], ["id", "concept", "patches"]))
    return 0
