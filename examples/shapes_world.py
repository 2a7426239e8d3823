"""What both training examples stand on, so that each of them shows only its model and its training loop.

- `shapes_world`: a shapes-world corpus (images, COCO boxes, captions; `cmcaug.synth`), a patch bank
  built from its boxes (`build_bank`), and the captions tagged once, before training, into the rows
  `cmcaug tag-text` would write (caption + grounded character spans), so no spaCy model runs during
  training. All offline, in a folder of your choice. Optionally with colour-coded captions (`code_colors`).
- `PatchEncoder`: a small CNN standing in for your vision tower (bank patches -> one token each).
- `argument_parser` / `parse_args`: the command line both examples take.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from torch import nn

from cmcaug import GroundedSpan, GroundingTagger, PatchBank, build_bank
from cmcaug.synth import COLORS, SHAPES, make_corpus

CODE_COLORS = dict(zip(SHAPES, COLORS))  # shape -> its one colour word in colour-coded captions (a bijection)
_COLOR_BEFORE = re.compile(rf"\b({'|'.join(COLORS)}) $", re.IGNORECASE)


def shapes_world(root: Path, n_images: int, seed: int, coded_colors: bool = False) -> tuple[PatchBank, list[dict]]:
    """A shapes-world corpus under `root`, its patch bank, and its captions as tag rows (`code_colors`'d if asked)."""
    make_corpus(root / "corpus", n_images, seed=seed, image_size=96)
    build_bank(root / "corpus" / "images", root / "bank", annotations=root / "corpus" / "annotations.json",
               vocab=root / "corpus" / "vocab.json", patch_size=32, min_box=8, progress=False)
    bank = PatchBank.open(root / "bank")
    captions = [json.loads(line)["caption"] for line in (root / "corpus" / "captions.jsonl").open()]
    tagger = GroundingTagger(bank.vocab, mode="lookup")
    if coded_colors:
        captions = [code_colors(c, spans) for c, spans in zip(captions, tagger.tag(captions))]
    rows = [{"caption": c, "spans": [s._asdict() for s in spans]} for c, spans in zip(captions, tagger.tag(captions))]
    return bank, rows


def code_colors(caption: str, spans: list[GroundedSpan]) -> str:
    """`caption` with the colour word before each grounded shape replaced by that shape's code colour.

    "Two red stars and a blue disc." -> "Two yellow stars and a red disc.": every star is then yellow in the
    text, every circle red. In shapes-world captions a shape is independent of every other word (colour,
    size, count, position are drawn apart), so nothing around a shape's word says which shape it is; natural
    captions are not like that ("a dog *catches* a frisbee"), and that context is what lets MLM on a CMC view
    read a patch. The images keep their colours: captions and images stay unpaired.
    """
    for span in sorted(spans, key=lambda s: s.start, reverse=True):
        head = _COLOR_BEFORE.sub(CODE_COLORS[span.concept] + " ", caption[:span.start])
        caption = head + caption[span.start:]
    return caption


class PatchEncoder(nn.Module):
    """Bank patches [M, 3, P, P] -> one token each [M, 1, dim]."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 4, stride=4), nn.GELU(), nn.Conv2d(32, dim, 4, stride=4),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels).unsqueeze(1)


def argument_parser(description: str, steps: int) -> argparse.ArgumentParser:
    """The examples' shared options: corpus size, batch, replacement ratio, workers, seed, work folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=240, help="shapes-world images (= captions)")
    parser.add_argument("--ratio", type=float, default=0.5, help="probability of replacing a grounded word")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="keep the corpus and bank here (default: a temp folder)")
    return parser


def parse_args(argv: list[str] | None, description: str, steps: int) -> argparse.Namespace:
    """Parse the shared options (`argument_parser`); an example with options of its own extends that parser."""
    return argument_parser(description, steps).parse_args(argv)
