"""BERT-style masking of a CMC view's text tokens (Devlin et al., 2019: 80 % [MASK], 10 % random, 10 % kept).

Masking applies to the tokens that stay text in the spliced view: never to special tokens, padding, or
the words a patch replaced (they are not in the view). Its draws come from the samples' keys
(`cmcaug.draws`), so masking is as reproducible as the view, and the labels come back already remapped
onto the view's rows through the plan. `CMCTransform.mask_tokens` is the entry point for a `CMCBatch`.

Patch rows get targets too (`patch_targets`): a patch slot predicts the word it replaced, a denoising
target that ties the patch to its word; without it nothing in MLM asks a patch to mean anything.
"""
from __future__ import annotations

import numpy as np
import torch

from ._generator import generator_seed
from .draws import (STREAM_MASK, STREAM_MASK_KIND, STREAM_MASK_TOKEN, STREAM_PATCH_TARGET, STREAM_PATCH_TARGET_KIND,
                    sample_keys, uniform)
from .errors import InputError
from .plan import SplicePlan

PATCH_TARGETS = ("none", "word", "masked")
DEFAULT_PATCH_TARGETS = "word"  # what `CMCTransform.mask_tokens` asks of patch rows unless told otherwise


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    plan: SplicePlan,
    keys: np.ndarray,
    *,
    mlm_probability: float = 0.15,
    mask_token_id: int,
    vocab_size: int,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    patch_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask `input_ids` [B, L] BERT-style where `maskable`; return (masked ids [B, L], labels [B, L_out]).

    Each maskable token (text in the view: not special, not padding, not replaced by a patch) is chosen
    with probability `mlm_probability`; a chosen token becomes `mask_token_id` with probability
    `mask_fraction`, a uniformly random id in [0, vocab_size) with probability `random_fraction`, and
    stays itself otherwise. `labels` (aligned with the splice's output through `plan`) hold the original
    id of every chosen token, `patch_labels` ([M, K], from `patch_targets`) on the patch rows, and
    `ignore_index` elsewhere (patch rows too without `patch_labels`). Draws come from the per-sample
    `keys`, or from one draw of `generator` when given.
    """
    if not 0.0 <= mlm_probability <= 1.0:
        raise InputError(f"mlm_probability must lie in [0, 1], got {mlm_probability}")
    if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
        raise InputError(
            f"mask_fraction and random_fraction must be >= 0 with a sum <= 1, got {mask_fraction} and {random_fraction}"
        )
    if vocab_size < 1 or not 0 <= mask_token_id < vocab_size:
        raise InputError(f"need vocab_size >= 1 and 0 <= mask_token_id < vocab_size, got {mask_token_id} and {vocab_size}")
    bsz, length = input_ids.shape
    keys = draw_keys(keys, bsz, generator)
    # The draws depend on the keys and the shape only, so they are made on the CPU and shipped; the
    # batch's own tensors stay where they are (no device-to-host sync).
    grid, positions = keys[:, None], np.arange(length, dtype=np.uint64)[None, :]
    kind = uniform(grid, STREAM_MASK_KIND, positions)
    draws = np.stack([uniform(grid, STREAM_MASK, positions) < mlm_probability, kind < mask_fraction,
                      (kind >= mask_fraction) & (kind < mask_fraction + random_fraction)])
    random_ids = np.floor(uniform(grid, STREAM_MASK_TOKEN, positions) * vocab_size).astype(np.int64)
    device = input_ids.device
    draws_t = torch.from_numpy(draws).to(device, non_blocking=True)
    chosen = draws_t[0] & maskable
    text_labels = torch.where(chosen, input_ids, torch.full_like(input_ids, ignore_index))
    masked = torch.where(chosen & draws_t[1], torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & draws_t[2], torch.from_numpy(random_ids).to(device, non_blocking=True), masked)
    return masked, plan.remap_labels(text_labels, ignore_index=ignore_index, patch_labels=patch_labels)


def patch_targets(
    input_ids: torch.Tensor,
    plan: SplicePlan,
    keys: np.ndarray,
    *,
    mode: str = "word",
    mlm_probability: float = 0.15,
    mask_fraction: float = 0.8,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM targets of the patch rows: (patch_labels [M, K] int64, patch_mask [M, K] bool), on `input_ids`' device.

    A patch row predicts the sub-token of the word its slot replaced (`SplicePlan.replaced_token_values`:
    row k the k-th sub-token). `mode` "none": no targets. "word": every slot, its patch always shown
    (`patch_mask` all False). "masked": as for text tokens, each slot is a target with probability
    `mlm_probability`; a target slot is hidden with probability `mask_fraction` (`patch_mask` True on its
    K rows: the splice shows the [MASK] embedding there, so the word must come from context), else shown.
    One keyed draw per slot (`keys` of its row, counter its ordinal in the row), or from `generator`.
    """
    if mode not in PATCH_TARGETS:
        raise InputError(f"patch_targets must be one of {PATCH_TARGETS}, got {mode!r}")
    shape, device = (plan.num_slots, plan.patch_tokens), input_ids.device
    hidden = torch.zeros(shape, dtype=torch.bool, device=device)
    if mode == "none":
        return torch.full(shape, ignore_index, dtype=torch.int64, device=device), hidden
    words = plan.replaced_token_values(input_ids.long(), ignore_index=ignore_index)
    if mode == "word":
        return words, hidden
    _check_fraction(mlm_probability, "mlm_probability")
    _check_fraction(mask_fraction, "mask_fraction")
    slot_keys = draw_keys(keys, input_ids.shape[0], generator)[plan.slot_rows]
    counters = plan.slot_span_index.astype(np.uint64)
    draws = np.stack([uniform(slot_keys, STREAM_PATCH_TARGET, counters) < mlm_probability,
                      uniform(slot_keys, STREAM_PATCH_TARGET_KIND, counters) < mask_fraction])
    chosen, hide = torch.from_numpy(draws).to(device, non_blocking=True)[:, :, None]
    labels = torch.where(chosen, words, torch.full_like(words, ignore_index))
    return labels, (chosen & hide).expand(shape).contiguous()


def draw_keys(keys: np.ndarray, batch_size: int, generator: torch.Generator | None) -> np.ndarray:
    """The per-sample `keys`, or, with a `generator`, keys from one number drawn from it (as `collate` does)."""
    if generator is None:
        return keys
    return sample_keys(generator_seed(generator), 0, np.arange(batch_size))


def _check_fraction(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{name} must lie in [0, 1], got {value}")
