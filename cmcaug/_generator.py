"""Draws from a caller's `torch.Generator`, shared by the batch mixers (`timix`, `mixgen`) and CMC's keyed draws.

The mixers take an optional `torch.Generator`: the same generator state gives the same mix, and the
generator advances. Draws happen on the generator's device (CPU without one, from torch's global RNG).
torch's Beta distribution samples from the global RNG only, so `beta` takes one seed from the generator and
samples with NumPy: a pure function of the generator's state, like every other draw here.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import InputError


def generator_device(generator: torch.Generator | None) -> torch.device:
    """Where draws from `generator` happen: its device, or the CPU for torch's global RNG."""
    return generator.device if generator is not None else torch.device("cpu")


def generator_seed(generator: torch.Generator | None) -> int:
    """One draw in [0, 2**62) from `generator` (advancing it; torch's global RNG without one): a seed for
    draws that take no `torch.Generator` (NumPy's Beta, cmcaug's keyed draws)."""
    return int(torch.randint(0, 1 << 62, (), generator=generator, device=generator_device(generator)))


def beta(alpha: float, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """[count] float64 on the CPU, each lam ~ Beta(alpha, alpha) (timm's and torchvision's Mixup / CutMix draw).

    One 62-bit seed comes from `generator` however large `count` is, so the generator moves the same way
    for every batch size."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 < alpha and math.isfinite(alpha)):
        raise InputError(f"alpha must be a positive finite number (lam ~ Beta(alpha, alpha)), got {alpha!r}")
    return torch.from_numpy(np.random.default_rng(generator_seed(generator)).beta(alpha, alpha, count))
