"""Seeded generators and random TiMix batches, shared by tests/test_timix.py and tests/test_timix_draws.py."""
from __future__ import annotations

import torch


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b: int = 6, grid: tuple[int, int] = (4, 4), patch: int = 4, dtype=torch.uint8, seed: int = 0):
    """Random images and relevance maps for a [b, 3, grid * patch] batch."""
    g = seeded(seed)
    images = torch.randint(0, 256, (b, 3, grid[0] * patch, grid[1] * patch), generator=g).to(dtype)
    return images, torch.rand(b, *grid, generator=g)
