"""Per-sample keyed randomness and BERT-style masking of a CMC view's text tokens.

CMC must draw the same view for a caption whatever process collates it and whatever it is batched with,
so no draw may depend on a stateful generator's position. Every random number is instead a pure function
of a 64-bit *sample key* (a hash of seed, epoch and the sample's dataset index), a *stream* (what the
number is for: choosing spans, picking patches, masking) and a *counter* (which span or token): a
counter-based generator in the style of Philox/Threefry (Salmon et al., SC 2011), here the splitmix64
finalizer applied twice, vectorized over whole batches in NumPy. The same key gives the same numbers in
any worker, any run, any batch size.

`mask_tokens` applies BERT's 80/10/10 recipe (Devlin et al., 2019) to the tokens that stay text in the
spliced view: never to special tokens, padding, or the words a patch replaced (they are not in the view),
and returns labels already remapped onto the view's rows through the plan.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import InputError

if TYPE_CHECKING:
    from .transform import CMCBatch

# Streams: one per purpose, so adding a draw for one never shifts another.
STREAM_SELECT, STREAM_PATCH, STREAM_MASK, STREAM_MASK_KIND, STREAM_MASK_TOKEN = 1, 2, 3, 4, 5
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_CONTENT_TAG = np.uint64(0xC0DE_C0DE_C0DE_C0DE)  # keeps caption hashes apart from dataset indices
_U64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 whose output bits all depend on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _u64(values: object) -> np.ndarray:
    return np.asarray(values, dtype=np.uint64).reshape(-1)


def content_id(caption: str) -> int:
    """A stable 64-bit stand-in for the dataset index of an item that carries none: a hash of its text."""
    return int.from_bytes(hashlib.blake2b(caption.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def sample_keys(seed: int, epoch: int, ids: np.ndarray, from_content: np.ndarray | None = None) -> np.ndarray:
    """uint64 key of each sample: a hash of (seed, epoch, id); ids marked `from_content` are caption hashes."""
    ids = _u64(ids)
    if from_content is not None:
        ids = np.where(np.asarray(from_content, dtype=bool), _mix(ids ^ _CONTENT_TAG), ids)
    h = _mix(_u64(seed & _U64) + _GOLDEN)
    h = _mix(h ^ (_u64(epoch & _U64) * _GOLDEN + _M1))
    return _mix(h ^ _mix(ids + _GOLDEN))


def uniform(keys: np.ndarray, stream: int, counters: np.ndarray) -> np.ndarray:
    """float64 uniforms in [0, 1), one per (key, counter) pair broadcast together, for one stream."""
    h = _mix(np.asarray(keys, dtype=np.uint64) + np.uint64((stream * int(_M2)) & _U64))
    h = _mix(h ^ ((np.asarray(counters, dtype=np.uint64) + np.uint64(1)) * _GOLDEN))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def generator_seed(generator: torch.Generator) -> int:
    """One draw in [0, 2**62) from a torch.Generator (advancing it), used in place of (seed, epoch)."""
    return int(torch.randint(0, 1 << 62, (), generator=generator, device=generator.device).item())


def mask_tokens(
    batch: CMCBatch,
    *,
    mlm_probability: float = 0.15,
    mask_token_id: int,
    vocab_size: int,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
) -> CMCBatch:
    """Mask text tokens of the CMC view BERT-style; return a new batch with masked `input_ids` and `labels`.

    Each maskable token (text in the view: not special, not padding, not replaced by a patch) is chosen
    with probability `mlm_probability`; a chosen token becomes `mask_token_id` with probability
    `mask_fraction`, a uniformly random id in [0, vocab_size) with probability `random_fraction`, and
    stays itself otherwise. `labels` ([B, L_out], aligned with `cmc.splice`'s output) hold the original
    id of every chosen token and `ignore_index` elsewhere, patch slots and padding included. Draws come
    from the batch's per-sample keys (so masking is as reproducible as the view), or from one draw of
    `generator` when given.
    """
    if not 0.0 <= mlm_probability <= 1.0:
        raise InputError(f"mlm_probability must lie in [0, 1], got {mlm_probability}")
    if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
        raise InputError(
            f"mask_fraction and random_fraction must be >= 0 with a sum <= 1, got {mask_fraction} and {random_fraction}"
        )
    if vocab_size < 1 or not 0 <= mask_token_id < vocab_size:
        raise InputError(f"need vocab_size >= 1 and 0 <= mask_token_id < vocab_size, got {mask_token_id} and {vocab_size}")
    input_ids = batch.input_ids
    bsz, length = input_ids.shape
    keys = batch.sample_keys
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
    chosen = draws_t[0] & ~(batch.special_tokens_mask | batch.replaced_mask)
    text_labels = torch.where(chosen, input_ids, torch.full_like(input_ids, ignore_index))
    masked = torch.where(chosen & draws_t[1], torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & draws_t[2], torch.from_numpy(random_ids).to(device, non_blocking=True), masked)
    labels = batch.plan.remap_labels(text_labels, ignore_index=ignore_index)
    return dataclasses.replace(batch, input_ids=masked, labels=labels)
