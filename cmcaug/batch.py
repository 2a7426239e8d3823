"""`CMCBatch`, what `CMCTransform.collate` hands the training loop, and `CMCStats`, what happened to the words.

A batch holds the text view's tokens, the `SplicePlan` of the CMC view, the uint8 pixels of the patches
that fill its slots and, with `CMCTransform(negatives=N)`, N hard-negative views: the same plan with every
slot filled by a patch of another concept. It moves to a device as a whole (`to`, `pin_memory`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .plan import SplicePlan


@dataclass
class CMCStats:
    """What happened to the grounded words of the captions collated so far (all counts)."""

    captions: int = 0
    empty_captions: int = 0
    truncated_captions: int = 0  # cut at max_length
    ungrounded_captions: int = 0  # no grounded word at all (empty ones included)
    spans: int = 0  # grounded words
    spans_truncated: int = 0  # not (wholly) in the tokens: cut by truncation, or not a span of the caption
    spans_overlapping: int = 0  # sharing a token with an earlier span: the earlier one wins
    spans_absent: int = 0  # concept has no patch in the bank (per concept name: absent_concepts)
    spans_no_room: int = 0  # chosen, but its patch would push the view past max_length
    spans_replaced: int = 0
    absent_concepts: dict[str, int] = field(default_factory=dict)  # name -> spans; ids: bank.vocab.id(name)

    def add(self, other: CMCStats) -> CMCStats:
        """Add `other`'s counts into this one (in place) and return it."""
        for f in dataclasses.fields(self):
            if f.name != "absent_concepts":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        for c, n in other.absent_concepts.items():
            self.absent_concepts[c] = self.absent_concepts.get(c, 0) + n
        return self

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(repr=False)
class CMCBatch:
    """One collated batch: the text view's tokens, the plan of the CMC view, and its patches' pixels.

    Shapes: B captions, L text tokens, M patch slots, P the bank's patch side, N hard negatives per caption.
    `labels` ([B, L_out], aligned with the spliced view, patch rows included) and `patch_mask` are set by
    `CMCTransform.mask_tokens`. Negative view n is the CMC view with slot m showing patch
    `negative_patch_ids[n, m]` instead; it is a valid negative for row b where `negative_valid[b, n]`
    (the row has a slot, and every slot of it shows another concept; all None without negatives).
    `fields`: the items' extra fields (keys other than caption, spans, index: "image_id", a file's
    "source"), a list per name, a value per caption (None where an item lacks it), as they came (`.to`
    moves only tensors).
    """

    input_ids: torch.Tensor  # [B, L] int64, right-padded
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens
    special_tokens_mask: torch.Tensor  # [B, L] bool, special tokens and padding
    replaced_mask: torch.Tensor  # [B, L] bool, tokens a patch replaces in the CMC view
    plan: SplicePlan
    patch_ids: torch.Tensor  # [M] int64 bank patch ids, slot order (row by row, left to right)
    concept_ids: torch.Tensor  # [M] int64 concept of each slot
    pixels: torch.Tensor  # [M, P, P, 3] uint8
    indices: torch.Tensor  # [B] int64 dataset index of each caption, -1 where the item carried none
    captions: list[str]
    sample_keys: np.ndarray  # [B] uint64 per-sample random keys (see cmcaug.draws)
    stats: CMCStats
    labels: torch.Tensor | None = None
    patch_mask: torch.Tensor | None = None  # [M, K] bool, patch rows the splice shows as [MASK] (patch_targets="masked")
    negative_patch_ids: torch.Tensor | None = None  # [N, M] int64 bank patch ids of the hard-negative views
    negative_concept_ids: torch.Tensor | None = None  # [N, M] int64 their concepts
    negative_pixels: torch.Tensor | None = None  # [N, M, P, P, 3] uint8
    negative_valid: torch.Tensor | None = None  # [B, N] bool, negative view n differs from row b's view in every slot
    fields: dict[str, list[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __repr__(self) -> str:
        b, l = self.input_ids.shape
        return (f"CMCBatch(B={b}, L={l}, L_out={self.plan.output_length}, patches={self.num_patches}, "
                f"labels={self.labels is not None}, device={self.input_ids.device})")

    @property
    def num_patches(self) -> int:
        """M: patch slots in the CMC view, one per replaced word (`patch_embeds` must have M rows)."""
        return int(self.patch_ids.shape[0])

    def _map(self, fn: Any) -> CMCBatch:
        tensors = {
            f.name: fn(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, plan=fn(self.plan), **tensors)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CMCBatch:
        """A copy with every tensor and the plan on `device`."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CMCBatch:
        """A copy in pinned memory (DataLoader(pin_memory=True) calls this), for non-blocking copies."""
        return self._map(lambda t: t.pin_memory())

    def patch_pixels(
        self, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32, backend: str = "auto"
    ) -> torch.Tensor:
        """The patches as normalized `[M, 3, P, P]` images for a patch encoder (the normalization kernel)."""
        from .kernels import normalize_patches

        return normalize_patches(self.pixels, mean, std, dtype=dtype, backend=backend)

    @property
    def num_negatives(self) -> int:
        """N: hard-negative views per caption (`CMCTransform(negatives=N)`)."""
        return 0 if self.negative_patch_ids is None else int(self.negative_patch_ids.shape[0])

    def negative_patch_pixels(
        self, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32, backend: str = "auto"
    ) -> torch.Tensor:
        """The hard negatives' patches as normalized `[N, M, 3, P, P]` images, as `patch_pixels` for each view."""
        from .kernels import normalize_patches

        pixels = self.negative_pixels
        if pixels is None:
            raise InputError("this batch has no hard negatives: collate it with CMCTransform(..., negatives=N)")
        flat = normalize_patches(pixels.reshape(-1, *pixels.shape[2:]), mean, std, dtype=dtype, backend=backend)
        return flat.reshape(*pixels.shape[:2], *flat.shape[1:])
