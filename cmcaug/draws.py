"""Keyed random draws: every random number of a CMC view, a pure function of (seed, epoch, sample).

CMC must draw the same view for a caption whatever process collates it and whatever it is batched with,
so no draw may depend on a stateful generator's position. Every random number is instead a pure function
of a 64-bit *sample key* (a hash of seed, epoch and the sample's dataset index), a *stream* (what the
number is for: choosing spans, picking patches, masking) and a *counter* (which span or token): a
counter-based generator in the style of Philox/Threefry (Salmon et al., SC 2011), here the splitmix64
finalizer applied twice, vectorized over whole batches in NumPy. The same key gives the same numbers in
any worker, any run, any batch size.
"""
from __future__ import annotations

import hashlib

import numpy as np

# Streams: one per purpose, so adding a draw for one never shifts another.
STREAM_SELECT, STREAM_PATCH, STREAM_MASK, STREAM_MASK_KIND, STREAM_MASK_TOKEN = 1, 2, 3, 4, 5
STREAM_PATCH_TARGET, STREAM_PATCH_TARGET_KIND = 6, 7  # patch-row MLM: is a slot a target, is it hidden
STREAM_NEGATIVE_CONCEPT, STREAM_NEGATIVE_PATCH = 8, 9  # hard negatives: another concept, then its patch
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
