"""What the training examples stand on, so that each of them shows only its model and its training loop.

- `shapes_world`: a shapes-world corpus (images, COCO boxes, captions; `cmcaug.synth`), a patch bank
  built from its boxes (`build_bank`), and the captions tagged once, before training, into the rows
  `cmcaug tag-text` would write (caption + grounded character spans), so no spaCy model runs during
  training. All offline, in a folder of your choice. `context` > 0 draws the richer captions whose
  context words say which shape they describe (`make_corpus(context=...)`).
- `PatchEncoder`: a small CNN standing in for your vision tower (bank patches -> one token each).
- `argument_parser` / `parse_args`: the command line the examples share.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from cmcaug import GroundingTagger, PatchBank, build_bank
from cmcaug.synth import make_corpus


def shapes_world(root: Path, n_images: int, seed: int, context: float = 0.0) -> tuple[PatchBank, list[dict]]:
    """A shapes-world corpus under `root`, its patch bank, and its captions as tag rows (one per image, in order)."""
    make_corpus(root / "corpus", n_images, seed=seed, image_size=96, context=context)
    build_bank(root / "corpus" / "images", root / "bank", annotations=root / "corpus" / "annotations.json",
               vocab=root / "corpus" / "vocab.json", patch_size=32, min_box=8, progress=False)
    bank = PatchBank.open(root / "bank")
    captions = [json.loads(line)["caption"] for line in (root / "corpus" / "captions.jsonl").open()]
    tagger = GroundingTagger(bank.vocab, mode="lookup")
    rows = [{"caption": c, "spans": [s._asdict() for s in spans]} for c, spans in zip(captions, tagger.tag(captions))]
    return bank, rows


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
    parser.add_argument("--context", type=float, default=0.0,
                        help="share of object phrases with a shape-specific context word (cmcaug synth --context)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="keep the corpus and bank here (default: a temp folder)")
    return parser


def parse_args(argv: list[str] | None, description: str, steps: int) -> argparse.Namespace:
    """Parse the shared options (`argument_parser`); an example with options of its own extends that parser."""
    return argument_parser(description, steps).parse_args(argv)
