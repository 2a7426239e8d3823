"""The fused CMC splice: text-token and patch embeddings -> one mixed sequence, in one pass over memory.

Contract (the index maps of `index_maps.SpliceMaps`, built by `cmcaug.plan.SplicePlan`): `text [B, L, D]`
and `patches [M, K, D]` of one float dtype and a plan on their device give `embeds [B, L_out, D]` with

    embeds[b, t] = text.view(B*L, D)[s]          if s = plan.source_index[b, t] >= 0
                 = patches.view(M*K, D)[-s - 1]   if s < 0 and s != PAD_SOURCE
                 = 0                              if s == PAD_SOURCE (padding)

bit for bit, in every dtype. Backward is the same gather through the inverse maps (each text / patch row
has at most one destination): no atomics, deterministic, zero gradient for replaced, truncated and padding
text rows.

Bytes moved (the benchmark's yardstick), with E bytes per element and R the non-padding output rows:
forward reads R*D*E and writes B*L_out*D*E; backward reads R*D*E and writes (B*L + M*K)*D*E; each also
reads its int32 index map (4 bytes per row written).

Kernel layout: one program copies a tile of BLOCK_R rows, looping over D in BLOCK_D columns. A row's
source offset is computed once, in int64 (tensors may exceed 2^31 elements), from the source's row
strides, so sliced or strided inputs need no copy; only a last dimension with stride != 1 is copied first.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from cmcaug.errors import InputError

from . import reference
from .backend import Backend, interpreter_enabled, kernel_op, launch_device
from .index_maps import PAD_SOURCE, SpliceMaps

try:
    import triton
    import triton.language as tl
except ImportError:  # platforms without Triton (macOS, Windows) run the reference path only
    triton = None

if triton is not None:
    _PAD = tl.constexpr(PAD_SOURCE)

    @triton.jit
    def _row_offsets(row, inner, stride_outer, stride_inner, FLAT: tl.constexpr):
        """int64 element offsets of the int32 flat rows `row` of a [*, inner, D] tensor with these row strides.

        FLAT: the two row dimensions collapse into one (stride_outer == inner * stride_inner): no division.
        """
        if FLAT:
            offsets = row.to(tl.int64) * stride_inner
        else:
            outer = row // inner  # int32: a 64-bit division costs several times more
            offsets = outer.to(tl.int64) * stride_outer + (row - outer * inner).to(tl.int64) * stride_inner
        return offsets

    @triton.jit
    def _gather_rows_kernel(
        out_ptr, index_ptr, n_rows, D,
        a_ptr, a_inner, a_stride0, a_stride1,
        b_ptr, b_inner, b_stride0, b_stride1,
        SIGNED: tl.constexpr, A_FLAT: tl.constexpr, B_FLAT: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, D_BLOCKS: tl.constexpr,
    ):
        """out[r] = a[index[r]] if index[r] >= 0; with SIGNED, b[-index[r] - 1] if index[r] < 0 and not the
        padding sentinel; zeros otherwise. `a` and `b` are [*, inner, D] tensors with unit stride in D.

        D_BLOCKS = cdiv(D, BLOCK_D) is a constexpr (one compile per embedding width) because triton 3.6's
        interpreter cannot loop to a runtime bound under NumPy 2.4 (it converts the bound with int())."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = rows < n_rows
        index = tl.load(index_ptr + rows, mask=live, other=-1)
        from_a = live & (index >= 0)
        a_rows = _row_offsets(tl.where(from_a, index, 0), a_inner, a_stride0, a_stride1, A_FLAT)
        if SIGNED:
            from_b = live & (index < 0) & (index != _PAD)
            b_rows = _row_offsets(tl.where(from_b, -1 - index, 0), b_inner, b_stride0, b_stride1, B_FLAT)
        out_rows = rows * D
        for block in range(D_BLOCKS):
            cols = block * BLOCK_D + tl.arange(0, BLOCK_D)
            in_d = cols < D
            value = tl.load(a_ptr + a_rows[:, None] + cols[None, :], mask=from_a[:, None] & in_d[None, :], other=0.0)
            if SIGNED:
                value_b = tl.load(
                    b_ptr + b_rows[:, None] + cols[None, :], mask=from_b[:, None] & in_d[None, :], other=0.0
                )
                value = tl.where(from_b[:, None], value_b, value)
            tl.store(out_ptr + out_rows[:, None] + cols[None, :], value, mask=live[:, None] & in_d[None, :])


