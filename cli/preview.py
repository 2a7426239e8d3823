"""`cmcaug preview BANK -o OUT.png`: a picture of a bank, one row of sampled patches per concept;
`cmcaug preview BANK --captions FILE -o OUT.html`: the CMC views of the first captions of FILE;
`cmcaug preview --timix CORPUS -o OUT.png`: TiMix on the first images of a COCO-annotated corpus."""
from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from cmcaug.concepts import ConceptVocab


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preview",
        help="write a PNG of sampled bank patches, an HTML page of CMC views of captions, or a PNG of TiMix mixes",
        description="Without --captions: draw one row per concept (name, patch count, then sampled patches labelled "
        "with their source image). With --captions: collate the first --rows captions with CMCTransform against the "
        "bank and write each caption with its replaced words marked and its CMC view (text tokens with the bank "
        "patches inline), as a self-contained HTML page, or a PNG when OUT ends in .png. With --timix CORPUS (no "
        "BANK): mix the corpus's first --rows images with TiMix, each patch's relevance the share of it that an "
        "annotated box covers, and draw each image, its partner and the mixed image with the windows outlined.",
    )
    parser.add_argument("bank", metavar="BANK", nargs="?", help="patch bank folder (not with --timix)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="file to write: .png, or .html for --captions")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the patch sampling, of the CMC draws or of the TiMix window (default 0)")
    parser.add_argument("--tile-size", type=int, help="draw patches (TiMix: images) at this side in pixels (default: the "
                        "bank's patch size, at least 48 for --captions; 160 for --timix)")
    parser.add_argument("--rows", type=int, help="captions to show, from the start of FILE (default 16), or images "
                        "of CORPUS to mix (default 8)")
    bank = parser.add_argument_group("bank preview")
    bank.add_argument("--concepts", help="comma-separated concept names (default: every concept with patches)")
    bank.add_argument("--per-concept", type=int, default=8, help="patches per concept (default 8)")
    views = parser.add_argument_group("CMC views (--captions)")
    views.add_argument("--captions", metavar="FILE", help="a tag-text .parquet file, or .txt / .jsonl / .parquet "
                       "captions (tagged here with the bank's vocabulary)")
    views.add_argument("--ratio", type=float, default=0.5,
                       help="probability that a grounded word is replaced (default 0.5)")
    views.add_argument("--tokenizer", choices=("words", "open_clip"), default="words",
                       help="words: one token per word or punctuation mark (default); open_clip: open_clip's "
                       "ViT-B-32 byte-pair tokenizer (needs open_clip_torch; downloads nothing)")
    views.add_argument("--field", default="caption",
                       help="JSON field / Parquet column holding the caption (default caption)")
    views.add_argument("--mode", choices=("tagger", "lookup"), default="tagger",
                       help="spaCy grounding mode for captions without tags (default tagger)")
    timix = parser.add_argument_group("TiMix (--timix)")
    timix.add_argument("--timix", metavar="CORPUS", help="a folder holding images/ and annotations.json (COCO boxes), "
                       "as `cmcaug synth` writes one")
    timix.add_argument("--image-size", type=int, default=224,
                       help="resize images to this side, a multiple of --patch-size (default 224)")
    timix.add_argument("--patch-size", type=int, default=32, help="patch side in pixels (default 32)")
    timix.add_argument("--label-mode", choices=("area", "relevance"), default="area",
                       help="how lam is computed (see text_aware_mix; default area)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from cmcaug.errors import InputError

    from .render import summary

    shown = {k: v for k, v in (("rows", args.rows), ("tile_size", args.tile_size)) if v is not None}
    if args.timix:
        if args.bank or args.captions:
            raise InputError("--timix mixes images of a corpus and takes no BANK or --captions; run them separately")
        from cmcaug.viz.mixes import preview_timix

        names, images, boxes = _read_annotated(args.timix, shown.pop("rows", 8))
        stats = preview_timix(images, boxes, args.output, seed=args.seed, patch_size=args.patch_size,
                              image_size=args.image_size, label_mode=args.label_mode,
                              title=f"TiMix on {Path(args.timix)}", **shown)
        print(summary("preview: TiMix", {"output": stats["output"], "images": names, **stats}))
        return 0
    if not args.bank:
        raise InputError("give a patch bank folder BANK, or --timix CORPUS for a TiMix preview")
    from cmcaug.bank.reader import PatchBank

    bank = PatchBank.open(args.bank)
    if args.captions:
        from cmcaug.viz.cmc_views import preview_captions

        captions = _read_captions(args.captions, bank.vocab, args.field)
        stats = preview_captions(bank, captions, args.output, tokenizer=args.tokenizer, ratio=args.ratio,
                                 seed=args.seed, mode=args.mode, **shown)
        print(summary("preview: CMC views", stats))
        return 0
    from cmcaug.viz.patch_grids import preview_bank

    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()] if args.concepts else None
    path = preview_bank(bank, args.output, concepts, args.per_concept, args.seed, tile_size=args.tile_size)
    print(f"wrote {path}")
    return 0


def _read_captions(path: str, vocab: ConceptVocab, field: str) -> Iterator[Any]:
    """FILE's rows, lazily (the preview reads only its first few): a tag-text Parquet file's tag rows,
    else the captions of a .txt / .jsonl / .parquet caption file."""
    import pyarrow.parquet as pq

    from cmcaug.errors import InputError
    from cmcaug.inputs import IndexedItems
    from cmcaug.text.tags import read_captions

    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: no such captions file")
    if file.suffix.lower() == ".parquet" and "spans" in pq.read_schema(file).names:
        tags = IndexedItems.of(file, vocab)
        rows: Iterator[Any] = (tags[i] for i in range(len(tags)))
    else:
        rows = (row.value if isinstance(row.value, str) else "" for row in read_captions([file], field))
    first = next(rows, None)
    if first is None:
        raise InputError(f"{file}: holds no captions")
    return itertools.chain([first], rows)


def _read_annotated(corpus: str, rows: int) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Names, pixels and COCO boxes (x0, y0, x1, y1 pixels) of the first `rows` images (by file name) of CORPUS,
    a folder holding `images/` and `annotations.json` as `cmcaug synth` writes one."""
    from cmcaug.builder.detect import AnnotationDetector
    from cmcaug.builder.images import ImageDecodeError, decode_image, list_images
    from cmcaug.errors import InputError
    from cmcaug.synth import ANNOTATIONS, IMAGES_DIR

    root = Path(corpus)
    if rows < 1:
        raise InputError(f"--rows must be at least 1, got {rows}")
    if not (root / IMAGES_DIR).is_dir() or not (root / ANNOTATIONS).is_file():
        raise InputError(f"{root}: expected a corpus folder holding {IMAGES_DIR}/ and {ANNOTATIONS} (COCO boxes), "
                         "as `cmcaug synth` writes one")
    refs = list_images([root / IMAGES_DIR])[:rows]
    pixels = []
    for ref in refs:
        try:
            pixels.append(decode_image(ref.read()))
        except ImageDecodeError as exc:
            raise InputError(f"{ref.path}: cannot decode it ({exc}); remove it from the corpus") from exc
    names = [ref.key for ref in refs]
    return names, pixels, [found.boxes for found in AnnotationDetector(root / ANNOTATIONS).detect(pixels, names)]
