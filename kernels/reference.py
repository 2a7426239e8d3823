"""Plain-PyTorch implementations of every kernel: the CPU path and the test oracle.

Each function here has the same name and contract as the Triton launcher it mirrors; the kernels must
match it exactly where they only move values, and within a per-dtype tolerance where they compute.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cmcaug.errors import InputError

from .index_maps import PAD_SOURCE

# ------------------------------------------------------------------------------------------------------
# Splice: the twin of kernels/splice.py
# ------------------------------------------------------------------------------------------------------


def splice_forward(text: torch.Tensor, patches: torch.Tensor, source_index: torch.Tensor) -> torch.Tensor:
    """Reference of `splice.splice_forward`: stack text rows, patch rows and one zero row, gather once."""
    d = text.shape[-1]
    n_text = text.shape[0] * text.shape[1]
    zero_row = n_text + patches.shape[0] * patches.shape[1]
    table = torch.cat([text.reshape(-1, d), patches.reshape(-1, d), text.new_zeros(1, d)])
    source = source_index.long()
    row = torch.where(source >= 0, source, n_text - 1 - source)
    return table[torch.where(source == PAD_SOURCE, zero_row, row)]


def splice_backward(
    grad: torch.Tensor, text_destination: torch.Tensor | None, patch_destination: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Reference of `splice.splice_backward`: gather each source row's gradient through the inverse maps
    (None where that gradient is not wanted). Rows with no destination (replaced, truncated, padding) get zeros.
    """
    d = grad.shape[-1]
    table = torch.cat([grad.reshape(-1, d), grad.new_zeros(1, d)])
    zero_row = table.shape[0] - 1

    def gather(destination: torch.Tensor | None) -> torch.Tensor | None:
        if destination is None:
            return None
        destination = destination.long()
        return table[torch.where(destination >= 0, destination, zero_row)]

    return gather(text_destination), gather(patch_destination)


# ------------------------------------------------------------------------------------------------------
# Patch normalization: the twin of kernels/patch_gather.py
# ------------------------------------------------------------------------------------------------------


def patch_affine(
    mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor, channels: int, device: torch.device,
) -> torch.Tensor:
    """float32 [2, C]: the per-channel (scale, shift) with uint8 * scale + shift == (uint8 / 255 - mean) / std.

    Both implementations apply these same fp32 numbers, so they differ at most by fused multiply-adds.
    """
    stats = []
    for name, values in (("mean", mean), ("std", std)):
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        if len(values) != channels or not all(math.isfinite(v) for v in values):
            raise InputError(f"{name} must hold {channels} finite numbers (one per channel, in [0, 1] units), "
                             f"got {values}")
        stats.append([float(v) for v in values])
    mean64, std64 = stats  # Python floats: fp64 math, and constants under torch.compile
    if min(std64) <= 0:
        raise InputError(f"std must be positive, got {std64}")
    scale, shift = [1.0 / (255.0 * v) for v in std64], [-m / v for m, v in zip(mean64, std64)]
    return torch.tensor([scale, shift], dtype=torch.float32, device=device)


def patch_gather(
    pixels: torch.Tensor, index: torch.Tensor | None, affine: torch.Tensor, dtype: torch.dtype,
) -> torch.Tensor:
    """Reference of `patch_gather.patch_gather`: uint8 [N, H, W, C] (rows `index`) -> dtype [M, C, H, W]."""
    if index is not None:
        pixels = pixels.index_select(0, index.long())
    channels = pixels.shape[-1]
    x = pixels.permute(0, 3, 1, 2).float()
    normalized = x * affine[0].view(1, channels, 1, 1) + affine[1].view(1, channels, 1, 1)
    return normalized.to(dtype).contiguous()


# ------------------------------------------------------------------------------------------------------
# TiMix window paste: the twin of kernels/image_mix.py
# ------------------------------------------------------------------------------------------------------


def paste_windows(
    images: torch.Tensor, partner: torch.Tensor, target_box: torch.Tensor, source_box: torch.Tensor,
    patch_size: int, inplace: bool = False,
) -> torch.Tensor:
    """Reference of `image_mix.paste_windows`: a clone, then one slice copy per sample (autograd follows it).

    Boxes are (x0, y0, x1, y1) in patch units; window i of the result holds window `source_box[i]` of
    `images[partner[i]]`. In place, every source window is copied out before any target is written.
    """
    p = patch_size
    out = images if inplace else images.clone()
    windows = [images[j, :, y0 * p:y1 * p, x0 * p:x1 * p]
               for j, (x0, y0, x1, y1) in zip(partner.tolist(), source_box.tolist())]
    if inplace:
        windows = [window.clone() for window in windows]
    for i, ((x0, y0, x1, y1), window) in enumerate(zip(target_box.tolist(), windows)):
        out[i, :, y0 * p:y1 * p, x0 * p:x1 * p] = window
    return out