def _blocks(n_rows: int, d: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D). On a GPU: 8 KiB tiles of 512-byte row chunks (16 rows x 256 bf16 values), so
    D = 768 or 1000 wastes few lanes; under the interpreter, few large programs (each costs ~1 ms)."""
    if interpreter_enabled():
        block_d = min(triton.next_power_of_2(d), 4096)
        return min(triton.next_power_of_2(n_rows), max(1, 2**16 // block_d)), block_d
    block_d = min(triton.next_power_of_2(d), 512 // element_size)
    return max(1, 8192 // element_size // block_d), block_d


def _gather_rows(
    out: torch.Tensor, index: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None,
    block_rows: int | None, block_d: int | None,
) -> torch.Tensor:
    """Launch `_gather_rows_kernel` writing the contiguous `out` [n_rows, ..., D] (flat rows = index.numel())."""
    n_rows, d = index.numel(), out.shape[-1]
    if out.numel() == 0:
        return out
    auto_r, auto_d = _blocks(n_rows, d, out.element_size())
    block_r, block_d = block_rows or auto_r, block_d or auto_d
    signed = b is not None
    b = b if signed else a
    with launch_device(out.device):
        _gather_rows_kernel[(triton.cdiv(n_rows, block_r),)](
            out, index.contiguous(), n_rows, d,
            a, max(a.shape[1], 1), a.stride(0), a.stride(1),
            b, max(b.shape[1], 1), b.stride(0), b.stride(1),
            SIGNED=signed, A_FLAT=_flat_rows(a), B_FLAT=_flat_rows(b),
            BLOCK_R=block_r, BLOCK_D=block_d, D_BLOCKS=triton.cdiv(d, block_d), num_warps=4,
        )
    return out


def _flat_rows(x: torch.Tensor) -> bool:
    """True when row r of x [A, R, D] starts at r * x.stride(1) (x viewed as [A*R, D] without a copy)."""
    return x.shape[0] <= 1 or x.stride(0) == x.shape[1] * x.stride(1)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when its last dimension is dense (any row strides are fine), else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def splice_forward(
    text: torch.Tensor, patches: torch.Tensor, source_index: torch.Tensor, *,
    block_rows: int | None = None, block_d: int | None = None,
) -> torch.Tensor:
    """Triton forward: embeds [B, L_out, D] gathered from text and patches through the signed `source_index`."""
    text, patches = _unit_stride(text), _unit_stride(patches)
    out = text.new_empty(*source_index.shape, text.shape[-1])
    return _gather_rows(out, source_index, text, patches, block_rows, block_d)


def splice_backward(
    grad: torch.Tensor, text_destination: torch.Tensor | None, patch_destination: torch.Tensor | None, *,
    block_rows: int | None = None, block_d: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Triton backward: (grad_text [B, L, D], grad_patches [M, K, D]), each gathered through its inverse map
    (None for a map passed as None: that gradient is not wanted)."""
    grad = _unit_stride(grad)

    def gather(destination: torch.Tensor | None) -> torch.Tensor | None:
        if destination is None:
            return None
        return _gather_rows(grad.new_empty(*destination.shape, grad.shape[-1]), destination, grad, None,
                            block_rows, block_d)

    return gather(text_destination), gather(patch_destination)


# The splice is linear, so its backward is its transpose (the gather through the inverse maps), whose
# backward is the splice again: gradients of any order work. Each op takes all three maps so that its
# backward has them; an unwanted gradient of the transpose is an empty tensor (operators return tensors).


def _spliced_by(forward: Callable) -> Callable:
    """The splice op's implementation over one twin's forward launcher."""
    def run(text, patches, source_index, text_destination, patch_destination):
        return forward(text, patches, source_index)
    return run


def _transposed_by(backward: Callable) -> Callable:
    """The transpose op's implementation over one twin's backward launcher."""
    def run(grad, source_index, text_destination, patch_destination, text_grad, patch_grad):
        grads = backward(grad, text_destination if text_grad else None, patch_destination if patch_grad else None)
        return tuple(g if g is not None else grad.new_empty(0) for g in grads)
    return run


def _save_splice(ctx, inputs, output) -> None:
    *_, source_index, text_destination, patch_destination, ctx.implementation = inputs
    ctx.save_for_backward(source_index, text_destination, patch_destination)


def _save_transpose(ctx, inputs, output) -> None:
    grad, source_index, text_destination, patch_destination, *ctx.wanted, ctx.implementation = inputs
    ctx.save_for_backward(source_index, text_destination, patch_destination)
    ctx.width = grad.shape[-1]


def _splice_backward(ctx, grad: torch.Tensor):
    text_grad, patch_grad = ctx.needs_input_grad[:2]
    grad_text, grad_patches = _transpose(grad, *ctx.saved_tensors, text_grad, patch_grad, backend=ctx.implementation)
    return grad_text if text_grad else None, grad_patches if patch_grad else None, None, None, None, None


