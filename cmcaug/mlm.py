"""BERT-style masking of a CMC view's text tokens (Devlin et al., 2019: 80 % [MASK], 10 % random, 10 % kept).

Masking applies to the tokens that stay text in the spliced view: never to special tokens, padding, or
the words a patch replaced (they are not in the view). Its draws come from the samples' keys
(`cmcaug.draws`), so masking is as reproducible as the view, and the labels come back already remapped
onto the view's rows through the plan. `CMCTransform.mask_tokens` is the entry point for a `CMCBatch`.
"""
from __future__ import annotations

import numpy as np
import torch

from ._generator import generator_seed
from .draws import STREAM_MASK, STREAM_MASK_KIND, STREAM_MASK_TOKEN, sample_keys, uniform
from .errors import InputError
from .plan import SplicePlan


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask `input_ids` [B, L] BERT-style where `maskable`; return (masked ids [B, L], labels [B, L_out]).

    Each maskable token (text in the view: not special, not padding, not replaced by a patch) is chosen
    with probability `mlm_probability`; a chosen token becomes `mask_token_id` with probability
    `mask_fraction`, a uniformly random id in [0, vocab_size) with probability `random_fraction`, and
    stays itself otherwise. `labels` (aligned with the splice's output through `plan`) hold the original
    id of every chosen token and `ignore_index` elsewhere, patch slots and padding included. Draws come
    from the per-sample `keys`, or from one draw of `generator` when given.
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
    if generator is not None:
        keys = sample_keys(generator_seed(generator), 0, np.arange(bsz))
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
    return masked, plan.remap_labels(text_labels, ignore_index=ignore_index)
