"""Bank patches into a patch encoder's input: uint8 [N, H, W, C] -> normalized [M, C, H, W], in one pass.

Contract: with i = index[m] (or i = m without an index),

    out[m, c, y, x] = (pixels[i, y, x, c] / 255 - mean[c]) / std[c]

computed in fp32 as `pixels * scale[c] + shift[c]` with the (scale, shift) of `reference.patch_affine`,
then rounded once to `dtype`. The kernel fuses the row gather (sampled bank patches), the uint8 -> float
conversion, HWC -> CHW and the normalization; the reference does them one by one. They agree exactly up
to a fused multiply-add (at most one fp32 rounding step before the cast).

Bytes moved: M*H*W*C uint8 read, M*C*H*W elements of `dtype` written (plus the index).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from cmcaug.errors import InputError

from . import reference
from .backend import Backend, interpreter_enabled, kernel_op, launch_device

try:
    import triton
    import triton.language as tl
except ImportError:  # platforms without Triton (macOS, Windows) run the reference path only
    triton = None

if triton is not None:

    @triton.jit
    def _round_to_bfloat16(x):
        """fp32 -> bf16, round to nearest even, like torch, on every backend (the interpreter's cast truncates)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + ((bits >> 16) & 1) + 0x7FFF
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _patch_gather_kernel(
        out_ptr, pixels_ptr, index_ptr, affine_ptr,
        M, HW, W, stride_n, stride_h, stride_w, stride_c,
        C: tl.constexpr, HAS_INDEX: tl.constexpr, TO_BFLOAT16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    ):
        """A BLOCK_M patches x BLOCK_Q pixels tile of the output, every channel."""
        m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        live = (m < M)[:, None] & (q < HW)[None, :]
        if HAS_INDEX:
            source = tl.load(index_ptr + m, mask=m < M, other=0).to(tl.int64)
        else:
            source = m
        y = q // W
        pixel = y.to(tl.int64) * stride_h + (q - y * W).to(tl.int64) * stride_w
        in_offsets = source[:, None] * stride_n + pixel[None, :]
        out_offsets = m[:, None] * (C * HW) + q[None, :]
        for c in tl.static_range(C):
            scale = tl.load(affine_ptr + c)
            shift = tl.load(affine_ptr + C + c)
            value = tl.load(pixels_ptr + in_offsets + c * stride_c, mask=live, other=0).to(tl.float32) * scale + shift
            if TO_BFLOAT16:
                value = _round_to_bfloat16(value)
            tl.store(out_ptr + out_offsets + c * HW, value.to(out_ptr.dtype.element_ty), mask=live)


def patch_gather(
    pixels: torch.Tensor, index: torch.Tensor | None, affine: torch.Tensor, dtype: torch.dtype, *,
    block_m: int | None = None, block_q: int | None = None,
) -> torch.Tensor:
    """Triton launcher: rows `index` of uint8 `pixels` [N, H, W, C], normalized by `affine`, as [M, C, H, W]."""
    _, h, w, c = pixels.shape
    m = pixels.shape[0] if index is None else index.numel()
    out = torch.empty(m, c, h, w, dtype=dtype, device=pixels.device)
    if out.numel() == 0:
        return out
    hw = h * w
    if interpreter_enabled():  # few, large programs: each costs ~1 ms in the interpreter
        auto_q = min(triton.next_power_of_2(hw), 2**14)
        auto_m = min(triton.next_power_of_2(m), max(1, 2**16 // auto_q))
    else:
        auto_q = min(triton.next_power_of_2(hw), 1024)
        auto_m = max(1, 1024 // auto_q)
    block_m, block_q = block_m or auto_m, block_q or auto_q
    grid = (triton.cdiv(m, block_m), triton.cdiv(hw, block_q))
    with launch_device(out.device):
        _patch_gather_kernel[grid](
            out, pixels, pixels if index is None else index.contiguous(), affine.contiguous(),
            m, hw, w, *pixels.stride(),
            C=c, HAS_INDEX=index is not None, TO_BFLOAT16=dtype == torch.bfloat16,
            BLOCK_M=block_m, BLOCK_Q=block_q, num_warps=4,
        )
    return out


def _check_index_values(pixels: torch.Tensor, index: torch.Tensor | None, *_) -> None:
    """The range check of CPU indices: it needs their values, so it runs inside the op (compiled code too)."""
    if index is not None and index.device.type == "cpu" and index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= pixels.shape[0]:
            raise InputError(f"index values must lie in [0, {pixels.shape[0]}) (rows of pixels), got [{low}, {high}]")


@kernel_op("cmcaug::normalize_patches", triton=patch_gather, reference=reference.patch_gather,
           check=_check_index_values)
def _normalize(pixels: torch.Tensor, index: torch.Tensor | None, affine: torch.Tensor, dtype: torch.dtype,
               implementation: str) -> torch.Tensor:
    _, h, w, c = pixels.shape
    return pixels.new_empty(pixels.shape[0] if index is None else index.numel(), c, h, w, dtype=dtype)


def normalize_patches(
    pixels: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    index: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Normalize uint8 patches [N, H, W, C] for a patch encoder: returns `dtype` [M, C, H, W].

    `mean` and `std` are per-channel, in [0, 1] units (as torchvision's Normalize after ToTensor). With
    `index` (int [M], on the pixels' device), only rows `pixels[index]` are read: sample from a bank kept
    on the GPU without materializing the gathered uint8 batch. Indices on a CUDA device are trusted (no
    host sync to check them); indices on the CPU are range-checked.
    """
    if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8 or pixels.dim() != 4:
        raise InputError(f"pixels must be a uint8 tensor [N, H, W, C] (HWC, like a bank), got {_describe(pixels)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if index is not None:
        _check_index(index, pixels)
    affine = reference.patch_affine(mean, std, pixels.shape[-1], pixels.device)
    return _normalize(pixels, index, affine, dtype, backend=backend)


def _check_index(index: torch.Tensor, pixels: torch.Tensor) -> None:
    integer = isinstance(index, torch.Tensor) and not index.dtype.is_floating_point and index.dtype != torch.bool
    if not integer or index.dim() != 1:
        raise InputError(f"index must be a 1-D integer tensor of rows of pixels, got {_describe(index)}")
    if index.device != pixels.device:
        raise InputError(f"index is on {index.device} but pixels are on {pixels.device}; move one of them")


def _describe(x) -> str:
    return f"a {x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