def _transpose_backward(ctx, grad_text: torch.Tensor, grad_patches: torch.Tensor):
    _, text_destination, patch_destination = ctx.saved_tensors
    text_grad, patch_grad = ctx.wanted
    if not text_grad:
        grad_text = grad_text.new_zeros(*text_destination.shape, ctx.width)
    if not patch_grad:
        grad_patches = grad_patches.new_zeros(*patch_destination.shape, ctx.width)
    embeds = _splice(grad_text, grad_patches, *ctx.saved_tensors, backend=ctx.implementation)
    return embeds, None, None, None, None, None, None


@kernel_op("cmcaug::splice", triton=_spliced_by(splice_forward), reference=_spliced_by(reference.splice_forward),
           backward=_splice_backward, setup_context=_save_splice)
def _splice(text: torch.Tensor, patches: torch.Tensor, source_index: torch.Tensor, text_destination: torch.Tensor,
            patch_destination: torch.Tensor, implementation: str) -> torch.Tensor:
    return text.new_empty(*source_index.shape, text.shape[-1])


@kernel_op("cmcaug::splice_transpose", triton=_transposed_by(splice_backward),
           reference=_transposed_by(reference.splice_backward), backward=_transpose_backward,
           setup_context=_save_transpose)
def _transpose(grad: torch.Tensor, source_index: torch.Tensor, text_destination: torch.Tensor,
               patch_destination: torch.Tensor, text_grad: bool, patch_grad: bool,
               implementation: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(grad.new_empty(*m.shape, grad.shape[-1]) if wanted else grad.new_empty(0)
                 for m, wanted in ((text_destination, text_grad), (patch_destination, patch_grad)))


class SpliceOutput(NamedTuple):
    """The spliced batch: embeddings plus the per-token maps a transformer takes alongside them.

    The maps are the plan's own tensors (computed once per plan, shared by every splice with it): read-only.
    """

    embeds: torch.Tensor          # [B, L_out, D], dtype of the inputs
    attention_mask: torch.Tensor  # int64 [B, L_out]: 1 token, 0 padding
    modality_ids: torch.Tensor    # int64 [B, L_out]: 0 text, 1 patch (0 on padding)
    position_ids: torch.Tensor    # int64 [B, L_out]: 0, 1, 2, ... per row, 0 on padding
    source_index: torch.Tensor    # int32 [B, L_out]: the plan's signed source map


def splice(text: torch.Tensor, patches: torch.Tensor, plan: SpliceMaps, backend: Backend = "auto") -> SpliceOutput:
    """Splice patch embeddings into text embeddings as `plan` says; differentiable in `text` and `patches`.

    `text` is [B, L, D] (L = plan.text_length), `patches` is [M, K, D] (M = plan.num_slots, K =
    plan.patch_tokens; M may be 0), both of one float dtype and on the plan's device. `backend` picks
    "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "reference" (plain PyTorch) or "auto" (by device).
    """
    _check_inputs(text, patches, plan)
    embeds = _splice(text, patches, plan.source_index, plan.text_destination, plan.patch_destination, backend=backend)
    return SpliceOutput(embeds, plan.attention_mask, plan.modality_ids, plan.position_ids, plan.source_index)


def _check_inputs(text: torch.Tensor, patches: torch.Tensor, plan: SpliceMaps) -> None:
    try:
        (b, _), (_, l), (m, k) = (plan.source_index.shape, plan.text_destination.shape, plan.patch_destination.shape)
        device = plan.source_index.device
    except (AttributeError, ValueError):
        raise InputError(f"plan must be a SplicePlan (see SplicePlan.build), got {type(plan).__name__}") from None
    for name, x in (("text", text), ("patches", patches)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            found = f"{x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"{name} must be a 3-D floating-point tensor, got {found}")
    if patches.dtype != text.dtype:
        raise InputError(f"text and patches must share a dtype, got {text.dtype} and {patches.dtype}; cast one")
    if tuple(text.shape[:2]) != (b, l):
        hint = "; build the plan with text_length=text.shape[1]" if text.shape[0] == b else ""
        raise InputError(f"text must have shape [B, L, D] = [{b}, {l}, D] for this plan, got {list(text.shape)}{hint}")
    if tuple(patches.shape) != (m, k, text.shape[2]):
        raise InputError(
            f"patches must have shape [M, K, D] = [{m}, {k}, {text.shape[2]}] (one row of K tokens per patch slot "
            f"of the plan, D as in text), got {list(patches.shape)}"
        )
    if not text.device == patches.device == device:
        raise InputError(
            f"text ({text.device}), patches ({patches.device}) and plan ({device}) must be on one device; "
            "move the plan with plan.to(text.device, non_blocking=True)"
        )
