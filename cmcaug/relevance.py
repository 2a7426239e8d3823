"""Patch-to-caption relevance for TiMix, from a small text-aware head trained on grounding boxes.

TiMix needs, for every image patch, how relevant it is to the image's caption. Models with a cross-modal
attention map can use it directly; for the rest, the TiMix authors train a small head on top of a vision
encoder's patch features: each patch's own features, the mean-pooled features of the whole image and the
caption's [CLS] embedding go through an MLP to two logits (irrelevant, relevant). Its labels come from
grounding data: the patches a caption's boxes cover.

    head = TextAwarePatchPredictor(dim=768, text_dim=768)
    logits = head(patch_features, text_cls)                     # [B, N, 2]; ViT patch features, no [CLS]
    labels = patch_labels_from_boxes(boxes, grid, image_size=(H, W))
    loss = patch_alignment_loss(logits, labels)                 # add to the pre-training loss
    relevance = head.relevance(patch_features, text_cls, grid)  # [B, gh, gw] in [0, 1] -> text_aware_mix

An untrained head scores every patch near 0.5, so its windows are close to random: train it first.
`examples/train_timix_relevance.py` does, on the shapes world, in seconds on a CPU.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError


class TextAwarePatchPredictor(nn.Module):
    """Scores every patch of an image against the image's caption: logits of (irrelevant, relevant).

    `dim`: width of the patch features; `text_dim`: width of the caption embedding (the text encoder's
    [CLS]); `hidden`: MLP width (default dim // 2). Patch features are layer-normalized, then each patch's
    projection, the projection of the mean over all patches (what the whole image shows) and the text
    projection are concatenated and scored by a two-layer MLP.
    """

    def __init__(self, dim: int, text_dim: int, hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = hidden or max(dim // 2, 8)
        self.norm = nn.LayerNorm(dim)
        self.local = nn.Linear(dim, hidden)
        self.context = nn.Linear(dim, hidden)
        self.text = nn.Linear(text_dim, hidden)
        self.mlp = nn.Sequential(
            nn.GELU(), nn.Dropout(dropout), nn.Linear(3 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 2),
        )

    def forward(self, patch_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """patch_features [B, N, dim] (no [CLS] token), text_features [B, text_dim] -> logits [B, N, 2]."""
        if patch_features.dim() != 3 or text_features.dim() != 2 or len(patch_features) != len(text_features):
            raise InputError(f"expected patch_features [B, N, dim] and text_features [B, text_dim], got "
                             f"{tuple(patch_features.shape)} and {tuple(text_features.shape)}")
        x = self.norm(patch_features)
        n = x.shape[1]
        context = self.context(x.mean(1, keepdim=True)).expand(-1, n, -1)
        text = self.text(text_features).unsqueeze(1).expand(-1, n, -1)
        return self.mlp(torch.cat([self.local(x), context, text], -1))

    @torch.no_grad()
    def relevance(self, patch_features: torch.Tensor, text_features: torch.Tensor,
                  grid: tuple[int, int]) -> torch.Tensor:
        """[B, gh, gw] probability that each patch is relevant to the caption: `relevance` for TiMix.

        Probabilities are non-negative, so they also serve `label_mode="relevance"`; a window's sum is the
        expected number of relevant patches it holds.
        """
        logits = self(patch_features, text_features)
        if logits.shape[1] != grid[0] * grid[1]:
            raise InputError(f"{logits.shape[1]} patches do not fill a {grid[0]} x {grid[1]} grid")
        return logits.float().softmax(-1)[..., 1].reshape(-1, *grid)


def _in_patch_units(image_boxes: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int] | None) -> torch.Tensor:
    """[n, 4] float64 boxes (x0, y0, x1, y1) on the CPU, clamped to the image and scaled to patch units."""
    xyxy = torch.as_tensor(image_boxes, dtype=torch.float64, device="cpu").reshape(-1, 4)
    if image_size is not None:
        xyxy = xyxy / torch.tensor([image_size[1], image_size[0]] * 2, dtype=torch.float64)
    return xyxy.clamp(0, 1) * torch.tensor([grid[1], grid[0]] * 2, dtype=torch.float64)


def patch_box_coverage(boxes: Sequence[torch.Tensor], grid: tuple[int, int], *,
                       image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """[B, gh, gw] float64 on the CPU: the largest fraction of each patch's area that one of its image's boxes
    covers (0 for an image without boxes); boxes as in `patch_labels_from_boxes`, which thresholds this.

    Ground-truth boxes of the objects a caption names make a relevance map for TiMix without a trained
    head: windows are then ranked by how much object area they hold.
    """
    return _coverage([_in_patch_units(image_boxes, grid, image_size) for image_boxes in boxes], grid)


def _coverage(boxes: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """`patch_box_coverage` of boxes already in patch units (`_in_patch_units`)."""
    gh, gw = grid
    if gh < 1 or gw < 1:
        raise InputError(f"need a patch grid of at least 1 x 1, got {grid}")
    ys = torch.arange(gh, dtype=torch.float64).view(1, gh, 1)
    xs = torch.arange(gw, dtype=torch.float64).view(1, 1, gw)
    coverage = torch.zeros(len(boxes), gh, gw, dtype=torch.float64)
    for b, image_boxes in enumerate(boxes):
        x0, y0, x1, y1 = (v.view(-1, 1, 1) for v in image_boxes.unbind(1))
        overlap = (torch.minimum(x1, xs + 1) - torch.maximum(x0, xs)).clamp(min=0) * \
                  (torch.minimum(y1, ys + 1) - torch.maximum(y0, ys)).clamp(min=0)
        if len(overlap):
            coverage[b] = overlap.amax(0)
    return coverage


def patch_labels_from_boxes(boxes: Sequence[torch.Tensor], grid: tuple[int, int], *,
                            image_size: tuple[int, int] | None = None, min_overlap: float = 0.5) -> torch.Tensor:
    """[B, gh, gw] bool: the patches each image's caption-grounded boxes cover (on the CPU, from boxes on any
    device; `patch_alignment_loss` moves them to the logits).

    `boxes[b]` is [n_b, 4] (x0, y0, x1, y1), in pixels of an image of `image_size` = (H, W), or as
    fractions of the width and height when `image_size` is None. A patch is relevant when one box covers at
    least `min_overlap` of its area (`patch_box_coverage`), and the patch holding a box's center always is,
    so boxes smaller than a patch still mark one.
    """
    if not 0 < min_overlap <= 1:
        raise InputError(f"need 0 < min_overlap <= 1, got {min_overlap}")
    gh, gw = grid
    in_patches = [_in_patch_units(image_boxes, grid, image_size) for image_boxes in boxes]
    labels = _coverage(in_patches, grid) >= min_overlap
    for b, xyxy in enumerate(in_patches):
        nonempty = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        cy = ((xyxy[nonempty, 1] + xyxy[nonempty, 3]) / 2).long().clamp(max=gh - 1)
        cx = ((xyxy[nonempty, 0] + xyxy[nonempty, 2]) / 2).long().clamp(max=gw - 1)
        labels[b, cy, cx] = True
    return labels


def patch_alignment_loss(logits: torch.Tensor, labels: torch.Tensor, positive_weight: float = 1.0) -> torch.Tensor:
    """Cross entropy of the predictor's logits [B, N, 2] against patch labels [B, N] or [B, gh, gw].

    `positive_weight` > 1 counters the imbalance when captions ground only a few patches.
    """
    if logits.shape[-1] != 2 or logits.shape[:-1].numel() != labels.numel() or len(logits) != len(labels):
        raise InputError(f"logits [B, N, 2] and labels with B * N entries expected, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    weight = torch.tensor([1.0, positive_weight], device=logits.device)
    return F.cross_entropy(logits.reshape(-1, 2).float(), labels.reshape(-1).long().to(logits.device),
                           weight=weight)
