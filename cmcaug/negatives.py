"""Hard patch negatives for CMC: the same spliced caption, with every patch showing another concept.

In-batch contrast between a caption's text view and its CMC view is solved by the words left in place (the
other captions differ in them), so nothing forces a patch to stand for the word it replaced. A negative
that differs from the positive only in which concept each patch shows can be told apart by the patches
alone. `CMCTransform(negatives=N)` draws N such views per caption in `collate`: for each slot, a concept
uniformly among the bank's other concepts that have patches, then one patch of it, all keyed draws
(`cmcaug.draws`: the slot's sample key, counter `span ordinal * N + n`), so negatives, like the view,
depend on (seed, epoch, sample) only. Score them with `cmcaug.losses.info_nce(..., hard_negatives=...)`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import draws


def draw_negatives(bank: Any, concept_ids: np.ndarray, patch_ids: np.ndarray, slot_keys: np.ndarray,
                   ordinals: np.ndarray, slot_rows: np.ndarray, batch_size: int, negatives: int) -> dict[str, torch.Tensor]:
    """The `CMCBatch` fields of `negatives` (N) hard-negative views of a batch's M slots.

    `concept_ids`, `patch_ids`, `slot_keys`, `ordinals` (the replaced span's ordinal among its item's spans)
    and `slot_rows` describe the slots, in slot order. Where no other concept has patches, a slot keeps its
    own concept and patch, and no view of its row is a valid negative (`negative_valid`).
    """
    n, m = int(negatives), concept_ids.size
    counter = ordinals.astype(np.int64)[None, :] * n + np.arange(n)[:, None]  # [N, M]
    have = np.flatnonzero(np.asarray(bank.counts) > 0)  # sorted concepts a patch can be drawn from
    lookup = np.append(have, -1)  # index have.size (no such concept) reads -1, never a concept
    position = np.searchsorted(have, concept_ids)
    own_has = lookup[position] == concept_ids
    choices = have.size - own_has  # the other concepts with patches
    u = draws.uniform(slot_keys[None, :], draws.STREAM_NEGATIVE_CONCEPT, counter)
    pick = np.minimum(np.floor(u * choices).astype(np.int64), choices - 1)
    pick += own_has & (pick >= position)  # skip the slot's own concept
    other = np.broadcast_to(choices > 0, (n, m))
    concepts = np.where(other, lookup[pick], concept_ids).astype(np.int64)
    patches = np.broadcast_to(patch_ids, (n, m)).copy()
    u_patch = draws.uniform(slot_keys[None, :], draws.STREAM_NEGATIVE_PATCH, counter)
    patches[other] = bank.sample(concepts[other], uniforms=u_patch[other])
    same = np.zeros((n, batch_size), np.int64)  # per view and row: slots that kept their own concept
    np.add.at(same, (np.arange(n)[:, None], np.broadcast_to(slot_rows, (n, m))), (concepts == concept_ids).astype(np.int64))
    has_slots = np.bincount(slot_rows, minlength=batch_size) > 0
    return {
        "negative_patch_ids": torch.from_numpy(patches),
        "negative_concept_ids": torch.from_numpy(concepts),
        "negative_pixels": bank.pixels(patches),
        "negative_valid": torch.from_numpy((has_slots[None, :] & (same == 0)).T.copy()),
    }
