"""`cmcaug preview BANK -o OUT.png`: a picture of a bank, one row of sampled patches per concept;
`cmcaug preview BANK --captions FILE -o OUT.html`: the CMC views of the first captions of FILE;
`cmcaug preview --timix CORPUS -o OUT.png`: TiMix on the first images of a COCO-annotated corpus;
`cmcaug preview --crops CORPUS -o OUT.png`: what each build-bank --crop mode makes of the corpus's first boxes.

OUT's extension picks the format, for every kind of preview: .png, .jpg/.jpeg, .webp, or .html/.htm (the CMC
views' own page; for the other two, a page showing the picture). Flags of another kind of preview than the
one asked for, another extension and out-of-range numbers are usage errors (exit 2), refused before any work.
"""
from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .usage import UsageError, number

if TYPE_CHECKING:
    import numpy as np

    from cmcaug.concepts import ConceptVocab

# The flags that only one kind of preview reads (argparse default None, so a flag given shows), and their defaults.
_ONLY = {
    "bank": ("concepts", "per_concept"),
    "captions": ("ratio", "tokenizer", "field", "mode"),
    "timix": ("image_size", "patch_size", "label_mode"),
    "crops": (),
}
_KIND = {"bank": "a bank preview (BANK without --captions)", "captions": "CMC views (--captions)",
         "timix": "a TiMix preview (--timix)", "crops": "a crop-mode preview (--crops)"}
_DEFAULTS = {"per_concept": 8, "ratio": 0.5, "tokenizer": "words", "field": "caption", "mode": "tagger",
             "image_size": 224, "patch_size": 32, "label_mode": "area"}
_ROWS = {"captions": 16, "timix": 8, "crops": 4}  # --rows: captions shown, images mixed, images cropped
_POSITIVE = number(int, low=1)


