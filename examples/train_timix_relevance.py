"""Train TiMix's text-aware patch predictor on grounding boxes, then let it choose TiMix's windows.

    python examples/train_timix_relevance.py          # about 20 s on one CPU core

An untrained `TextAwarePatchPredictor` scores every patch near 0.5, so the windows TiMix picks are close to
random. This example trains the head on the shapes world (`cmcaug.synth.make_corpus`: images, COCO boxes,
captions): a patch's label says whether the caption's boxes cover it (`patch_labels_from_boxes`), and the
loss is `patch_alignment_loss`. The towers are frozen stand-ins, a random patch embedding and a bag of
words; in pre-training, feed your ViT's patch features (without [CLS]) and your text encoder's [CLS], and
add the loss to the pre-training loss (the TiMix authors train the head on grounding batches as they go).

Printed for held-out images, before and after training, and for the boxes themselves as relevance: the mean
relevance on box patches and on the background, and how much object TiMix's windows hold: the window each
image loses (should hold little) and the window pasted into it (should hold much). Shapes-world captions
name every object in their image, so "relevant to the caption" means "inside an object's box" here. Lines
that use cmcaug are marked `# cmcaug`.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from cmcaug import TextAwarePatchPredictor, text_aware_mix
from cmcaug.relevance import patch_alignment_loss, patch_box_coverage, patch_labels_from_boxes
from cmcaug.synth import make_corpus

PATCH = 8  # pixels per ViT patch: 64-pixel images make an 8 x 8 grid


def load_world(root: Path, n_images: int, seed: int,
               image_size: int = 64) -> tuple[torch.Tensor, list[torch.Tensor], list[str]]:
    """Shapes-world images [N, 3, S, S] uint8, boxes (one [n, 4] x0, y0, x1, y1 tensor per image), captions."""
    corpus = make_corpus(root, n_images, seed=seed, image_size=image_size, overwrite=True)  # deterministic: re-made
    coco = json.loads(corpus.annotations.read_text())
    boxes = {image["id"]: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes[ann["image_id"]].append([x, y, x + w, y + h])
    pixels = [np.asarray(Image.open(corpus.images_dir / image["file_name"]).convert("RGB")) for image in coco["images"]]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    captions = [json.loads(line)["caption"] for line in corpus.captions.read_text().splitlines()]
    per_image = [torch.tensor(boxes[image["id"]], dtype=torch.float32).reshape(-1, 4) for image in coco["images"]]
    return images, per_image, captions


class FrozenTowers(nn.Module):
    """Stand-ins for a pre-trained vision tower (a random patch embedding) and text tower (a bag of words)."""

    def __init__(self, captions: list[str], dim: int = 64):
        super().__init__()
        self.words = {w: i for i, w in enumerate(sorted({w for c in captions for w in self.split(c)}), start=1)}
        self.patch_embed = nn.Conv2d(3, dim, PATCH, stride=PATCH)
        self.text_embed = nn.EmbeddingBag(len(self.words) + 1, dim, mode="mean")
        self.requires_grad_(False)

    @staticmethod
    def split(caption: str) -> list[str]:
        return re.findall(r"[a-z]+", caption.lower())

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, N, dim]: one feature per patch, row-major over the grid, as a ViT without its [CLS] token."""
        return self.patch_embed((images.float() / 255 - 0.5) / 0.25).flatten(2).transpose(1, 2)

    def text_cls(self, captions: list[str]) -> torch.Tensor:
        ids = [torch.tensor([self.words.get(w, 0) for w in self.split(c)]) for c in captions]
        offsets = torch.tensor([0, *(len(i) for i in ids[:-1])]).cumsum(0)
        return self.text_embed(torch.cat(ids), offsets)


def evaluate(relevance: torch.Tensor, labels: torch.Tensor, images: torch.Tensor, seed: int) -> dict:
    """Mean relevance on box patches and on the background; object share of TiMix's lost and pasted windows."""
    # one fixed 3 x 3 window, so that the rows compare relevance maps, not window draws
    res = text_aware_mix(images, relevance, patch_size=PATCH, window=3, partner="derangement",    # cmcaug
                         generator=torch.Generator().manual_seed(seed))
    objects = labels.float()

    def object_share(boxes: torch.Tensor, owners: torch.Tensor) -> float:
        shares = [objects[o, y0:y1, x0:x1].mean() for o, (x0, y0, x1, y1) in zip(owners.tolist(), boxes.tolist())]
        return round(torch.stack(shares).mean().item(), 3)

    return {"relevance_on_boxes": round(relevance[labels].mean().item(), 3),
            "relevance_on_background": round(relevance[~labels].mean().item(), 3),
            "object_in_lost_window": object_share(res.target_box, torch.arange(len(images))),
            "object_in_pasted_window": object_share(res.source_box, res.partner)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="shapes-world images; the last quarter is held out")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="keep the corpus here (default: a temp folder)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="cmcaug-timix-") as tmp:
        images, boxes, captions = load_world((args.workdir or Path(tmp)) / "corpus", args.images, args.seed)
    size = tuple(images.shape[2:])
    grid = (size[0] // PATCH, size[1] // PATCH)
    labels = patch_labels_from_boxes(boxes, grid, image_size=size)                                   # cmcaug
    towers = FrozenTowers(captions)
    with torch.no_grad():
        features, text = towers.patch_features(images), towers.text_cls(captions)
    train, held_out = torch.arange(len(images)).tensor_split([len(images) * 3 // 4])
    head = TextAwarePatchPredictor(dim=features.shape[-1], text_dim=text.shape[-1])                  # cmcaug
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    positive_weight = float((~labels[train]).sum() / labels[train].sum().clamp(min=1))  # balance box vs background

    def report() -> dict:
        relevance = head.relevance(features[held_out], text[held_out], grid)                         # cmcaug
        return evaluate(relevance, labels[held_out], images[held_out], args.seed)

    before, generator, losses = report(), torch.Generator().manual_seed(args.seed), []
    for step in range(1, args.steps + 1):
        batch = train[torch.randint(len(train), (args.batch_size,), generator=generator)]
        logits = head(features[batch], text[batch])                                    # cmcaug: [B, N, 2]
        loss = patch_alignment_loss(logits, labels[batch], positive_weight)                          # cmcaug
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(loss.item(), 4))
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  patch alignment loss {losses[-1]:.3f}")
    after = report()
    coverage = patch_box_coverage(boxes, grid, image_size=size).float()                              # cmcaug
    boxes_as_relevance = evaluate(coverage[held_out], labels[held_out], images[held_out], args.seed)
    print(f"\n{len(held_out)} held-out images   " + "  ".join(f"{k:>24}" for k in before))
    for name, row in (("untrained head", before), ("trained head", after), ("boxes as relevance", boxes_as_relevance)):
        print(f"{name:>18}   " + "  ".join(f"{v:>24.3f}" for v in row.values()))
    return {"losses": losses, "before": before, "after": after, "boxes": boxes_as_relevance}


if __name__ == "__main__":
    main()
