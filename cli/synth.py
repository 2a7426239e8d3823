"""`cmcaug synth OUT`: write a shapes-world corpus (images, COCO boxes, captions, vocabulary)."""
from __future__ import annotations

import argparse

from .usage import number


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="generate a shapes-world corpus",
        description="Write a deterministic toy corpus: OUT/images/*.png, OUT/annotations.json (COCO boxes), "
        "OUT/captions.jsonl (one caption per image) and OUT/vocab.json (shape concepts with synonyms).",
    )
    parser.add_argument("out", metavar="OUT", help="output folder")
    parser.add_argument("--images", type=number(int, 1), default=200, help="number of images (default 200)")
    parser.add_argument("--seed", type=number(int, 0), default=0,
                        help="random seed; the same seed gives the same files (default 0)")
    parser.add_argument("--image-size", type=number(int, 32), default=256, help="image side in pixels, at least 32 "
                        "(default 256)")
    parser.add_argument("--context", type=number(float, 0, 1), default=0.0, metavar="P",
                        help="chance in [0, 1] that an object's phrase gets a word of its shape's context "
                        "(\"a twinkling red star\"); only the captions change (default 0: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace a corpus already in OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cmcaug.synth import make_corpus

    from .render import summary, table

    info = make_corpus(args.out, args.images, args.seed, args.image_size, overwrite=args.overwrite,
                       progress=not args.no_progress, context=args.context)
    print(summary("shapes world", info.stats()))
    print(table(list(info.objects_per_concept.items()), ["concept", "objects"]))
    return 0