def register(subparsers: argparse._SubParsersAction) -> None:
    from cmcaug.viz._picture_files import PICTURE_FORMATS

    parser = subparsers.add_parser(
        "preview",
        help="write a picture (or page) of sampled bank patches, of the CMC views of captions, or of TiMix mixes",
        description="Without --captions: draw one row per concept (name, patch count, then sampled patches labelled "
        "with their source image). With --captions: collate the first --rows captions with CMCTransform against the "
        "bank and show each caption with its replaced words marked and its CMC view (text tokens with the bank "
        "patches inline). With --timix CORPUS (no BANK): mix the corpus's first --rows images with TiMix, each "
        "patch's relevance the share of it that an annotated box covers, and draw each image, its partner and the "
        f"mixed image with the windows outlined. OUT's extension picks the format: {', '.join(PICTURE_FORMATS)} "
        "(HTML: the CMC views as a page with the patches inline, drawn in the browser's fonts; a bank or TiMix "
        "preview as a page showing its picture). Pictures are drawn in DejaVu Sans (shipped with matplotlib): "
        "accented Latin, Greek and Cyrillic, but CJK text draws as boxes; use .html for the CMC views of such captions.",
    )
    parser.add_argument("bank", metavar="BANK", nargs="?", help="patch bank folder (not with --timix or --crops)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help=f"file to write, its format named by its extension: {', '.join(PICTURE_FORMATS)}")
    parser.add_argument("--seed", type=number(int, 0), default=0,
                        help="seed of the patch sampling, of the CMC draws or of the TiMix window (default 0)")
    parser.add_argument("--tile-size", type=_POSITIVE, help="draw patches (TiMix: images) at this side in pixels "
                        "(default: the bank's patch size, at least 48 for --captions; 160 for --timix)")
    parser.add_argument("--rows", type=_POSITIVE, help=f"with --captions: captions to show, from the start of FILE "
                        f"(default {_ROWS['captions']}); with --timix: images of CORPUS to mix (default {_ROWS['timix']})")
    bank = parser.add_argument_group("bank preview (BANK without --captions)")
    bank.add_argument("--concepts", help="comma-separated concept names (default: every concept with patches)")
    bank.add_argument("--per-concept", type=_POSITIVE, help=f"patches per concept (default {_DEFAULTS['per_concept']})")
    views = parser.add_argument_group("CMC views (--captions)")
    views.add_argument("--captions", metavar="FILE", help="a tag-text .parquet file, or .txt / .jsonl / .parquet "
                       "captions (tagged here with the bank's vocabulary)")
    views.add_argument("--ratio", type=number(float, 0, 1),
                       help=f"probability that a grounded word is replaced (default {_DEFAULTS['ratio']})")
    views.add_argument("--tokenizer", choices=("words", "open_clip"),
                       help="words: one token per word or punctuation mark (default); open_clip: open_clip's "
                       "ViT-B-32 byte-pair tokenizer (needs open_clip_torch; downloads nothing)")
    views.add_argument("--field", help="JSON field / Parquet column holding the caption (default caption)")
    views.add_argument("--mode", choices=("tagger", "lookup"),
                       help="spaCy grounding mode for captions without tags (default tagger)")
    timix = parser.add_argument_group("TiMix (--timix)")
    timix.add_argument("--timix", metavar="CORPUS", help="a folder holding images/ and annotations.json (COCO boxes), "
                       "as `cmcaug synth` writes one")
    timix.add_argument("--image-size", type=_POSITIVE, help="resize images to this side, a multiple of --patch-size "
                       f"(default {_DEFAULTS['image_size']})")
    timix.add_argument("--patch-size", type=_POSITIVE, help=f"patch side in pixels (default {_DEFAULTS['patch_size']})")
    timix.add_argument("--label-mode", choices=("area", "relevance"),
                       help="how lam is computed (see text_aware_mix; default area)")
    crops = parser.add_argument_group("crop modes (--crops)")
    crops.add_argument("--crops", metavar="CORPUS", help="a folder holding images/ and annotations.json: draw each box "
                       "of its first --rows images (default 4) as build-bank's --crop square, tight and pad-mean cut it")
    parser.set_defaults(run=run)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags as given, before any file is read: which preview they ask for, flags
    of another one, an image size that is no multiple of the patch size, an OUT of no picture format."""
    from cmcaug.errors import InputError
    from cmcaug.viz._picture_files import picture_format

    corpus_kinds = [flag for flag, value in (("--timix", args.timix), ("--crops", args.crops)) if value]
    if len(corpus_kinds) > 1:
        return "--timix and --crops are two previews; run them separately"
    if corpus_kinds and (args.bank or args.captions):
        return f"{corpus_kinds[0]} draws images of a corpus and takes no BANK or --captions; run them separately"
    if not corpus_kinds and not args.bank:
        return "give a patch bank folder BANK, or --timix CORPUS / --crops CORPUS for a corpus preview"
    kind = "timix" if args.timix else "crops" if args.crops else "captions" if args.captions else "bank"
    for other, names in _ONLY.items():
        given = [_flag(name) for name in names if getattr(args, name) is not None]
        if other != kind and given:
            return f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for {_KIND[other]}, not {_KIND[kind]}"
    if kind == "bank" and args.rows is not None:
        return "--rows is for --captions or --timix; a bank preview draws a row per concept (choose them with --concepts)"
    image_size, patch_size = (args.image_size or _DEFAULTS["image_size"]), (args.patch_size or _DEFAULTS["patch_size"])
    if kind == "timix" and image_size % patch_size:
        return f"--image-size must be a multiple of --patch-size, got {image_size} and {patch_size}"
    try:
        picture_format(args.output)
    except InputError as exc:
        return f"argument -o/--output: {exc}"
    return None


def run(args: argparse.Namespace) -> int:
    from .render import summary

    problem = _usage_problem(args)
    if problem:
        raise UsageError(problem)
    for name, value in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    tile = {"tile_size": args.tile_size} if args.tile_size is not None else {}
    if args.crops:
        from cmcaug.viz.crops import render_crop_modes

        names, images, boxes = _read_annotated(args.crops, args.rows or _ROWS["crops"])
        print(f"wrote {render_crop_modes(images, boxes, args.output, names=names, **tile)}")
        return 0
    if args.timix:
        from cmcaug.viz.mixes import preview_timix

        names, images, boxes = _read_annotated(args.timix, args.rows or _ROWS["timix"])
        stats = preview_timix(images, boxes, args.output, seed=args.seed, patch_size=args.patch_size,
                              image_size=args.image_size, label_mode=args.label_mode,
                              title=f"TiMix on {Path(args.timix)}", **tile)
        print(summary("preview: TiMix", {"output": stats["output"], "images": names, **stats}))
        return 0
    from cmcaug.bank.reader import PatchBank

    bank = PatchBank.open(args.bank)
    if args.captions:
        from cmcaug.viz.cmc_views import preview_captions

        captions = _read_captions(args.captions, bank.vocab, args.field)
        stats = preview_captions(bank, captions, args.output, tokenizer=args.tokenizer, ratio=args.ratio,
                                 seed=args.seed, mode=args.mode, rows=args.rows or _ROWS["captions"], **tile)
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
    from cmcaug.text.corpus import read_captions

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
