"""TiMix window paste: image i with one window overwritten by a same-sized window of image partner[i].

Contract (boxes are (x0, y0, x1, y1) in patch units, end-exclusive; a patch is `patch_size` pixels square):

    images      [B, C, H, W], any dtype (uint8, float16, bfloat16, float32, ...), any strides
    partner     [B] integer, partner[i] in [0, B): whose pixels are pasted into image i
    target_box  [B, 4] integer: the window of image i that is overwritten
    source_box  [B, 4] integer, each the same size as its target box: the window of image partner[i] pasted

    out[i, c, y, x] = images[partner[i], c, y - ty0*p + sy0*p, x - tx0*p + sx0*p]   inside target_box[i]
                    = images[i, c, y, x]                                             everywhere else

Target and source windows may sit at different places (TiMix's least- and most-relevant windows), and an
empty box (x0 == x1 or y0 == y1) leaves the image unchanged. Pixels right or below the last whole patch
(H or W not a multiple of the patch size) are never inside a window.

Bytes moved. Out of place (the default), one pass: every output element is written once and read from
exactly one input element, 2 * B*C*H*W*itemsize in all, a copy's traffic. In place, only windows move,
through a staging buffer (source windows are gathered first, then written to their targets), because the
window a sample reads may be one that another sample overwrites: 4 * window bytes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from cmcaug.errors import InputError

from . import reference
from .backend import Backend, kernel_op, launch_device

try:
    import triton
    import triton.language as tl
except ImportError:  # platforms without Triton (macOS, Windows) run the reference path only
    triton = None

_TILE_BYTES = 16384  # bytes one program moves: enough in flight per SM for a bandwidth-bound copy


if triton is not None:

    @triton.jit
    def _paste_kernel(
        src_ptr, dst_ptr, partner_ptr, src_box_ptr, dst_box_ptr,
        C, H, W,
        s_b, s_c, s_h, s_w,
        d_b, d_c, d_h, d_w,
        PATCH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, COPY_REST: tl.constexpr,
    ):
        # One program: a BLOCK_H x BLOCK_W tile of one (sample, channel) plane of dst. COPY_REST tiles the whole
        # plane (H x W) and copies the pixels outside the window from the sample itself; otherwise the tiles
        # cover only the window, starting at its corner, and nothing else is touched.
        plane = tl.program_id(0)
        b = plane // C
        c = plane - b * C
        j = tl.load(partner_ptr + b)
        tx0 = tl.load(dst_box_ptr + 4 * b) * PATCH
        ty0 = tl.load(dst_box_ptr + 4 * b + 1) * PATCH
        tx1 = tl.load(dst_box_ptr + 4 * b + 2) * PATCH
        ty1 = tl.load(dst_box_ptr + 4 * b + 3) * PATCH
        dx = tl.load(src_box_ptr + 4 * b) * PATCH - tx0
        dy = tl.load(src_box_ptr + 4 * b + 1) * PATCH - ty0

        if COPY_REST:
            rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
            cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
            inside = (rows < H)[:, None] & (cols < W)[None, :]
        else:
            rows = ty0 + tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
            cols = tx0 + tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
            inside = (rows < ty1)[:, None] & (cols < tx1)[None, :]
        in_window = ((rows >= ty0) & (rows < ty1))[:, None] & ((cols >= tx0) & (cols < tx1))[None, :]

        # Offsets in int64: a plane's row stride times its height may pass 2^31 (huge or permuted batches).
        y, x = rows.to(tl.int64)[:, None], cols.to(tl.int64)[None, :]
        c_src = c.to(tl.int64) * s_c
        pasted_ptrs = src_ptr + j.to(tl.int64) * s_b + c_src + (y + dy) * s_h + (x + dx) * s_w
        value = tl.load(pasted_ptrs, mask=inside & in_window)
        if COPY_REST:
            own = tl.load(src_ptr + b.to(tl.int64) * s_b + c_src + y * s_h + x * s_w, mask=inside & ~in_window)
            value = tl.where(in_window, value, own)
        dst_ptrs = dst_ptr + b.to(tl.int64) * d_b + c.to(tl.int64) * d_c + y * d_h + x * d_w
        tl.store(dst_ptrs, value, mask=inside)


def _paste_triton(images: torch.Tensor, partner: torch.Tensor, target_box: torch.Tensor,
                  source_box: torch.Tensor, patch_size: int, inplace: bool = False) -> torch.Tensor:
    """Triton launcher: the pasted batch, a new tensor or (`inplace`) `images` itself."""
    device = images.device
    partner, target_box, source_box = (t.to(torch.int32).contiguous() for t in (partner, target_box, source_box))
    B, C, H, W = images.shape
    if images.numel() == 0:
        return images if inplace else images.clone()
    if not inplace:
        out = torch.empty_like(images)
        _launch(images, out, partner, source_box, target_box, patch_size, (H, W), copy_rest=True)
        return out
    sizes = target_box[:, 2:] - target_box[:, :2]  # [B, 2] window (width, height) in patches
    max_w, max_h = (int(v) for v in sizes.amax(0).tolist())
    if max_w == 0 or max_h == 0:
        return images
    p = patch_size
    staging = images.new_empty(B, C, max_h * p, max_w * p)
    at_origin = torch.cat([torch.zeros_like(sizes), sizes], 1)
    _launch(images, staging, partner, source_box, at_origin, p, (max_h * p, max_w * p), copy_rest=False)
    itself = torch.arange(B, device=device, dtype=torch.int32)
    _launch(staging, images, itself, at_origin, target_box, p, (max_h * p, max_w * p), copy_rest=False)
    return images


def _launch(src: torch.Tensor, dst: torch.Tensor, partner: torch.Tensor, src_box: torch.Tensor,
            dst_box: torch.Tensor, patch_size: int, extent: tuple[int, int], copy_rest: bool) -> None:
    block_h, block_w, num_warps = _tile_shape(extent, src.element_size())
    grid = (dst.shape[0] * dst.shape[1], triton.cdiv(extent[0], block_h), triton.cdiv(extent[1], block_w))
    with launch_device(dst.device):
        _paste_kernel[grid](
            src, dst, partner, src_box, dst_box,
            dst.shape[1], dst.shape[2], dst.shape[3],
            *src.stride(), *dst.stride(),
            PATCH=patch_size, BLOCK_H=block_h, BLOCK_W=block_w, COPY_REST=copy_rest, num_warps=num_warps,
        )


def _tile_shape(extent: tuple[int, int], itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, num_warps): rows up to 256 wide, about _TILE_BYTES a tile, few masked-off lanes."""
    height, width = extent
    block_w = _block(width, 256)
    most_rows = max(1, _TILE_BYTES // itemsize // block_w)
    block_h = _block(height, 1 << (most_rows.bit_length() - 1))
    num_warps = 8 if block_h * block_w * itemsize >= 8192 else 4
    return block_h, block_w, num_warps


def _block(extent: int, largest: int) -> int:
    """One power-of-two block for a short extent; else the largest of largest, largest / 2, largest / 4
    that masks off at most 1/16 of the extent, or failing that the one that masks off the least."""
    if extent <= largest:
        return triton.next_power_of_2(extent)
    blocks = [largest >> i for i in range(3) if largest >> i]
    waste = {block: triton.cdiv(extent, block) * block - extent for block in blocks}
    return next((block for block in blocks if 16 * waste[block] <= extent), min(blocks, key=waste.get))


def _into(paste: Callable) -> Callable:
    """The in-place op's implementation over one twin: it writes into `images` and returns nothing (an
    operator may not return its input)."""
    def run(images, partner, target_box, source_box, patch_size):
        paste(images, partner, target_box, source_box, patch_size, inplace=True)
    return run


@kernel_op("cmcaug::paste_windows", triton=_paste_triton, reference=reference.paste_windows)
def _paste(images: torch.Tensor, partner: torch.Tensor, target_box: torch.Tensor, source_box: torch.Tensor,
           patch_size: int, implementation: str) -> torch.Tensor:
    return torch.empty_like(images)


@kernel_op("cmcaug::paste_windows_", triton=_into(_paste_triton), reference=_into(reference.paste_windows),
           mutates_args=("images",))
def _paste_into(images: torch.Tensor, partner: torch.Tensor, target_box: torch.Tensor, source_box: torch.Tensor,
                patch_size: int, implementation: str) -> None:
    """Writes into `images`: nothing to allocate."""


def paste_windows(
    images: torch.Tensor, partner: torch.Tensor, target_box: torch.Tensor, source_box: torch.Tensor, *,
    patch_size: int, inplace: bool = False, backend: Backend = "auto", validate: bool = True,
) -> torch.Tensor:
    """Paste window `source_box[i]` of `images[partner[i]]` over window `target_box[i]` of every image i.

    Returns a new tensor (same layout as `images`) unless `inplace=True`, which writes into `images` and
    returns it. `backend`: "auto" (Triton for CUDA tensors, the PyTorch reference otherwise), "triton" or
    "reference". Images that require grad take the reference path, which autograd differentiates.
    `validate=False` skips the range checks of the box and partner values (one host sync on CUDA); only
    pass it for windows built by `cmcaug.timix`, which are valid by construction.
    """
    partner, target_box, source_box = (torch.as_tensor(t, device=images.device)
                                       for t in (partner, target_box, source_box))
    _check_paste_args(images, partner, target_box, source_box, patch_size, validate)
    if inplace:
        _paste_into(images, partner, target_box, source_box, patch_size, backend=backend)
        return images
    return _paste(images, partner, target_box, source_box, patch_size, backend=backend)


def _check_paste_args(images: torch.Tensor, partner: torch.Tensor, target_box: torch.Tensor,
                      source_box: torch.Tensor, patch_size: int, validate: bool) -> None:
    """Shapes and dtypes always; with `validate`, the values too (all arguments on images.device)."""
    if images.dim() != 4:
        raise InputError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    B, _, H, W = images.shape
    if not isinstance(patch_size, int) or patch_size < 1:
        raise InputError(f"patch_size must be a positive int, got {patch_size!r}")
    if partner.shape != (B,) or partner.is_floating_point():
        raise InputError(f"partner must be an integer tensor of shape ({B},), got {partner.dtype} "
                         f"{tuple(partner.shape)}")
    for name, box in (("target_box", target_box), ("source_box", source_box)):
        if box.shape != (B, 4) or box.is_floating_point():
            raise InputError(f"{name} must be an integer tensor of shape ({B}, 4) holding (x0, y0, x1, y1) in "
                             f"patch units, got {box.dtype} {tuple(box.shape)}")
    if not validate or B == 0:
        return
    grid_w, grid_h = W // patch_size, H // patch_size
    limits = torch.tensor([grid_w, grid_h, grid_w, grid_h], device=images.device)
    checks = {
        f"partner values must lie in [0, {B})": (partner < 0) | (partner >= B),
        f"boxes must lie inside the {grid_w} x {grid_h} patch grid (x in [0, {grid_w}], y in [0, {grid_h}])":
            ((target_box < 0) | (target_box > limits) | (source_box < 0) | (source_box > limits)).any(1),
        "boxes must have x1 >= x0 and y1 >= y0":
            (target_box[:, 2:] < target_box[:, :2]).any(1) | (source_box[:, 2:] < source_box[:, :2]).any(1),
        "each source_box must have the same width and height as its target_box":
            (target_box[:, 2:] - target_box[:, :2] != source_box[:, 2:] - source_box[:, :2]).any(1),
    }
    failed = torch.stack([bad.any() for bad in checks.values()]).tolist()
    for (message, bad), found in zip(checks.items(), failed):
        if found:
            i = int(bad.nonzero()[0])
            raise InputError(f"paste_windows: {message}; sample {i} has partner {int(partner[i])}, target_box "
                             f"{target_box[i].tolist()} and source_box {source_box[i].tolist()}")
