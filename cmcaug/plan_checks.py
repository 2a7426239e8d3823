"""The checks a hand-made `SplicePlan` passes before any kernel reads it (`cmcaug.plan`).

A plan from `SplicePlan.build` is valid by construction; one made by hand (its constructor,
`dataclasses.replace`) could make a kernel read or write out of bounds (the Triton gather does not check),
or give wrong gradients, so it is refused with `InputError` naming the first bad entry.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cmcaug.kernels.index_maps import PAD_SOURCE

from .errors import InputError

INDEX_MAPS = ("source_index", "text_destination", "patch_destination")
TOKEN_MAPS = ("attention_mask", "modality_ids", "position_ids")
ROW_COUNTS = ("text_lengths", "output_lengths", "slots_per_row")


def check_plan(plan: Any) -> None:  # plan: a SplicePlan (not imported: cmcaug.plan imports this module)
    """Refuse (`InputError`) a hand-made plan the kernels would misread: an index out of range reads or writes
    out of bounds, and maps that are not each other's inverse give wrong gradients. Checks the maps' dtypes,
    shapes and device, the row counts' shapes and totals, then every value, vectorized: a few passes over the
    maps, about as long as `build` takes (0.5 ms for B=32, L=64; 3 ms for B=256, L=128, K=4 on one CPU core);
    on a CUDA plan it also waits for the device (it copies the slots' rows there and reads the flags back);
    meta tensors have no values to check. Last, `slot_token_spans` (NumPy) if the plan has them."""
    for name in INDEX_MAPS:
        index = getattr(plan, name)
        if not isinstance(index, torch.Tensor) or index.dtype != torch.int32 or index.dim() != 2:
            found = f"{index.dtype} {list(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
            raise InputError(f"SplicePlan.{name} must be a 2-D int32 tensor, got {found}; use SplicePlan.build")
    (batch, out_width), width = plan.source_index.shape, plan.text_destination.shape[1]
    if plan.text_destination.shape[0] != batch:
        raise InputError(f"SplicePlan maps disagree on the batch size: source_index has {batch} rows, "
                         f"text_destination {plan.text_destination.shape[0]}; use SplicePlan.build")
    for name in TOKEN_MAPS:
        value = getattr(plan, name)
        if value is not None and not (isinstance(value, torch.Tensor) and value.shape == plan.source_index.shape):
            found = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"SplicePlan.{name} must be a tensor shaped like source_index {[batch, out_width]}, got {found}")
    if len({t.device for t in (getattr(plan, name) for name in INDEX_MAPS + TOKEN_MAPS) if t is not None}) != 1:
        raise InputError("SplicePlan maps must share one device; move plans with plan.to(device)")
    for name, cap in zip(ROW_COUNTS, (width, out_width, plan.num_slots)):
        counts = getattr(plan, name)
        if not (isinstance(counts, np.ndarray) and counts.shape == (batch,) and counts.dtype.kind in "iu"):
            found = f"{counts.dtype} {counts.shape}" if isinstance(counts, np.ndarray) else type(counts).__name__
            raise InputError(f"SplicePlan.{name} must be an integer NumPy array of shape ({batch},), got {found}")
        if batch and (counts.min() < 0 or counts.max() > cap):
            raise InputError(f"SplicePlan.{name} must lie in [0, {cap}], found [{counts.min()}, {counts.max()}]")
    if plan.slots_per_row.sum() != plan.num_slots:
        raise InputError(f"SplicePlan.slots_per_row sums to {plan.slots_per_row.sum()}, but patch_destination has "
                         f"{plan.num_slots} slots")
    if plan.device.type != "meta":
        _check_values(plan)
    _check_slot_spans(plan)


def _check_values(plan: Any) -> None:
    """Every row read is in range, every destination is -1 or an output row, each map inverts the other, and
    each patch slot lies in the row `slots_per_row` gives it. All flags are reduced on the maps' device and
    read back at once; the first bad position is looked up only when one is set."""
    source = plan.source_index.reshape(-1).long()
    patch_rows = torch.where((source < 0) & (source != PAD_SOURCE), -1 - source, -1)
    slots = patch_rows // max(plan.patch_tokens, 1)
    slot_rows = _take(torch.as_tensor(plan.slot_rows, device=source.device), slots, slots < plan.num_slots)
    out_rows = torch.arange(source.numel(), device=source.device) // max(plan.output_length, 1)
    problems = [
        *_pairing_problems(plan, "text", torch.where(source >= 0, source, -1)),
        *_pairing_problems(plan, "patch", patch_rows),
        ((patch_rows >= 0) & (slot_rows != out_rows), lambda t: f"source_index{_at(plan.source_index, t)} reads patch "
         f"slot {int(slots[t])}, which slots_per_row puts in row {int(slot_rows[t])}"),
    ]
    flags = torch.stack([bad.any() for bad, _ in problems]).tolist()  # the one host sync
    for (bad, describe), flag in zip(problems, flags):
        if flag:
            raise InputError(f"SplicePlan.{describe(int(bad.nonzero()[0]))}; use SplicePlan.build")


def _check_slot_spans(plan: Any) -> None:
    """`slot_token_spans`, when given: one non-empty (start, end) range inside its row's text per slot."""
    spans = plan.slot_token_spans
    if spans is None:
        return
    if not (isinstance(spans, np.ndarray) and spans.shape == (plan.num_slots, 2) and spans.dtype.kind in "iu"):
        found = f"{spans.dtype} {spans.shape}" if isinstance(spans, np.ndarray) else type(spans).__name__
        raise InputError(f"SplicePlan.slot_token_spans must be an integer NumPy array of shape ({plan.num_slots}, 2), "
                         f"a (start, end) per slot, or None; got {found}")
    start, end = spans.astype(np.int64).T
    bad = (start < 0) | (end <= start) | (end > plan.text_lengths[plan.slot_rows])
    if bad.any():
        m = int(np.flatnonzero(bad)[0])
        raise InputError(f"SplicePlan.slot_token_spans[{m}] = ({start[m]}, {end[m]}) is not a non-empty token range "
                         f"inside row {int(plan.slot_rows[m])}'s {int(plan.text_lengths[plan.slot_rows[m]])} tokens")


def _pairing_problems(plan: Any, kind: str, reads: torch.Tensor) -> list[tuple[torch.Tensor, Callable]]:
    """(bad entries, description), first problem first, of the source map `reads` (flat output row -> the
    `kind` row it reads, -1 for none) against that kind's inverse map (row -> flat output row or -1)."""
    name, rows_in = f"{kind}_destination", "B*L" if kind == "text" else "M*K"
    inverse = getattr(plan, name)
    destination = inverse.reshape(-1).long()
    outputs, rows = (torch.arange(x.numel(), device=x.device) for x in (reads, destination))
    back = _take(destination, reads, (reads >= 0) & (reads < destination.numel()))
    forth = _take(reads, destination, (destination >= 0) & (destination < reads.numel()))
    at = functools.partial(_at, plan.source_index)
    return [
        (reads >= destination.numel(), lambda t: f"source_index{at(t)} reads {kind} row {int(reads[t])}, past the "
         f"{rows_in} = {destination.numel()} rows"),
        ((destination < -1) | (destination >= reads.numel()), lambda r: f"{name}{_at(inverse, r)} = {int(destination[r])} "
         f"is neither -1 nor an output row in [0, B*L_out = {reads.numel()})"),
        ((reads >= 0) & (back != outputs), lambda t: f"source_index{at(t)} reads {kind} row {int(reads[t])}, whose {name} "
         f"is {int(back[t])}, not this output row ({t}): a row has one destination at most, and the maps invert each other"),
        ((destination >= 0) & (forth != rows), lambda r: f"{name}{_at(inverse, r)} = {int(destination[r])}, but that "
         f"output row reads {f'{kind} row {int(forth[r])}' if forth[r] >= 0 else f'no {kind} row'}, not {r}: the maps "
         "must invert each other"),
    ]


def _take(values: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`values[index]` where `valid`, else -1 (index -1 picks the appended -1), as int64."""
    return torch.cat([values.long(), values.new_full((1,), -1, dtype=torch.long)])[torch.where(valid, index, -1)]


def _at(index: torch.Tensor, flat: int) -> str:
    """`[i, j]` of the flat position `flat` in a 2-D map."""
    return str(list(divmod(flat, max(index.shape[1], 1))))
